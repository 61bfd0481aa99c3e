"""Training ops (steps backward, train, perf): AdamW iterations, fine-tuning, timed steps.

``train_setup`` builds a fresh optimizer and the dropout control; ``train_step`` runs one
iteration and returns loss, lr, every gradient and every parameter after the update;
``train`` fine-tunes on sentences (tokenized here) streaming per-step losses, then
evaluates; ``perf`` times identical steps. Injects owned here: ``adamw_eps:<eps>``,
``adamw_wd_all`` (decay biases and LayerNorm too), ``dropout_native`` (ignore shared masks).
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import numpy as np
import torch

from protocol.shared import WeightSnapshotOps

from .adapter import from_numpy, to_numpy
from . import models as _models
from .train_support import (INJECT_NAMES, DropoutControl, build_optimizer, encode_batch, inject_value, sync,
                            tokenizer_from)

_models.OP_INJECTS.update(INJECT_NAMES)  # load_model refuses names no module registered


class TrainOps(WeightSnapshotOps):
    def _copy_state(self) -> dict:
        return {k: v.detach().clone() for k, v in self._need_model().state_dict().items()}

    def _load_state(self, snap: dict) -> None:
        self._need_model().load_state_dict(snap)

    def op_train_setup(self, body: dict, ctx: Any) -> dict:
        """Fresh AdamW (the guide's recipe) and dropout mode; resets the dropout step counter."""
        model = self._need_model()
        opt, info = build_optimizer(model, body["optim"], self.inject)
        mode = body.get("dropout", "off")
        if mode == "shared" and inject_value(self.inject, "dropout_native") is not None:
            mode = "native"
        self._train = {"opt": opt, "dropout": DropoutControl(mode, int(body.get("seed", 0)))}
        torch.manual_seed(int(body.get("seed", 0)))   # native dropout only
        return dict(info, dropout=mode)

    def _train_state(self) -> dict:
        if not getattr(self, "_train", None):
            raise RuntimeError("no optimizer: send train_setup first")
        return self._train

    def _loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Forward in training mode under the dropout control, cross-entropy, backward."""
        from . import models
        model = self._need_model()
        model.train()
        with self._train_state()["dropout"].forward():
            outputs = models.forward(model, self.model_info, inputs)
        loss = training_loss(outputs, labels, self.model_info, models, model, inputs, torch.nn.functional.cross_entropy)
        loss.backward()
        return loss

    def op_train_step(self, body: dict, ctx: Any) -> dict:
        """One iteration: gradients are read before the update, parameters after it."""
        st = self._train_state()
        model = self._need_model()
        inputs = {k: from_numpy(v, self.device) for k, v in body["inputs"].items()}
        labels = from_numpy(body["labels"], self.device)
        loss = self._loss(inputs, labels)
        factor = inject_value(self.inject, "grad_scale")
        if factor:   # negative control: a gradient bug only the gradients' comparison can see first
            last = [p for _, p in model.named_parameters() if p.grad is not None][-1]
            last.grad.mul_(float(factor))
        want = set(body.get("want", ["grads", "params"]))
        out: dict[str, Any] = {"loss": to_numpy(loss), "lr": float(st["opt"].param_groups[0]["lr"]),
                               "dropout_calls": st["dropout"].log.take()}
        # Views, not copies (to_numpy's reply rule): the step reads the gradients and never
        # writes them, zero_grad(set_to_none) drops them instead of zeroing, and nothing
        # touches the parameters between the step and the reply.
        if "grads" in want:
            out["grads"] = {n: to_numpy(p.grad, copy=False) for n, p in model.named_parameters()
                            if p.grad is not None}
        st["opt"].step()
        st["opt"].zero_grad(set_to_none=True)
        if "params" in want:
            out["params"] = {n: to_numpy(p, copy=False) for n, p in model.named_parameters()}
        model.eval()
        return out

    def op_train(self, body: dict, ctx: Any) -> dict:
        """Fine-tune on the sentences in order (no shuffle), stream each step's loss, then evaluate."""
        st = self._train_state()
        tok = tokenizer_from(self.model_info, body)
        texts, labels = list(body["texts"]), np.asarray(body["labels"], dtype=np.int64)
        bs, max_len = int(body["batch_size"]), int(body["max_length"])
        max_steps = int(body.get("max_steps") or 0)
        losses, crcs, calls, t0, step = [], [], [], time.perf_counter(), 0
        for epoch in range(int(body["epochs"])):
            for start in range(0, len(texts), bs):
                if max_steps and step >= max_steps:
                    break
                enc = encode_batch(tok, texts[start:start + bs], max_len)
                crc = zlib.crc32(enc["input_ids"].tobytes())
                inputs = {k: from_numpy(v, self.device) for k, v in enc.items()}
                loss = self._loss(inputs, from_numpy(labels[start:start + bs], self.device))
                st["opt"].step()
                st["opt"].zero_grad(set_to_none=True)
                calls.append(st["dropout"].log.take())   # checked against the other side's
                losses.append(float(loss.item()))
                crcs.append(crc)
                ctx.partial({"step": step, "epoch": epoch, "loss": losses[-1], "ids_crc": crc})
                step += 1
        sync(self.device)
        train_s = time.perf_counter() - t0
        acc, preds, dev_crcs = self._evaluate(tok, body["dev_texts"], body["dev_labels"], bs, max_len)
        return {"losses": np.asarray(losses, np.float32), "ids_crc": np.asarray(crcs, np.int64),
                "steps": step, "train_seconds": train_s, "acc": acc, "preds": preds,
                "dev_ids_crc": np.asarray(dev_crcs, np.int64), "dropout_calls": calls}

    def _evaluate(self, tok: Any, texts: list[str], labels: Any, bs: int, max_len: int
                  ) -> tuple[float, np.ndarray, list[int]]:
        """Dev accuracy, the predictions, and each dev batch's input-ids crc (tokenization checked too)."""
        from . import models
        model = self._need_model()
        model.eval()
        preds, crcs = [], []
        with torch.no_grad():
            for start in range(0, len(texts), bs):
                enc = encode_batch(tok, texts[start:start + bs], max_len)
                crcs.append(zlib.crc32(enc["input_ids"].tobytes()))
                inputs = {k: from_numpy(v, self.device) for k, v in enc.items()}
                logits = models.forward(model, self.model_info, inputs)["logits"]
                preds.append(to_numpy(logits.argmax(-1)))
        p = np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, np.int64)
        y = np.asarray(labels, dtype=np.int64)
        return (float((p == y).mean()) if len(y) else 0.0), p, crcs

    def op_perf(self, body: dict, ctx: Any) -> dict:
        """Time full training steps (forward, backward, update) on one batch after warm-up."""
        st = self._train_state()
        inputs = {k: from_numpy(v, self.device) for k, v in body["inputs"].items()}
        labels = from_numpy(body["labels"], self.device)
        times = []
        for i in range(int(body["warmup"]) + int(body["steps"])):
            sync(self.device)
            t0 = time.perf_counter()
            self._loss(inputs, labels)
            st["opt"].step()
            st["opt"].zero_grad(set_to_none=True)
            sync(self.device)
            if i >= int(body["warmup"]):
                times.append(time.perf_counter() - t0)
            st["dropout"].log.take()
        self._need_model().eval()
        return {"times": np.asarray(times, np.float64), "samples": int(labels.shape[0]),
                "threads": torch.get_num_threads()}


OPS = (TrainOps,)


def training_loss(outputs: dict, labels: Any, info: dict, models_mod: Any, model: Any, inputs: dict, ce: Any) -> Any:
    """BERT presets: cross-entropy on logits. Factory models: the factory's ``loss(outputs, batch)``
    when it gave one, else cross-entropy on the model's only output (``output``/``logits``)."""
    if info.get("kind") == "factory":
        extras = models_mod.factory_extras(model)
        if extras is not None and extras.loss is not None:
            return extras.loss(outputs, dict(inputs, labels=labels))
        if "logits" not in outputs and len(outputs) != 1:
            raise ValueError(f"factory model returns {sorted(outputs)}: give the factory a 'loss' "
                             f"(see protocol/factory.py) so backward/train know what to minimise")
    logits = outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))
    return ce(logits, labels)
