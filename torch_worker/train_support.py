"""Training helpers for ops_train.py: the guide's AdamW recipe, dropout control, tokenization.

Not an ``ops_*`` module (serves no op itself); kept apart so the op methods stay short.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from typing import Any, Iterator

import numpy as np
import torch

from protocol.masks import DropoutLog, keep_scale
from protocol.shared import inject_value  # noqa: F401  (re-exported for the ops modules)

# Injects this module applies (negative controls): adamw_eps:<eps>, adamw_wd_all, dropout_native.
INJECT_NAMES = ("adamw_eps", "adamw_wd_all", "dropout_native", "grad_scale")

NO_DECAY = ["bias", "LayerNorm.weight"]   # the guide's torch recipe (HF run_glue)


def build_optimizer(model: torch.nn.Module, cfg: dict[str, Any], inject: list[str]
                    ) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """The coordinator's recipe (``steps/_training.optim_config``): AdamW by default (the guide's),
    Adam or SGD (with momentum) for a factory's recipe; two parameter groups, weight decay on all
    but names containing a ``no_decay`` pattern (the guide's: biases and LayerNorm weights)."""
    kind = str(cfg.get("type", "adamw"))
    eps = float(cfg.get("eps", 1e-6))
    if inject_value(inject, "adamw_eps"):
        eps = float(inject_value(inject, "adamw_eps"))
    no_decay = cfg.get("no_decay", NO_DECAY)
    if inject_value(inject, "adamw_wd_all") is not None:
        no_decay = []
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [n for n, _ in named if not any(nd in n for nd in no_decay)]
    groups = [{"params": [p for n, p in named if n in set(decay)], "weight_decay": float(cfg["weight_decay"])},
              {"params": [p for n, p in named if n not in set(decay)], "weight_decay": 0.0}]
    lr, betas = float(cfg["lr"]), tuple(float(b) for b in cfg.get("betas", (0.9, 0.999)))
    if kind == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, eps=eps, betas=betas)
    elif kind == "adam":
        opt = torch.optim.Adam(groups, lr=lr, eps=eps, betas=betas)
    elif kind == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.0)))
    else:
        raise ValueError(f"optimizer type {kind!r} (known: adamw, adam, sgd)")
    return opt, {"type": kind, "eps": eps, "lr": lr, "weight_decay": float(cfg["weight_decay"]),
                 "momentum": float(cfg.get("momentum", 0.0)), "decay": decay,
                 "no_decay": [n for n, _ in named if n not in set(decay)]}


class DropoutControl:
    """Swaps ``torch.nn.functional.dropout`` during a training forward.

    HF BERT calls it from ``nn.Dropout`` modules *and* directly in the eager attention
    (attention probabilities), so the functional is the one place that sees every call.
    ``off``: identity (dropout switched off while training); ``shared``: the mask comes
    from ``protocol.masks`` keyed by (seed, forward step, call index, shape); ``native``:
    torch's own RNG. Calls with p == 0 or outside training are identity and not counted.
    """

    def __init__(self, mode: str, seed: int) -> None:
        if mode not in ("off", "shared", "native"):
            raise ValueError(f"dropout mode {mode!r} (known: off, shared, native)")
        self.mode, self.seed, self.step = mode, int(seed), 0
        self.log = DropoutLog()

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        F = torch.nn.functional
        original = F.dropout
        counter = itertools.count()
        ctl = self

        def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
            if not training or p == 0.0:
                return input
            call = next(counter)
            if ctl.mode == "off":
                ctl.log.add(call, input.shape, p, None)
                return input
            if ctl.mode == "native":
                ctl.log.add(call, input.shape, p, None)
                return original(input, p, training, inplace)
            scale, crc = keep_scale(ctl.seed, ctl.step, call, tuple(input.shape), p)
            ctl.log.add(call, input.shape, p, crc)
            return input * torch.from_numpy(scale).to(device=input.device, dtype=input.dtype)

        F.dropout = dropout
        try:
            yield
        finally:
            F.dropout = original
            self.step += 1


def tokenizer_from(info: dict[str, Any], body: dict[str, Any]):
    """HF BertTokenizer the way an HF user builds it: ``from_pretrained(model_dir)``.

    (transformers 5's ``BertTokenizer(vocab_file=...)`` silently builds an empty vocab and
    maps every word to [UNK]: measured here, so never construct it from the file directly.)
    Without a model directory, the vocab text in the request goes into a temporary one.
    """
    from transformers import BertTokenizer
    lower = bool(body.get("do_lower_case", info.get("do_lower_case", True)))
    src = info.get("source")
    if src and os.path.exists(os.path.join(src, "vocab.txt")):
        return BertTokenizer.from_pretrained(src, do_lower_case=lower)
    vocab = body.get("vocab") or info.get("vocab")
    if not vocab:
        raise ValueError("no vocab.txt: the model directory has none and the request sent no vocab")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write(vocab)
        return BertTokenizer.from_pretrained(tmp, do_lower_case=lower)


def encode_batch(tok: Any, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Pad to the longest sentence of the batch (DataCollatorWithPadding), truncate at max_length."""
    enc = tok(list(texts), padding=True, truncation=True, max_length=int(max_length))
    return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "token_type_ids", "attention_mask")}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
