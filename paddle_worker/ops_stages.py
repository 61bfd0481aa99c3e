"""Metric, loss and learning-rate ops (the migration guide's stages 5.1, 5.2 and 5.4), paddle side.

Each op computes what the guide's PaddlePaddle code does: ``paddle.metric.Accuracy``
(compute / update / accumulate), ``paddle.nn.CrossEntropyLoss`` on the model's logits,
and PaddleNLP's ``LinearDecayWithWarmup`` / ``CosineDecayWithWarmup`` / ``PolyDecayWithWarmup``
handed to an optimizer (paddle builds the scheduler first, then the optimizer).

Cosine: HF's ``get_cosine_schedule_with_warmup`` is half a cosine wave (``num_cycles=0.5``).
PaddleNLP's ``CosineDecayWithWarmup`` defaults to ``num_cycles=1`` -- a *full* wave, the lr
climbs back to its peak by the last step -- and refuses a fractional ``num_cycles`` without
hard restarts. ``with_hard_restarts=True, num_cycles=1.0`` computes exactly HF's curve
(``0.5 * (1 + cos(pi * progress))``); that is the ``matched`` variant. ``guide`` is the
migration guide's literal call with the defaults (the source of its "cosine" gap).

Injects owned here (negative controls): ``metric_argmin``, ``label_shift``, ``warmup_offby1``,
``lr_step_early`` (see torch_worker/ops_stages.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from . import models as _models
from .adapter import from_numpy, to_numpy

INJECTS = ("metric_argmin", "label_shift", "warmup_offby1", "lr_step_early")
_models.OP_INJECTS.update(INJECTS)  # the model builder leaves these to this module


def _injects(adapter: Any, body: dict) -> set[str]:
    return set(body.get("inject") or adapter.inject)


def build_scheduler(name: str, lr: float, total: int, warmup: int, cosine: str = "matched") -> tuple[Any, str]:
    """The PaddleNLP scheduler for an HF schedule name, and the call that built it (for the report)."""
    from paddlenlp.transformers import CosineDecayWithWarmup, LinearDecayWithWarmup, PolyDecayWithWarmup
    args = f"learning_rate={lr:g}, total_steps={total}, warmup={warmup}"
    if name == "linear":
        return LinearDecayWithWarmup(lr, total, warmup), f"LinearDecayWithWarmup({args})"
    if name == "polynomial":
        return PolyDecayWithWarmup(lr, total, warmup), f"PolyDecayWithWarmup({args})"
    if name == "cosine" and cosine == "guide":
        return CosineDecayWithWarmup(lr, total, warmup), f"CosineDecayWithWarmup({args})"
    if name == "cosine":
        return (CosineDecayWithWarmup(lr, total, warmup, with_hard_restarts=True, num_cycles=1.0),
                f"CosineDecayWithWarmup({args}, with_hard_restarts=True, num_cycles=1.0)")
    raise ValueError(f"no PaddleNLP scheduler for schedule {name!r} (known: linear, cosine, polynomial)")


class StageOps:
    def op_metric(self, body: dict, ctx: Any) -> dict:
        """paddle.metric.Accuracy: compute() per batch, update(), accumulate() at the end."""
        inject = _injects(self, body)
        metric = paddle.metric.Accuracy()
        metric.reset()
        per_batch = []
        for logits, labels in zip(body["logits"], body["labels"]):
            lt = paddle.to_tensor(np.array(logits))
            if "metric_argmin" in inject:
                lt = -lt  # top-1 of the negated logits is the argmin
            correct = metric.compute(lt, paddle.to_tensor(np.array(labels)))
            per_batch.append(float(metric.update(correct)))
        return {"accuracy": np.array([float(metric.accumulate())], dtype=np.float64),
                "batch_accuracy": np.array(per_batch, dtype=np.float64)}

    def op_loss(self, body: dict, ctx: Any) -> dict:
        """Eval-mode forward on the given batch, then paddle.nn.CrossEntropyLoss on its logits."""
        from . import models
        inject = _injects(self, body)
        model = self._need_model()
        model.eval()
        inputs = {k: from_numpy(v) for k, v in body["inputs"].items()}
        if self.model_info.get("kind") == "factory":   # labels as the factory declared them (any dtype)
            return self._factory_loss(model, inputs, from_numpy(np.asarray(body["labels"])))
        labels = paddle.to_tensor(np.asarray(body["labels"], dtype=np.int64))
        if "label_shift" in inject:
            labels = paddle.roll(labels, 1)
        with paddle.no_grad():
            logits = models.forward(model, self.model_info, inputs)["logits"]
            loss = paddle.nn.CrossEntropyLoss()(logits, labels)
            per_sample = paddle.nn.CrossEntropyLoss(reduction="none")(logits, labels)
        return {"loss": to_numpy(loss.reshape([1])), "loss_per_sample": to_numpy(per_sample.reshape([-1])),
                "logits": to_numpy(logits)}

    def _factory_loss(self, model: Any, inputs: dict, labels: Any) -> dict:
        """A factory model's training loss (its own ``loss``, else cross-entropy on its single
        output, as backward uses it), eval mode, no grad; with the named outputs it was taken on."""
        from . import models
        from .ops_train import training_loss
        with paddle.no_grad():
            outputs = models.forward(model, self.model_info, inputs)
            loss = training_loss(outputs, labels, self.model_info, models, model, inputs,
                                 paddle.nn.functional.cross_entropy)
        return {"loss": to_numpy(paddle.to_tensor(loss).reshape([1])),
                "outputs": {k: to_numpy(v) for k, v in outputs.items()}}

    def op_lr_schedule(self, body: dict, ctx: Any) -> dict:
        """The lr the optimizer uses at every update k = 0 .. total_steps-1, per PaddleNLP schedule.

        Sampled from ``optimizer.get_lr()`` before update k, then ``scheduler.step()`` after it.
        """
        inject = _injects(self, body)
        lr, warmup, total = float(body["lr"]), int(body["warmup"]), int(body["total_steps"])
        if "warmup_offby1" in inject:
            warmup += 1
        out, calls = {}, {}
        for name in body["schedules"]:
            sched, calls[name] = build_scheduler(name, lr, total, warmup, body.get("cosine", "matched"))
            opt = paddle.optimizer.AdamW(learning_rate=sched, parameters=paddle.nn.Linear(1, 1).parameters())
            if "lr_step_early" in inject:
                sched.step()
            values = []
            for _ in range(total):
                values.append(float(opt.get_lr()))
                sched.step()
            out[name] = np.array(values, dtype=np.float64)
        return {"lr": out, "calls": calls}


OPS = (StageOps,)
