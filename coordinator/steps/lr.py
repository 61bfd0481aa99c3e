"""Step ``lr`` (guide 5.4): warmup schedules, compared at every update.

Torch builds ``transformers.get_scheduler(name, AdamW(dummy, lr), warmup, total)``; paddle
builds the PaddleNLP scheduler (``LinearDecayWithWarmup``, ``CosineDecayWithWarmup``,
``PolyDecayWithWarmup``) and hands it to an AdamW. Element ``k`` of ``<schedule>_lr`` is the
lr the optimizer applies at update ``k`` (k = 0 .. total_steps-1): read from the optimizer
before the update, the scheduler stepped after it, on both sides. (The guide logs the value
after ``i+1`` scheduler steps under the name ``step_i``; its step ``i`` is our ``k = i + 1``.)

Each schedule has its own tolerance, so a known allowance on one never loosens another:
``--tolerance lr.cosine=max:1e-12`` sets one, ``--tolerance lr=max:...`` all of them.
Measured here (CPU, lr 3e-5, warmup 345, 1024 steps): all three bit-identical, max diff 0.

The guide's cosine "float-precision gap" (9.4e-6 .. 1.9e-5 at steps 500..900) is not float
precision: PaddleNLP's ``CosineDecayWithWarmup`` defaults to a full cosine wave, HF to half
a wave. ``--param lr_cosine=guide`` reproduces it; the default ``matched`` call
(``with_hard_restarts=True, num_cycles=1.0``) computes HF's curve exactly.
"""

from __future__ import annotations

import numpy as np

from ..compare import TensorDiff, Tolerance, compare
from ..errors import UsageError
from ..runner import RunContext, StepResult
from ._stages import bodies
from .common import finish

KNOWN = ("linear", "cosine", "polynomial")
DEFAULTS = {"linear": Tolerance(0.0, "max"), "polynomial": Tolerance(0.0, "max"),
            "cosine": Tolerance(1e-15, "max")}
NOTES = {
    "linear": "pure float64 arithmetic on both sides: expected bit-identical",
    "polynomial": "pure float64 arithmetic on both sides: expected bit-identical",
    "cosine": ("known float-precision allowance 1e-15: math.cos may differ by one ulp between C libraries "
               "when the workers run on different hosts (about 3e-21 at lr 3e-5)"),
}
GUIDE_NOTE = ("NOT float precision: the guide's CosineDecayWithWarmup(lr, total, warmup) defaults to num_cycles=1, "
              "a full cosine wave (the lr climbs back to its peak by the last step), while HF's cosine is half a "
              "wave (num_cycles=0.5); PaddleNLP refuses num_cycles=0.5 without hard restarts. The equivalent call "
              "is CosineDecayWithWarmup(..., with_hard_restarts=True, num_cycles=1.0) (--param lr_cosine=matched)")
GUIDE_MILESTONES = (100, 300, 500, 700, 900)


def schedules(rc: RunContext) -> list[str]:
    names = [s.strip() for s in str(rc.param("schedules")).split(",") if s.strip()]
    unknown = [s for s in names if s not in KNOWN]
    if unknown or not names:
        raise UsageError(f"--param schedules={rc.param('schedules')!r}: unknown schedule(s) {unknown} "
                         f"(known: {', '.join(KNOWN)})")
    return names


def tolerances(rc: RunContext, names: list[str]) -> dict[str, Tolerance]:
    """``lr.<schedule>`` beats ``lr`` beats the per-schedule default; one method for the whole report."""
    out = {n: rc.tol(f"lr.{n}", rc.tol("lr", DEFAULTS[n])) for n in names}
    methods = {t.method for t in out.values()}
    if len(methods) > 1:
        raise UsageError(f"lr tolerances mix methods ({', '.join(f'{n}={t.describe()}' for n, t in out.items())}): "
                         f"use one method for every schedule")
    return out


def first_exceeding(ref: np.ndarray, got: np.ndarray, threshold: float) -> int | None:
    """The first update whose |lr diff| exceeds the threshold (a NaN/Inf always does)."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    bad = ~(diff <= threshold)
    return int(np.argmax(bad)) if bad.any() else None


def check_schedule(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> tuple[TensorDiff, dict]:
    d = compare(f"{name}_lr", ref, got, tol)
    info: dict = {"tolerance": tol.describe(), "max_abs": d.max_abs, "max_rel": d.max_rel, "passed": d.passed}
    if ref.shape != got.shape:
        return d, info
    if d.worst_index:
        k = d.worst_index[0]
        info["worst_step"] = {"step": k, "torch": float(ref[k]), "paddle": float(got[k])}
    first = first_exceeding(ref, got, tol.threshold)
    info["first_step_exceeding"] = first
    if first is not None:
        info["first_exceeding"] = {"step": first, "torch": float(ref[first]), "paddle": float(got[first])}
        d.passed = False
        d.reason = (f"first update exceeding {tol.describe()} is step {first} (torch {ref[first]:.9g} vs "
                    f"paddle {got[first]:.9g}); max |diff| {d.max_abs:.3e}"
                    + (f" at step {d.worst_index[0]}" if d.worst_index else ""))
    return d, info


def guide_milestones(ref: np.ndarray, got: np.ndarray) -> dict[str, dict[str, float]]:
    """The guide's five check points, in its numbering (its step i = our update i + 1)."""
    return {f"step_{i}": {"torch": float(ref[i + 1]), "paddle": float(got[i + 1]),
                          "abs_diff": float(abs(ref[i + 1] - got[i + 1]))}
            for i in GUIDE_MILESTONES if i + 1 < len(ref)}


def run(rc: RunContext) -> StepResult:
    names = schedules(rc)
    lr, warmup, total = float(rc.param("lr")), int(rc.param("warmup")), int(rc.param("total_steps"))
    if total < 1 or not 0 <= warmup <= total:
        raise UsageError(f"lr step: need total_steps >= 1 and 0 <= warmup <= total_steps (got warmup {warmup}, "
                         f"total_steps {total})")
    cosine = str(rc.param("lr_cosine"))
    if cosine not in ("matched", "guide"):
        raise UsageError(f"--param lr_cosine={cosine!r}: use matched or guide")
    tols = tolerances(rc, names)
    body = {"lr": lr, "warmup": warmup, "total_steps": total, "schedules": names, "cosine": cosine}
    t, p = rc.both("lr_schedule", *bodies(rc, body))
    diffs, per = [], {}
    for name in names:
        ref, got = np.asarray(t["lr"][name]), np.asarray(p["lr"][name])
        d, info = check_schedule(name, ref, got, tols[name])
        info.update(torch_call=t["calls"][name], paddle_call=p["calls"][name],
                    note=GUIDE_NOTE if (name == "cosine" and cosine == "guide") else NOTES[name])
        if ref.shape == got.shape:
            info["guide_milestones"] = guide_milestones(ref, got)
        diffs.append(d)
        per[name] = info
        first = info.get("first_step_exceeding")
        rc.say(f"  {name:10s} max |diff| {d.max_abs:.3e}  {tols[name].describe():14s} "
               + ("ok" if d.passed else f"FAIL first at step {first}" if first is not None else f"FAIL {d.reason}"))
    details = {"lr": lr, "warmup": warmup, "total_steps": total, "cosine_variant": cosine,
               "sampling": "element k = lr the optimizer applies at update k (k = 0..total_steps-1); "
                           "read before the update, scheduler.step() after it, on both sides",
               "schedules": per}
    method = next(iter(tols.values())).method
    torch_d = {f"{n}_lr": np.asarray(t["lr"][n]) for n in names}
    paddle_d = {f"{n}_lr": np.asarray(p["lr"][n]) for n in names}
    result = finish(rc, "lr", torch_d, paddle_d, diffs, Tolerance(max(x.threshold for x in tols.values()), method),
                    details)
    result.tolerance = f"{method} <= " + ", ".join(f"{tols[n].threshold:g} ({n})" for n in names)
    failing = [d for d in diffs if not d.passed]
    if failing:
        result.message = "; ".join(f"{d.name[:-3]}: {d.reason}" for d in failing)
    else:
        result.message = f"{len(diffs)} schedules x {total} updates within tolerance ({result.tolerance})"
    return result
