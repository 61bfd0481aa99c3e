"""What the training steps (backward, train, perf) share: optimizer setup on both sides,
dropout mode, converting torch-named tensors to paddle names, restoring pristine weights.

A leading underscore keeps this module out of the step registry (only names in ORDER load).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..compare import TensorDiff, Tolerance, compare
from ..errors import Interrupted, ProtocolMismatch, UsageError, WorkerDied, WorkerHung
from ..runner import RunContext, StepResult
from .common import ensure_converted

DROPOUT_MODES = ("off", "shared", "native")

DROPOUT_NOTE = {
    "off": "dropout switched off while training (every dropout call is the identity, as in eval mode); "
           "use --dropout shared to train with dropout on and identical masks",
    "shared": "dropout ON with shared masks: both sides draw each keep-mask from one seeded numpy generator "
              "keyed by (seed, forward step, dropout call index, shape)",
    "native": "dropout ON with each framework's own RNG: masks differ, results are not expected to match",
}


def dropout_mode(rc: RunContext) -> str:
    mode = str(rc.param("dropout"))
    if mode not in DROPOUT_MODES:
        raise UsageError(f"--dropout {mode!r}: use off, shared (or --param dropout=native for a control)")
    return mode


OPTIMIZERS = ("adamw", "adam", "sgd")
RECIPE_KEYS = {"type", "lr", "weight_decay", "eps", "betas", "momentum", "no_decay"}
PARAM_OF = {"lr": "lr", "weight_decay": "weight_decay", "eps": "adam_eps"}  # recipe key -> --param


def optim_config(rc: RunContext, lr: float) -> dict[str, Any]:
    """What both workers build: the guide's AdamW (``--param lr/weight_decay/adam_eps``), or a
    factory model's optimizer recipe, with any of those ``--param`` given explicitly on top."""
    cfg: dict[str, Any] = {"type": "adamw", "lr": float(lr), "weight_decay": float(rc.param("weight_decay")),
                           "eps": float(rc.param("adam_eps"))}
    recipe = factory_recipe(rc)
    if recipe:
        # What the recipe leaves out is torch.optim's default for that optimizer (a plain
        # parameter list: every parameter decayed), not the guide's BERT recipe.
        cfg.update(weight_decay=0.01 if recipe["type"] == "adamw" else 0.0, eps=1e-8, betas=[0.9, 0.999],
                   no_decay=[])
        cfg.update({k: v for k, v in recipe.items() if PARAM_OF.get(k) not in rc.opts.params_given})
    return cfg


def factory_recipe(rc: RunContext) -> dict[str, Any] | None:
    """The torch factory's optimizer recipe (plain data), checked; None for presets and when
    the factory gave none. A callable optimizer cannot be run identically on both sides: said
    once, and the guide's AdamW is used."""
    tinfo = rc.model_info.get("torch") or {}
    if tinfo.get("kind") != "factory":
        return None
    recipe = tinfo.get("optimizer")
    if recipe is None:
        recipe = (rc.model_info.get("paddle") or {}).get("optimizer")
    if recipe is None or recipe == "callable":
        if recipe == "callable" and not rc.cache.get("callable_optimizer_said"):
            rc.cache["callable_optimizer_said"] = True
            rc.say(f"  note: factory {tinfo.get('factory')!r} gives its optimizer as a callable, which lockstep cannot "
                   f"build identically on both sides; using the guide's AdamW (give a recipe dict to choose)")
        return None
    where = f"factory {tinfo.get('factory')!r}: optimizer recipe"
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise UsageError(f"{where} has unknown key(s) {unknown} (known: {sorted(RECIPE_KEYS)})")
    kind = str(recipe.get("type", "adamw")).lower()
    if kind not in OPTIMIZERS:
        raise UsageError(f"{where} type {recipe.get('type')!r} is not supported (known: {', '.join(OPTIMIZERS)})")
    out: dict[str, Any] = {"type": kind}
    try:
        for k in ("lr", "weight_decay", "eps", "momentum"):
            if recipe.get(k) is not None:
                out[k] = float(recipe[k])
        if recipe.get("betas") is not None:
            b1, b2 = (float(b) for b in recipe["betas"])
            out["betas"] = [b1, b2]
        if recipe.get("no_decay") is not None:
            nd = recipe["no_decay"]
            out["no_decay"] = [nd] if isinstance(nd, str) else [str(x) for x in nd]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where} {recipe!r:.200}: {exc}") from None
    if out.get("momentum") and kind != "sgd":
        raise UsageError(f"{where}: 'momentum' applies to sgd, not {kind}")
    return out


def describe_optim(cfg: dict[str, Any]) -> str:
    kind = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}[cfg.get("type", "adamw")]
    extra = f", momentum {cfg['momentum']:g}" if cfg.get("momentum") else ""
    return f"{kind} iterations (lr {cfg['lr']:g}, wd {cfg['weight_decay']:g}{extra}"


def setup_both(rc: RunContext, lr: float, dropout: str) -> tuple[dict, dict, TensorDiff]:
    """Fresh optimizers on both sides; returns their reports and a check of the decay groups.

    The decay groups are chosen by name patterns that differ between the frameworks
    (torch ``LayerNorm.weight`` vs paddle ``norm``), so the check maps torch's names to
    paddle's and names every parameter whose weight decay differs.
    """
    body = {"optim": optim_config(rc, lr), "dropout": dropout, "seed": rc.opts.seed}
    rc.cache["optim"] = body["optim"]
    rc.both("weights_snapshot", {}, at_once=True)   # each worker keeps its pristine weights for restore_weights
    rc.cache["weights_snapshot"] = True
    paddle_recipe = (rc.model_info.get("paddle") or {}).get("optimizer")
    own_patterns = isinstance(paddle_recipe, dict) and paddle_recipe.get("no_decay") is not None
    if (rc.model_info.get("torch") or {}).get("kind") == "factory" and not own_patterns:
        # An own-model pair: the recipe's name patterns were written for torch's names (the
        # port may call its LayerNorm anything), so paddle decays exactly what torch decays,
        # by the mapping; a paddle factory's own `no_decay` patterns are used (and checked) instead.
        t = rc.session.request("torch", "train_setup", body)
        names = sorted(paddle_param_names(rc, t["decay"]))
        p = rc.session.request("paddle", "train_setup", dict(body, optim=dict(body["optim"], decay_names=names)))
    else:
        if own_patterns:
            pbody = dict(body, optim=dict(body["optim"], no_decay=list(paddle_recipe["no_decay"])))
            t, p = rc.both("train_setup", body, pbody)
        else:
            t, p = rc.both("train_setup", body)
    t_decay = paddle_param_names(rc, t["decay"])
    p_decay = set(p["decay"])
    only_t, only_p = sorted(t_decay - p_decay), sorted(p_decay - t_decay)
    if (only_t or only_p) and float(t.get("weight_decay", 1.0)) == 0.0 == float(p.get("weight_decay", 1.0)):
        only_t = only_p = []     # no weight decay at all: the groups cannot make a difference
    if only_t or only_p:
        parts = []
        if only_t:
            parts.append(f"{len(only_t)} decayed on torch only (first: {only_t[0]})")
        if only_p:
            parts.append(f"{len(only_p)} decayed on paddle only (first: {only_p[0]})")
        check = TensorDiff("decay_groups", False, reason="weight-decay groups differ: " + "; ".join(parts))
    else:
        check = TensorDiff("decay_groups", True, max_abs=0.0, mean_abs=0.0, min_abs=0.0, max_rel=0.0, value=0.0)
    return t, p, check


def paddle_param_names(rc: RunContext, torch_names: Any) -> set[str]:
    """Paddle's names for torch parameters, as the mapping converts them: renames, every part of a
    split, the merged key of a [[merge]] part; ignored keys drop out."""
    sd = rc.cache.get("torch_weights") or {}
    out: set[str] = set()
    for name in torch_names:
        if not rc.weight_map.ignored_source(name):
            out.update(rc.weight_map.target_names(name, np.ndim(sd[name]) if name in sd else None))
    return out


def to_paddle_names(rc: RunContext, tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    """Torch-named, torch-layout tensors (gradients, parameters) in paddle's names and layout."""
    out: dict[str, np.ndarray] = {}
    for key, arr in tensors.items():
        if rc.weight_map.ignored_source(key):
            continue
        for tkey, tarr, _ops in rc.weight_map.convert_one(key, arr, views=True):  # compared, never sent
            out[tkey] = tarr
    return out


def compare_named(kind: str, it: int, ref: dict[str, Any], got: dict[str, Any], tol: Tolerance
                  ) -> tuple[TensorDiff, list[TensorDiff]]:
    """Compare every tensor; summarise as one diff named ``<kind>_<it>`` carrying the worst
    (or first failing) parameter's statistics and name."""
    per = []
    for name in ref:
        if name not in got:
            per.append(TensorDiff(name, False, reason=f"{kind} of {name!r} missing on the paddle side"))
        else:
            per.append(compare(name, ref[name], got[name], tol))
    per += [TensorDiff(n, False, reason=f"{kind} of {n!r} missing on the torch side") for n in got if n not in ref]
    failing = [d for d in per if not d.passed]
    finite = [d for d in per if d.value == d.value]
    worst = max(finite, key=lambda d: d.value) if finite else (failing[0] if failing else None)
    pick = failing[0] if failing else worst
    summary = TensorDiff(f"{kind}_{it}", not failing, tolerance=tol.describe(), method=tol.method)
    if pick is not None:
        summary.max_abs, summary.mean_abs, summary.min_abs = pick.max_abs, pick.mean_abs, pick.min_abs
        summary.max_rel, summary.value, summary.shape = pick.max_rel, pick.value, pick.shape
        summary.ref_scale = pick.ref_scale
        summary.worst_index, summary.dtype = pick.worst_index, pick.dtype
    # (TensorDiff is falsy when it failed: test against None, never truthiness)
    summary.extra = {"param": pick.name if pick is not None else None, "failing": len(failing), "of": len(per),
                     "worst_param": worst.name if worst is not None else None,
                     "worst_max_abs": worst.max_abs if worst is not None else None}
    if failing:
        summary.reason = (f"{len(failing)}/{len(per)} {kind}s exceed {tol.describe()}; first: "
                          f"{failing[0].name}: {failing[0].reason}")
        summary.value = failing[0].value
    return summary, per


def compare_dropout_calls(t_calls: list[dict], p_calls: list[dict], mode: str) -> str:
    """'' when both sides made the same dropout calls (and, shared, drew the same masks)."""
    if mode == "off" and not t_calls and not p_calls:
        return ""
    n = min(len(t_calls), len(p_calls))
    for i in range(n):
        t, p = t_calls[i], p_calls[i]
        if t["shape"] != p["shape"] or abs(t["p"] - p["p"]) > 1e-12:
            return (f"dropout call #{i} differs: torch shape {t['shape']} p={t['p']} vs paddle shape "
                    f"{p['shape']} p={p['p']} (calls are matched by order within a forward)")
        if mode == "shared" and t["crc"] != p["crc"]:
            native = [side for side, c in (("torch", t), ("paddle", p)) if c["crc"] == -1]
            why = f"{' and '.join(native)} used native dropout, not the shared mask" if native else \
                f"crc {t['crc']} vs {p['crc']}"
            return f"dropout call #{i} {t['shape']}: masks differ ({why})"
    if len(t_calls) != len(p_calls):
        return f"torch made {len(t_calls)} dropout calls per forward, paddle {len(p_calls)}"
    return ""


def run_then_restore(rc: RunContext, body: Callable[[RunContext], StepResult]) -> StepResult:
    """A training step: from the converted weights, and the pristine weights back afterwards."""
    ensure_converted(rc)
    try:
        result = body(rc)
    except (WorkerDied, WorkerHung, Interrupted, ProtocolMismatch, KeyboardInterrupt):
        raise   # a worker is gone or the run is stopping: a restore would only hide what happened
    except Exception:
        try:    # an op failed (or a coordinator bug): the workers live, later steps need the weights
            restore_weights(rc)
        except Exception as exc:
            rc.say(f"  (restoring the pristine weights failed too: {exc})")
        raise
    restore_weights(rc)
    return result


def restore_weights(rc: RunContext) -> None:
    """Put the pristine (pre-training) weights back on both sides for the steps that follow:
    from each worker's own snapshot (setup_both took it), else by sending them again."""
    if rc.cache.pop("weights_snapshot", False):
        rc.both("weights_restore", {}, at_once=True)
        return
    if "torch_weights" in rc.cache and "converted" in rc.cache:
        rc.session.request("torch", "set_weights", rc.cache["torch_weights"])
        rc.session.request("paddle", "set_weights", rc.cache["converted"])
