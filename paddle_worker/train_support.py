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
import paddle

from protocol.masks import DropoutLog, keep_scale
from protocol.shared import inject_value  # noqa: F401  (re-exported for the ops modules)

# Injects this module applies (negative controls): adamw_eps:<eps>, adamw_wd_all, dropout_native,
# grad_scale:<factor> (the last trained parameter's gradient, scaled before the reply and the update).
INJECT_NAMES = ("adamw_eps", "adamw_wd_all", "dropout_native", "grad_scale")

NO_DECAY = ["bias", "norm"]   # the guide's paddle recipe: PaddleNLP names LayerNorms *norm*


def build_optimizer(model: paddle.nn.Layer, cfg: dict[str, Any], inject: list[str]) -> tuple[Any, dict[str, Any]]:
    """The coordinator's recipe, as the torch worker builds it: AdamW (the guide's) with
    ``apply_decay_param_fun`` (paddle passes the parameter's internal name, ``linear_3.w_0``, so
    the decay set is built from structured names first, as the guide does); Adam and SGD with
    two parameter groups, whose ``weight_decay`` is the coupled L2 term torch's Adam/SGD add.
    SGD with momentum is ``paddle.optimizer.Momentum`` (velocity = mu * velocity + grad, torch's
    rule without dampening)."""
    kind = str(cfg.get("type", "adamw"))
    eps = float(cfg.get("eps", 1e-6))
    if inject_value(inject, "adamw_eps"):
        eps = float(inject_value(inject, "adamw_eps"))
    no_decay = cfg.get("no_decay", NO_DECAY)
    if inject_value(inject, "adamw_wd_all") is not None:
        no_decay = []
    named = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]  # BatchNorm stats are not trained
    decay = [n for n, _ in named if not any(nd in n for nd in no_decay)]
    if cfg.get("decay_names") is not None and inject_value(inject, "adamw_wd_all") is None:
        wanted = set(cfg["decay_names"])   # an own-model pair: what torch decays, in paddle's names
        decay = [n for n, _ in named if n in wanted]
    decay_internal = {p.name for n, p in named if n in set(decay)}
    lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
    beta1, beta2 = (float(b) for b in cfg.get("betas", (0.9, 0.999)))
    momentum = float(cfg.get("momentum", 0.0))
    groups = [{"params": [p for n, p in named if n in set(decay)], "weight_decay": wd},
              {"params": [p for n, p in named if n not in set(decay)], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if kind == "adamw":
        opt = paddle.optimizer.AdamW(learning_rate=lr, parameters=[p for _, p in named], weight_decay=wd,
                                     epsilon=eps, beta1=beta1, beta2=beta2,
                                     apply_decay_param_fun=lambda name: name in decay_internal)
    elif kind == "adam":
        opt = paddle.optimizer.Adam(learning_rate=lr, parameters=groups, epsilon=eps, beta1=beta1, beta2=beta2)
    elif kind == "sgd" and momentum:
        opt = paddle.optimizer.Momentum(learning_rate=lr, momentum=momentum, parameters=groups)
    elif kind == "sgd":
        opt = paddle.optimizer.SGD(learning_rate=lr, parameters=groups)
    else:
        raise ValueError(f"optimizer type {kind!r} (known: adamw, adam, sgd)")
    return opt, {"type": kind, "eps": eps, "lr": lr, "weight_decay": wd, "momentum": momentum,
                 "decay": decay, "no_decay": [n for n, _ in named if n not in set(decay)]}


class DropoutControl:
    """Swaps ``paddle.nn.functional.dropout`` during a training forward.

    PaddleNLP BERT calls it from ``nn.Dropout`` layers (embeddings, dropout1, dropout2,
    the act dropout with p=0, the classifier) and directly inside ``nn.MultiHeadAttention``
    (attention weights). ``off``: identity; ``shared``: mask from ``protocol.masks`` keyed by
    (seed, forward step, call index, shape); ``native``: paddle's own RNG. Calls with p == 0
    or outside training are identity and not counted, so the act dropout (p=0) that HF
    does not have does not shift the call index.
    """

    def __init__(self, mode: str, seed: int) -> None:
        if mode not in ("off", "shared", "native"):
            raise ValueError(f"dropout mode {mode!r} (known: off, shared, native)")
        self.mode, self.seed, self.step = mode, int(seed), 0
        self.log = DropoutLog()

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        F = paddle.nn.functional
        original = F.dropout
        counter = itertools.count()
        ctl = self

        def dropout(x, p=0.5, axis=None, training=True, inplace=False, mode="upscale_in_train", name=None):
            if not training or p == 0.0:
                return x
            if axis is not None and ctl.mode == "shared":
                raise NotImplementedError("shared dropout masks do not support dropout with axis=")
            call = next(counter)
            if ctl.mode == "off":
                ctl.log.add(call, x.shape, p, None)
                return x
            if ctl.mode == "native":
                ctl.log.add(call, x.shape, p, None)
                return original(x, p, axis=axis, training=training, inplace=inplace, mode=mode, name=name)
            scale, crc = keep_scale(ctl.seed, ctl.step, call, tuple(x.shape), p, upscale=mode == "upscale_in_train")
            ctl.log.add(call, x.shape, p, crc)
            return x * paddle.to_tensor(scale, dtype=x.dtype, place=x.place)

        F.dropout = dropout
        try:
            yield
        finally:
            F.dropout = original
            self.step += 1


def tokenizer_from(info: dict[str, Any], body: dict[str, Any]):
    """PaddleNLP BertTokenizer built from the vocab text the coordinator ships from the torch side."""
    from paddlenlp.transformers import BertTokenizer
    vocab = body.get("vocab")
    if not vocab:
        raise ValueError("train needs the vocab text (the torch side's vocab.txt) in the request")
    fd, path = tempfile.mkstemp(suffix="-vocab.txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(vocab)
    try:
        return BertTokenizer(vocab_file=path, do_lower_case=bool(body.get("do_lower_case", True)))
    finally:
        os.unlink(path)


def encode_batch(tok: Any, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Pad to the longest sentence of the batch (DataCollatorWithPadding), truncate at max_length."""
    enc = tok(list(texts), padding=True, truncation=True, max_length=int(max_length),
              return_attention_mask=True, return_token_type_ids=True)
    return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "token_type_ids", "attention_mask")}


def sync(device: str) -> None:
    if device.startswith("gpu"):
        paddle.device.synchronize()
