"""Step ``loss`` (guide 5.2): CrossEntropy of each side's own forward logits on one batch.

Weights are converted and pushed first; both sides run their model (eval mode) on the
forward step's inputs when that step ran, else on freshly seeded ones, with labels the
coordinator draws (balanced classes in a seeded order, so that any shift of the labels
changes them). Torch applies ``torch.nn.CrossEntropyLoss``, paddle ``paddle.nn.CrossEntropyLoss``;
the mean loss and the per-sample losses are compared (default ``max <= 1e-6``).
"""

from __future__ import annotations

import numpy as np

from ..compare import Tolerance, compare
from ..runner import RunContext, StepResult
from ._stages import bodies
from .common import diff_dicts, ensure_converted, finish, gen_inputs

DEFAULT = Tolerance(1e-6, "max")
FORWARD = Tolerance(1e-5, "max")   # the forward step's default, to tell a model gap from a loss gap
SEED_OFFSET = 5201
NUM_LABELS = 2   # common.model_body loads every model with two labels


def gen_labels(seed: int, n: int, num_labels: int = NUM_LABELS) -> np.ndarray:
    """Every class present, in a seeded order: a shifted copy of these labels always differs."""
    base = np.arange(n) % num_labels
    return np.random.RandomState(seed + SEED_OFFSET).permutation(base).astype(np.int64)


def run(rc: RunContext) -> StepResult:
    ensure_converted(rc)
    cached = rc.cache.get("forward_outputs")
    inputs = cached[2] if cached else gen_inputs(rc)
    n = next(iter(inputs.values())).shape[0]
    if rc.model_info["torch"].get("kind") == "factory":
        labels = inputs["labels"] if "labels" in inputs else gen_labels(rc.opts.seed, n)
        return _factory(rc, inputs, labels, cached is not None)
    labels = gen_labels(rc.opts.seed, n)
    t, p = rc.both("loss", *bodies(rc, {"inputs": inputs, "labels": labels}))
    tol = rc.tol("loss", DEFAULT)
    logits = compare("logits", t.pop("logits"), p.pop("logits"), rc.tol("forward", FORWARD))
    diffs = diff_dicts(t, p, tol)
    tl, pl = float(t["loss"][0]), float(p["loss"][0])
    rc.say(f"  CrossEntropy torch {tl:.8f}  paddle {pl:.8f}  |diff| {abs(tl - pl):.3e}")
    details = {"inputs": "forward step's" if cached else "seeded (gen_inputs)",
               "input_shapes": {k: list(v.shape) for k, v in inputs.items()},
               "labels": labels.tolist(), "torch_loss": tl, "paddle_loss": pl, "abs_diff": abs(tl - pl),
               "torch": "torch.nn.CrossEntropyLoss()", "paddle": "paddle.nn.CrossEntropyLoss()",
               "logits": {"max_abs": logits.max_abs, "within_forward_tolerance": logits.passed,
                          "tolerance": logits.tolerance}}
    per = [d for d in diffs if d.name == "loss_per_sample"]
    note = ""
    if per and not per[0].passed and per[0].worst_index:
        i = per[0].worst_index[0]
        ts, ps = np.asarray(t["loss_per_sample"]), np.asarray(p["loss_per_sample"])
        bad = [int(j) for j in np.nonzero(~(np.abs(ts.astype(np.float64) - ps) <= tol.threshold))[0]]
        details["samples_differing"] = bad
        details["worst_sample"] = {"index": i, "label": int(labels[i]), "torch": float(ts[i]), "paddle": float(ps[i])}
        note = (f"loss torch {tl:.8f} vs paddle {pl:.8f}; per-sample losses differ at samples {bad} (worst: sample "
                f"{i}, label {int(labels[i])}: torch {ts[i]:.6f} vs paddle {ps[i]:.6f}); "
                + (f"the logits agree (max diff {logits.max_abs:.1e}), so look at the labels or the loss call; "
                   if logits.passed else f"the logits already differ ({logits.reason}): see the forward step; "))
    result = finish(rc, "loss", t, p, diffs, tol, details)
    if note:
        result.message = note + result.message
    elif result.passed:
        result.message = f"CrossEntropy torch {tl:.8f} vs paddle {pl:.8f} (|diff| {abs(tl - pl):.2e}); {result.message}"
    return result


def _factory(rc: RunContext, inputs: dict, labels: np.ndarray, from_forward: bool) -> StepResult:
    """A factory model: its own loss (or cross-entropy on its single output, as backward
    trains on), eval mode; the outputs it was taken on are checked at the forward tolerance
    so that a loss gap is told apart from a model gap."""
    t, p = rc.both("loss", {"inputs": inputs, "labels": labels}, {"inputs": inputs, "labels": labels})
    tol = rc.tol("loss", DEFAULT)
    outputs = diff_dicts(t.pop("outputs"), p.pop("outputs"), rc.tol("forward", FORWARD))
    diffs = diff_dicts(t, p, tol)
    tl, pl = float(t["loss"][0]), float(p["loss"][0])
    which = "the factory's loss" if rc.model_info["torch"].get("loss") else "cross-entropy on the single output"
    rc.say(f"  {which}: torch {tl:.8f}  paddle {pl:.8f}  |diff| {abs(tl - pl):.3e}")
    bad = [d for d in outputs if not d.passed]
    details = {"inputs": "forward step's" if from_forward else "seeded (gen_inputs)", "loss": which,
               "input_shapes": {k: list(v.shape) for k, v in inputs.items()},
               "labels": "the model's labels input" if "labels" in inputs else "seeded (0/1)",
               "torch_loss": tl, "paddle_loss": pl, "abs_diff": abs(tl - pl),
               "outputs": {d.name: {"max_abs": d.max_abs, "within_forward_tolerance": d.passed} for d in outputs}}
    result = finish(rc, "loss", t, p, diffs, tol, details)
    if not result.passed:
        result.message = (f"loss torch {tl:.8f} vs paddle {pl:.8f}; " +
                          (f"the outputs already differ ({bad[0].name}: {bad[0].reason}): see the forward step; "
                           if bad else "the outputs agree, so look at the loss function or the labels; ")
                          + result.message)
    else:
        result.message = f"{which}: torch {tl:.8f} vs paddle {pl:.8f} (|diff| {abs(tl - pl):.2e}); {result.message}"
    return result
