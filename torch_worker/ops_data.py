"""Data pipeline ops (the migration guide's "data" stage) on the torch side.

The torch side tokenizes the way an HF user does: ``BertTokenizer.from_pretrained(model_dir)``,
``tokenizer(sentence, max_length=..., truncation=True)``, ``DataCollatorWithPadding`` over a
sequential sampler. ``tokenizer_info`` hands the coordinator the vocab text it must ship to the
paddle worker (which may live on another host and cannot read this model directory).

Injects owned here (negative controls): ``tokenizer_no_lower`` builds the tokenizer with
``do_lower_case=False``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import models as _models

INJECTS = ("tokenizer_no_lower",)
_models.OP_INJECTS.update(INJECTS)  # load_model refuses names no module registered


def _model_dir(adapter: Any, body: dict) -> str:
    """The directory holding the tokenizer: the loaded model's, else the preset's, without loading weights."""
    if adapter.model_info.get("source"):
        return str(adapter.model_info["source"])
    from . import models
    preset = body.get("preset", "minilm")
    if preset == "minilm":
        return models.minilm_dir()
    path = body.get("path")
    if preset == "bert" and path and os.path.isdir(path):
        return str(path)
    raise FileNotFoundError(f"no tokenizer directory for preset {preset!r} (path {path!r})")


PROGRESS_EVERY = 5000   # sentences between progress messages


class DataOps:
    def _tokenizer(self, body: dict) -> Any:
        from transformers import BertTokenizer
        inject = set(body.get("inject") or self.inject)
        path = _model_dir(self, body)
        if "tokenizer_no_lower" in inject:
            return BertTokenizer.from_pretrained(path, do_lower_case=False), path
        return BertTokenizer.from_pretrained(path), path

    def op_tokenizer_info(self, body: dict, ctx: Any) -> dict:
        """Vocab text + casing of the tokenizer this side uses, for the other side to rebuild it."""
        import json
        tok, path = self._tokenizer(body)
        vocab_path = os.path.join(path, "vocab.txt")
        if not os.path.exists(vocab_path):
            raise FileNotFoundError(f"{path} has no vocab.txt to send to the paddle side")
        do_lower = True
        cfg = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg):
            with open(cfg, encoding="utf-8") as f:
                do_lower = bool(json.load(f).get("do_lower_case", True))
        with open(vocab_path, encoding="utf-8") as f:
            vocab = f.read()
        return {"vocab": vocab, "do_lower_case": do_lower, "source": path,
                "tokenizer": f"{type(tok).__module__}.{type(tok).__name__}", "vocab_size": len(tok)}

    def op_data_pipeline(self, body: dict, ctx: Any) -> dict:
        """Tokenize every split, then batch it with DataCollatorWithPadding in file order."""
        from transformers import DataCollatorWithPadding
        tok, _ = self._tokenizer(body)
        collate = DataCollatorWithPadding(tok)
        max_length, bs = int(body["max_length"]), int(body["batch_size"])
        out = {}
        for name, split in body["splits"].items():
            feats = []
            for i, (sentence, label) in enumerate(zip(split["sentences"], split["labels"])):
                if i and i % PROGRESS_EVERY == 0:   # a large file: the coordinator shows progress
                    ctx.partial({"split": name, "done": i, "of": len(split["sentences"])})
                enc = dict(tok(sentence, padding=False, max_length=max_length, truncation=True,
                               return_token_type_ids=True))
                enc["labels"] = int(label)
                feats.append(enc)
            items = {k: [np.asarray(f[k], dtype=np.int64) for f in feats]
                     for k in ("input_ids", "token_type_ids", "attention_mask", "labels") if k in feats[0]}
            batches = []
            for start in range(0, len(feats), bs):  # SequentialSampler + batch_size: file order
                batch = collate([dict(f) for f in feats[start:start + bs]])
                batches.append({k: v.detach().cpu().numpy().copy() for k, v in batch.items()})
            out[name] = {"length": len(feats), "items": items, "batches": batches}
        return {"splits": out, "tokenizer": f"{type(tok).__name__} (transformers)", "vocab_size": len(tok)}


OPS = (DataOps,)
