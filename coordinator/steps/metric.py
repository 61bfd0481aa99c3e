"""Step ``metric`` (guide 5.1): the same seeded logits and labels, each side's accuracy.

The coordinator draws ``metric_batches`` batches of ``metric_batch`` logits (2 classes,
standard normal, float32) and labels from the run seed and sends the identical bytes to
both workers. Torch counts ``argmax == labels`` the way a PyTorch user would; paddle runs
``paddle.metric.Accuracy`` (compute / update / accumulate). Overall and per-batch accuracy
must be equal (default ``max <= 0``). No model is needed.
"""

from __future__ import annotations

import numpy as np

from ..compare import Tolerance
from ..runner import RunContext, StepResult
from ._stages import bodies
from .common import diff_dicts, finish

DEFAULT = Tolerance(0.0, "max")
SEED_OFFSET = 5101   # keeps these draws independent of the other steps' seeded inputs
NUM_CLASSES = 2


def gen_batches(seed: int, batches: int, batch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.RandomState(seed + SEED_OFFSET)
    logits, labels = [], []
    for _ in range(batches):
        logits.append(rng.standard_normal((batch, NUM_CLASSES)).astype(np.float32))
        labels.append(rng.randint(0, NUM_CLASSES, (batch,)).astype(np.int64))
    return logits, labels


def run(rc: RunContext) -> StepResult:
    n_batches, batch = int(rc.param("metric_batches")), int(rc.param("metric_batch"))
    logits, labels = gen_batches(rc.opts.seed, n_batches, batch)
    t, p = rc.both("metric", *bodies(rc, {"logits": logits, "labels": labels}))
    tol = rc.tol("metric", DEFAULT)
    diffs = diff_dicts(t, p, tol)
    ta, pa = float(t["accuracy"][0]), float(p["accuracy"][0])
    rc.say(f"  accuracy over {n_batches}x{batch}: torch {ta:.6f}  paddle {pa:.6f}  "
           f"{'ok' if all(d.passed for d in diffs) else 'FAIL'}")
    details = {"batches": n_batches, "batch_size": batch, "classes": NUM_CLASSES,
               "torch": {"accuracy": ta, "how": "argmax(logits) == labels, correct / total"},
               "paddle": {"accuracy": pa, "how": "paddle.metric.Accuracy compute/update/accumulate"}}
    bad = [i for i, (x, y) in enumerate(zip(t["batch_accuracy"], p["batch_accuracy"])) if x != y]
    if bad:
        details["first_differing_batch"] = {"batch": bad[0], "torch": float(t["batch_accuracy"][bad[0]]),
                                            "paddle": float(p["batch_accuracy"][bad[0]])}
    result = finish(rc, "metric", t, p, diffs, tol, details)
    if result.passed:
        result.message = f"accuracy {ta:.6f} on both sides ({n_batches}x{batch} seeded logits); {result.message}"
    if not result.passed and bad:
        result.message = (f"accuracy torch {ta:.6f} vs paddle {pa:.6f}; first differing batch {bad[0]} "
                          f"(torch {t['batch_accuracy'][bad[0]]:.6f} vs paddle {p['batch_accuracy'][bad[0]]:.6f}); "
                          + result.message)
    return result
