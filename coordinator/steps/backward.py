"""Step ``backward``: N AdamW iterations from identical weights on the same batch.

Per iteration both workers return the loss and the lr; at the iterations chosen by
``--param backward_tensors`` (default ``ends``: the first and the last) also every
gradient (read before the update) and every parameter after the update; torch's are
mapped to paddle names and layout, compared, and dropped (one request per iteration,
so memory stays at one iteration's tensors). The guide compares only the loss; a wrong
optimizer setting (eps, weight-decay groups) shows up in the parameters at the first
iteration, slow drift in the last one's. ``backward_tensors=all`` ships every tensor at
every iteration (2 x 87 MiB per side per iteration for MiniLM: the step's main cost).

Tolerances (absolute, measured on MiniLM-L6 CPU float32, see docs/training.md):
``--tolerance backward.loss=max:1e-5``, ``backward.grad=max:1e-5``,
``backward.param=max:5e-6``, ``backward.lr=max:0``; ``--tolerance backward=...``
sets grad and param at once.
"""

from __future__ import annotations

import json

import numpy as np

from ..compare import Tolerance, compare
from ..errors import UsageError
from ..runner import RunContext, StepResult
from ._training import (DROPOUT_NOTE, compare_dropout_calls, compare_named, describe_optim, dropout_mode,
                        run_then_restore, setup_both, to_paddle_names)
from .common import finish, gen_inputs, training_labels

DEFAULTS = {"loss": Tolerance(1e-5, "max"), "grad": Tolerance(1e-5, "max"), "param": Tolerance(5e-6, "max"),
            "lr": Tolerance(0.0, "max")}


GUIDE_LR = 3e-5   # the lr the default parameter tolerance was set for (docs/training.md)


def tolerances(rc: RunContext, optim: dict | None = None) -> dict[str, Tolerance]:
    """``backward.<kind>`` beats ``backward`` (grad and param only) beats the default.

    The default parameter tolerance grows with an Adam-type optimizer's lr above the guide's:
    Adam moves a parameter by about lr whatever its gradient's size, so two gradients that agree
    to 1e-8 but are both near zero can still move their parameter apart by a fraction of lr (a
    correct port at lr 5e-4 reaches 2e-5). The eps bug it is there to catch scales with lr too."""
    out = {}
    for kind, default in DEFAULTS.items():
        base = rc.tol("backward", default) if kind in ("grad", "param") else default
        out[kind] = rc.tol(f"backward.{kind}", base)
    given = {"backward", "backward.param"} & set(rc.opts.tolerances)
    lr = float((optim or {}).get("lr", 0.0))
    if not given and (optim or {}).get("type") in ("adam", "adamw") and lr > GUIDE_LR:
        out["param"] = Tolerance(DEFAULTS["param"].threshold * lr / GUIDE_LR, DEFAULTS["param"].method)
    return out


def batch(rc: RunContext) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The coordinator's seeded batch (the guide's fake data): ids like forward's, labels 0/1
    (a factory model's own ``labels`` input when it declares one)."""
    inputs = gen_inputs(rc, seed_offset=1)
    return inputs, training_labels(rc, inputs, seed_offset=2)


def _nbytes(tensors: dict | None) -> int:
    return sum(int(getattr(v, "nbytes", 0)) for v in (tensors or {}).values())


def tensor_iterations(spec: object, iters: int) -> set[int]:
    """Which iterations compare gradients and parameters (``--param backward_tensors``)."""
    text = str(spec).strip().lower()
    if text == "all":
        return set(range(iters))
    if text == "ends":
        return {0, iters - 1} if iters else set()
    try:
        chosen = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        chosen = None
    if not chosen or any(i < 0 or i >= iters for i in chosen):
        raise UsageError(f"--param backward_tensors={spec!r}: expected ends, all, or iteration numbers "
                         f"0..{iters - 1} separated by commas")
    return chosen


def run(rc: RunContext) -> StepResult:
    return run_then_restore(rc, _run)


def _run(rc: RunContext) -> StepResult:
    iters, mode = int(rc.param("iters")), dropout_mode(rc)
    checked = tensor_iterations(rc.param("backward_tensors"), iters)
    t_setup, p_setup, decay_check = setup_both(rc, float(rc.param("lr")), mode)
    tols = tolerances(rc, rc.cache["optim"])
    if tols["param"].threshold != DEFAULTS["param"].threshold and "backward.param" not in rc.opts.tolerances \
            and "backward" not in rc.opts.tolerances:
        rc.say(f"  parameter tolerance {tols['param'].threshold:.3g}: the default {DEFAULTS['param'].threshold:g} "
               f"scaled by lr {rc.cache['optim']['lr']:g} / {GUIDE_LR:g} (Adam moves parameters by ~lr)")
    inputs, labels = batch(rc)
    if checked:  # every gradient and parameter comes back at once: fault their pages in now, both sides
        rc.session.warm_rings({"torch": 2 * _nbytes(rc.cache.get("torch_weights")),
                               "paddle": 2 * _nbytes(rc.cache.get("converted"))})
    rc.say(f"  {iters} {describe_optim(rc.cache['optim'])}, "
           f"eps torch {t_setup['eps']:g} / paddle {p_setup['eps']:g}), "
           f"batch {tuple(next(iter(inputs.values())).shape)}, dropout {mode}; "
           f"gradients and parameters compared at iteration(s) {', '.join(map(str, sorted(checked))) or 'none'}")
    diffs, rows, t_npy, p_npy = [decay_check], [], {}, {}
    last_grad_d = None
    first_fail, dropout_problem = None, ""
    per_param = open(rc.out / "backward_params.jsonl", "w")
    try:
        for it in range(iters):
            want = ["grads", "params"] if it in checked else []
            t, p = rc.both("train_step", {"inputs": inputs, "labels": labels, "want": want})
            loss_d = compare(f"loss_{it}", np.float32(t["loss"]), np.float32(p["loss"]), tols["loss"])
            lr_d = compare(f"lr_{it}", np.float64(t["lr"]), np.float64(p["lr"]), tols["lr"])
            grad_d = par_d = None
            if want:
                grad_d, grads = compare_named("grad", it, to_paddle_names(rc, t.pop("grads")), p.pop("grads"),
                                              tols["grad"])
                par_d, params = compare_named("param", it, to_paddle_names(rc, t.pop("params")), p.pop("params"),
                                              tols["param"])
                for kind, per in (("grad", grads), ("param", params)):
                    for d in per:
                        per_param.write(json.dumps({"iter": it, "kind": kind, "param": d.name,
                                                    "max_abs": _f(d.max_abs), "mean_abs": _f(d.mean_abs),
                                                    "passed": d.passed}) + "\n")
                last_grad_d = grad_d
            problem = compare_dropout_calls(t["dropout_calls"], p["dropout_calls"], mode)
            dropout_problem = dropout_problem or (f"iteration {it}: {problem}" if problem else "")
            diffs += [d for d in (loss_d, lr_d, grad_d, par_d) if d is not None]
            t_npy[f"loss_{it}"], p_npy[f"loss_{it}"] = np.float32(t["loss"]), np.float32(p["loss"])
            t_npy[f"lr_{it}"], p_npy[f"lr_{it}"] = np.float64(t["lr"]), np.float64(p["lr"])
            row = _row(it, t, p, loss_d, grad_d, par_d)
            rows.append(row)
            tensors = (f"  grad max {row['grad_max']:.1e} [{row['grad_worst']}]  param max {row['param_max']:.1e}"
                       f" [{row['param_worst']}]") if want else ""
            rc.say(f"  iter {it}: loss {row['loss_torch']:.7f} vs {row['loss_paddle']:.7f} (diff {row['loss_diff']:.1e})"
                   + tensors + ("" if row["passed"] else "  FAIL"))
            if first_fail is None:
                bad = next((d for d in (loss_d, lr_d, grad_d, par_d) if d is not None and not d.passed), None)
                if bad is not None:
                    first_fail = f"iteration {it} ({bad.name}): {bad.reason}"
    finally:
        per_param.close()
    details = {"iterations": rows, "dropout": mode, "dropout_note": DROPOUT_NOTE[mode],
               "dropout_calls_per_forward": len(t.get("dropout_calls", [])) if iters else 0,
               "optimizer": {"torch": _opt(t_setup), "paddle": _opt(p_setup)},
               "tolerances": {k: v.describe() for k, v in tols.items()},
               "batch": {k: list(v.shape) for k, v in inputs.items()},
               "first_failure": first_fail, "tensor_iterations": sorted(checked)}
    extra = ""
    if not decay_check.passed:
        extra = decay_check.reason + (f"; first divergence: {first_fail}" if first_fail else "")
    elif dropout_problem:
        extra = dropout_problem + (f"; first divergence: {first_fail}" if first_fail else "")
    elif first_fail:
        extra = f"first divergence at {first_fail}"
    rc.say(f"  {DROPOUT_NOTE[mode]}")
    res = finish(rc, "backward", t_npy, p_npy, diffs, tols["loss"], details, extra_fail=extra)
    res.tolerance = ", ".join(f"{k} {v.describe()}" for k, v in tols.items())   # each kind has its own
    if res.passed:
        gmax = max((r["grad_max"] for r in rows if r["grad_max"] is not None), default=0.0)
        pmax = max((r["param_max"] for r in rows if r["param_max"] is not None), default=0.0)
        at = ", ".join(map(str, sorted(checked)))
        if not iters:
            res.message = "no iterations"
        elif last_grad_d is None:
            res.message = f"{iters} iterations: loss and lr within tolerance; dropout {mode}"
        else:
            res.message = (f"{iters} iterations: loss and lr within tolerance at every one; "
                           f"{last_grad_d.extra['of']} gradients and parameters at iteration(s) {at} "
                           f"(worst grad {gmax:.1e}, worst param {pmax:.1e}); dropout {mode}")
    return res


def _f(x: float) -> float | None:
    return float(x) if x == x else None


def _opt(info: dict) -> dict:
    return {k: info[k] for k in ("lr", "eps", "weight_decay", "dropout")} | {
        "type": info.get("type", "adamw"), "momentum": info.get("momentum", 0.0), "decayed": len(info["decay"]),
        "not_decayed": len(info["no_decay"])}


def _row(it: int, t: dict, p: dict, loss_d, grad_d, par_d) -> dict:
    """One iteration's line; gradient/parameter fields are None where they were not compared."""
    row = {"iter": it, "loss_torch": float(t["loss"]), "loss_paddle": float(p["loss"]),
           "loss_diff": abs(float(t["loss"]) - float(p["loss"])), "lr_torch": t["lr"], "lr_paddle": p["lr"],
           "grad_max": None, "grad_worst": None, "param_max": None, "param_worst": None,
           "grad_failing": None, "param_failing": None, "first_failing_grad": None, "first_failing_param": None,
           "passed": loss_d.passed}
    if grad_d is not None:
        row.update(grad_max=grad_d.extra["worst_max_abs"] or 0.0, grad_worst=grad_d.extra["worst_param"],
                   param_max=par_d.extra["worst_max_abs"] or 0.0, param_worst=par_d.extra["worst_param"],
                   grad_failing=grad_d.extra["failing"], param_failing=par_d.extra["failing"],
                   first_failing_grad=grad_d.extra["param"] if not grad_d.passed else None,
                   first_failing_param=par_d.extra["param"] if not par_d.passed else None,
                   passed=loss_d.passed and grad_d.passed and par_d.passed)
    return row
