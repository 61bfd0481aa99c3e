"""Data pipeline ops (the migration guide's "data" stage) on the paddle side.

The paddle side tokenizes the way a PaddleNLP user does: ``paddlenlp.transformers.BertTokenizer``
built from the vocab the coordinator shipped (the torch side's ``vocab.txt``: the workers may be
on different hosts), ``tokenizer(sentence, max_length=..., truncation=True)``, and
``paddlenlp.data.DataCollatorWithPadding`` over a sequential order. The attention mask is
requested explicitly so it can be compared with HF's (PaddleNLP omits it by default).

Injects owned here (negative controls): ``tokenizer_no_lower`` builds the tokenizer with
``do_lower_case=False``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from . import models as _models

INJECTS = ("tokenizer_no_lower",)
_models.OP_INJECTS.update(INJECTS)  # the model builder leaves these to this module


PROGRESS_EVERY = 5000   # sentences between progress messages


class DataOps:
    def _tokenizer(self, body: dict) -> Any:
        from paddlenlp.transformers import BertTokenizer
        inject = set(body.get("inject") or self.inject)
        vocab = body.get("vocab")
        if not isinstance(vocab, str) or not vocab.strip():
            raise ValueError("data_pipeline needs the vocab text from the torch side ('vocab')")
        do_lower = bool(body.get("do_lower_case", True)) and "tokenizer_no_lower" not in inject
        with tempfile.TemporaryDirectory(prefix="lockstep-vocab-") as d:
            path = os.path.join(d, "vocab.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write(vocab)
            return BertTokenizer(vocab_file=path, do_lower_case=do_lower)  # reads the file in __init__

    def op_data_pipeline(self, body: dict, ctx: Any) -> dict:
        """Tokenize every split, then batch it with PaddleNLP's DataCollatorWithPadding in file order."""
        from paddlenlp.data import DataCollatorWithPadding
        tok = self._tokenizer(body)
        collate = DataCollatorWithPadding(tok)
        max_length, bs = int(body["max_length"]), int(body["batch_size"])
        out = {}
        for name, split in body["splits"].items():
            feats = []
            for i, (sentence, label) in enumerate(zip(split["sentences"], split["labels"])):
                if i and i % PROGRESS_EVERY == 0:   # a large file: the coordinator shows progress
                    ctx.partial({"split": name, "done": i, "of": len(split["sentences"])})
                enc = dict(tok(sentence, max_length=max_length, truncation=True, return_token_type_ids=True,
                               return_attention_mask=True))
                enc["labels"] = int(label)
                feats.append(enc)
            items = {k: [np.asarray(f[k], dtype=np.int64) for f in feats]
                     for k in ("input_ids", "token_type_ids", "attention_mask", "labels") if k in feats[0]}
            batches = []
            for start in range(0, len(feats), bs):  # paddle.io.SequenceSampler + BatchSampler(batch_size)
                batch = collate([dict(f) for f in feats[start:start + bs]])
                batches.append({k: np.array(v.numpy(), copy=True) for k, v in batch.items()})
            out[name] = {"length": len(feats), "items": items, "batches": batches}
        return {"splits": out, "tokenizer": f"{type(tok).__name__} (paddlenlp)", "vocab_size": len(tok)}


OPS = (DataOps,)
