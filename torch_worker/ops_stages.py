"""Metric, loss and learning-rate ops (the migration guide's stages 5.1, 5.2 and 5.4), torch side.

Each op computes what a PyTorch/HF user would write: accuracy as ``argmax == labels`` counted
over all batches, ``torch.nn.CrossEntropyLoss`` on the model's logits, and
``transformers.get_scheduler(name, optimizer, ...)`` stepped once per update.

Injects owned here (negative controls): ``metric_argmin`` (predict with argmin),
``label_shift`` (labels rolled by one position before the loss), ``warmup_offby1``
(warmup + 1 steps), ``lr_step_early`` (scheduler stepped once before the first update).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import models as _models
from .adapter import from_numpy, to_numpy

INJECTS = ("metric_argmin", "label_shift", "warmup_offby1", "lr_step_early")
_models.OP_INJECTS.update(INJECTS)  # load_model refuses names no module registered


def _injects(adapter: Any, body: dict) -> set[str]:
    return set(body.get("inject") or adapter.inject)


class StageOps:
    def op_metric(self, body: dict, ctx: Any) -> dict:
        """Accuracy over all batches: correct predictions counted per batch, divided by the total."""
        inject = _injects(self, body)
        correct = total = 0
        per_batch = []
        for logits, labels in zip(body["logits"], body["labels"]):
            lt, yt = torch.from_numpy(np.array(logits)), torch.from_numpy(np.array(labels))
            preds = lt.argmin(dim=-1) if "metric_argmin" in inject else lt.argmax(dim=-1)
            c = int((preds == yt).sum().item())
            correct, total = correct + c, total + int(yt.numel())
            per_batch.append(c / int(yt.numel()))
        return {"accuracy": np.array([correct / total], dtype=np.float64),
                "batch_accuracy": np.array(per_batch, dtype=np.float64)}

    def op_loss(self, body: dict, ctx: Any) -> dict:
        """Eval-mode forward on the given batch, then CrossEntropyLoss on its logits and labels."""
        from . import models
        inject = _injects(self, body)
        model = self._need_model()
        model.eval()
        inputs = {k: from_numpy(v, self.device) for k, v in body["inputs"].items()}
        if self.model_info.get("kind") == "factory":   # labels as the factory declared them (any dtype)
            return self._factory_loss(model, inputs, from_numpy(np.asarray(body["labels"]), self.device))
        labels = from_numpy(np.asarray(body["labels"], dtype=np.int64), self.device)
        if "label_shift" in inject:
            labels = torch.roll(labels, 1)
        with torch.no_grad():
            logits = models.forward(model, self.model_info, inputs)["logits"]
            loss = torch.nn.CrossEntropyLoss()(logits, labels)
            per_sample = torch.nn.CrossEntropyLoss(reduction="none")(logits, labels)
        return {"loss": to_numpy(loss.reshape(1)), "loss_per_sample": to_numpy(per_sample),
                "logits": to_numpy(logits)}

    def _factory_loss(self, model: Any, inputs: dict, labels: Any) -> dict:
        """A factory model's training loss (its own ``loss``, else cross-entropy on its single
        output, as backward uses it), eval mode, no grad; with the named outputs it was taken on."""
        from . import models
        from .ops_train import training_loss
        with torch.no_grad():
            outputs = models.forward(model, self.model_info, inputs)
            loss = training_loss(outputs, labels, self.model_info, models, model, inputs,
                                 torch.nn.functional.cross_entropy)
        return {"loss": to_numpy(torch.as_tensor(loss).reshape(1)),
                "outputs": {k: to_numpy(v) for k, v in outputs.items()}}

    def op_lr_schedule(self, body: dict, ctx: Any) -> dict:
        """The lr the optimizer uses at every update k = 0 .. total_steps-1, per HF schedule.

        Sampled from ``optimizer.param_groups[0]["lr"]`` before update k, then
        ``optimizer.step(); scheduler.step()`` in the order HF's Trainer uses.
        """
        import warnings

        from transformers import get_scheduler
        inject = _injects(self, body)
        lr, warmup, total = float(body["lr"]), int(body["warmup"]), int(body["total_steps"])
        if "warmup_offby1" in inject:
            warmup += 1
        out, calls = {}, {}
        for name in body["schedules"]:
            param = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.AdamW([param], lr=lr)
            sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
            calls[name] = (f"transformers.get_scheduler({name!r}, AdamW(lr={lr:g}), num_warmup_steps={warmup}, "
                           f"num_training_steps={total})")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                if "lr_step_early" in inject:
                    sched.step()
                values = []
                for _ in range(total):
                    values.append(float(opt.param_groups[0]["lr"]))
                    opt.step()          # no gradient: a no-op update, kept for the real call order
                    sched.step()
            out[name] = np.array(values, dtype=np.float64)
        return {"lr": out, "calls": calls}


OPS = (StageOps,)
