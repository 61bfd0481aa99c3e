"""What the ``layers`` step and ``coordinator debug`` share: the layer map, a live capture,
and the replay that tells a layer's own error from an inherited one.

Replay needs torch's input of the layer. Rather than holding every layer's input for the
whole run, it is fetched again when needed: torch repeats the forward (deterministic, one
module captured) and sends just that input (and, for backward, that module's output
gradient). The layer then runs alone on both sides with that same input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .advice import advice_for
from .compare import top_differences
from .layerdiff import ROOT_NAME, LayerTolerance, LiveDiff, Row, compare_row
from .layermap import LayerMap, LayerPair, build, load_override
from .runner import RunContext

FORWARD_TOL = LayerTolerance(5e-6, 1e-4)    # correct MiniLM: <= 2e-6 per layer; ln_eps 1e-5: 2e-5
BACKWARD_TOL = LayerTolerance(1e-4, 1e-4)   # correct MiniLM: <= 2.5e-5 (small bias gradients)


def tolerances(rc: RunContext) -> tuple[LayerTolerance, LayerTolerance]:
    """``--tolerance layers=rel:T`` (forward) and ``layers.backward=rel:T``; the method is always
    the normalized max (max|diff| / max|torch|, with the phase's floor), so ``max:T`` (accepted,
    the older spelling) means the same; the command line refuses mean/min here."""
    from .compare import Tolerance
    f = rc.tol("layers", Tolerance(FORWARD_TOL.threshold, "max"))
    b = rc.tol("layers.backward", Tolerance(BACKWARD_TOL.threshold, "max"))
    return LayerTolerance(f.threshold, FORWARD_TOL.floor_frac), LayerTolerance(b.threshold, BACKWARD_TOL.floor_frac)


def layer_map(rc: RunContext) -> LayerMap:
    """Both module trees + the weight map (+ the ``layer_map`` override file), once per run."""
    if "layer_map" in rc.cache:
        return rc.cache["layer_map"]
    t = rc.session.request("torch", "module_tree", {})["modules"]
    p = rc.session.request("paddle", "module_tree", {})["modules"]
    path = rc.param("layer_map")
    lmap = build(t, p, rc.weight_map, load_override(path) if path else None)
    rc.cache["layer_map"] = lmap
    return lmap


def seeded_labels(rc: RunContext, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The backward pass's labels (``steps.common.training_labels``; a factory's own come first)."""
    from .steps.common import training_labels
    return training_labels(rc, inputs, seed_offset=3)


@dataclass
class Capture:
    diff: LiveDiff
    replies: tuple[Any, Any]
    stats: dict[str, Any] = field(default_factory=dict)


def diff_threads(requested: int, cores: int | None = None) -> int:
    """Threads comparing one large tensor: ``layers_diff_threads`` when set, else 1 on hosts of up
    to 4 cores (both frameworks need them; on 2, two threads were slower) and a quarter of the cores,
    at most 8, above that (16 cores: 4; bench/RESULTS.md)."""
    if requested > 0:
        return requested
    cores = cores or os.cpu_count() or 1
    return 1 if cores <= 4 else min(8, max(2, cores // 4))


def capture(rc: RunContext, lmap: LayerMap, inputs: dict[str, np.ndarray], tol: LayerTolerance, *,
            backward: bool = False, labels: np.ndarray | None = None, on_row: Callable[[Row], None] | None = None,
            stop_at_first: bool = False, keep: Callable[[Row], bool] | None = None) -> Capture:
    """One ``capture_layers`` request per worker (the run's schedule), compared live."""
    budget = int(float(rc.param("layers_hold_mib")) * (1 << 20))
    ld = LiveDiff(lmap, lambda what, typ: tol, on_row, weight_map=rc.weight_map, hold_budget=budget,
                  spill_dir=rc.out, stop_at_first=stop_at_first, keep=keep,
                  threads=diff_threads(int(rc.param("layers_diff_threads"))))
    body: dict[str, Any] = {"inputs": inputs, "backward": backward}
    if backward:
        body.update(labels=labels, forward_events=False, param_grads=True)
    tbody = dict(body, modules=[p.torch for p in lmap.pairs])
    pbody = dict(body, modules=[p.paddle for p in lmap.pairs])
    try:
        replies = rc.both("capture_layers", tbody, pbody, on_partial=ld.feed, pace=int(rc.param("layers_pace")))
    finally:
        stats = ld.finish()
    stats["worker_seconds"] = {"torch": replies[0].get("seconds"), "paddle": replies[1].get("seconds")}
    stats["hook_seconds"] = {"torch": replies[0].get("hook_seconds"), "paddle": replies[1].get("hook_seconds")}
    # tensors a worker's framework copied straight into the shared ring (torch_worker.adapter.to_wire)
    stats["direct_copies"] = {"torch": replies[0].get("direct_copies", 0), "paddle": replies[1].get("direct_copies", 0)}
    if backward:
        stats["loss"] = {"torch": replies[0].get("loss"), "paddle": replies[1].get("loss")}
    return Capture(ld, replies, stats)


def replay_target(lmap: LayerMap, row: Row, executed: set[str]) -> tuple[LayerPair | None, str]:
    """The pair to run alone for a row, and what that proves.

    An output or gradient row replays its own layer. An input row (functional code between
    layers: attention core, residual add) has no layer of its own: the innermost mapped
    layer around it is replayed instead.
    """
    if row.what == "param_grad":
        owner = row.torch.rsplit(".", 1)[0] if "." in row.torch else ""
        pair = lmap.t2p.get(owner)
        return pair, f"the layer owning {row.torch}"
    if row.what in ("output", "grad"):
        return lmap.t2p.get(row.torch), "the layer itself"
    for anc in lmap.mapped_ancestors(row.torch):
        if anc.torch in executed:
            return anc, f"the innermost mapped layer around {row.torch}'s input"
    return None, "no enclosing mapped layer"


def fetch_torch(rc: RunContext, module: str, inputs: dict[str, np.ndarray], labels: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    """torch's input (and output gradient, with ``labels``) of one module, by repeating the pass."""
    got: dict[str, np.ndarray] = {}

    def on_partial(worker: str, ev: dict[str, Any]) -> None:
        if ev.get("module") == module and "tensor" in ev and ev.get("ev") in ("in", "grad"):
            got.setdefault({"in": "input", "grad": "grad"}[ev["ev"]], ev["tensor"])
    body: dict[str, Any] = {"inputs": inputs, "modules": [module], "backward": labels is not None}
    if labels is not None:
        body.update(labels=labels, param_grads=False, forward_events=True)
    rc.session.request("torch", "capture_layers", body, on_partial=on_partial)
    if "input" not in got:
        raise RuntimeError(f"torch module {module!r} was not executed (or took no tensor input) on repeat")
    return got


def replay(rc: RunContext, lmap: LayerMap, row: Row, inputs: dict[str, np.ndarray], tol: LayerTolerance,
           executed: set[str], labels: np.ndarray | None = None, earlier: list[Row] | None = None,
           floor: float = 0.0) -> dict[str, Any]:
    """Run the row's layer alone on torch's input on both sides; classify own vs inherited.

    ``earlier``: the rows that must not be run again (forward: the rows before this one; backward:
    the forward rows and the other backward rows). A replayed container (the model itself, a block,
    the layer enclosing an input row) runs its sublayers again, so a difference it shows is the
    row's own only if none of its sublayers already failed; a backward replay also runs them
    forward, so their forward rows count too. ``floor``: the live comparison's floor for the phase
    (``LayerTolerance.floor_frac`` x the phase's largest tensor), so a tensor that is mathematically
    zero (attention's key bias gradient, ~1e-10 of noise) is judged as the live row was."""
    pair, what = replay_target(lmap, row, executed)
    if pair is None:
        return {"verdict": "unknown", "why": f"cannot replay {row.label}: {what}"}
    if row.what != "param_grad":
        inside = [r for r in earlier or [] if not r.passed and (r.phase == row.phase or row.phase == "backward")
                  and r.what != "param_grad"
                  and r.torch != pair.torch and (pair.torch == "" or r.torch.startswith(pair.torch + "."))]
        if inside:
            return {"verdict": "inherited", "layer": pair.torch, "paddle_layer": pair.paddle, "replayed": what,
                    "phase": row.phase, "checks": [],
                    "why": (f"replaying {pair.torch or ROOT_NAME} would run {inside[0].label} again, which already "
                            f"differs ({inside[0].phase}): that difference reaches {row.label}; replay "
                            f"{inside[0].label} instead (goto it)")}
    backward = row.phase == "backward"
    got = fetch_torch(rc, pair.torch, inputs, labels if backward else None)
    body: dict[str, Any] = {"input": got["input"]}
    probe = row.what == "input" and not backward
    if backward:
        if "grad" not in got:
            return {"verdict": "unknown", "layer": pair.torch, "why": f"torch {pair.torch} got no output gradient"}
        body["grad_output"] = got["grad"]
    consumer = lmap.t2p[row.torch] if probe else None
    t = rc.session.request("torch", "replay", dict(body, module=pair.torch, probe=consumer.torch if probe else None))
    p = rc.session.request("paddle", "replay", dict(body, module=pair.paddle, probe=consumer.paddle if probe else None))
    checks = _replay_checks(rc, pair, t, p, tol, backward, floor)
    if probe and t.get("probe_input") is not None and p.get("probe_input") is not None:
        # the verdict is on the input itself: the functional code inside the replayed block
        probe_row = compare_row(Row("forward", "input", f"{row.torch or ROOT_NAME} <input> (inside the replayed "
                                    f"{pair.torch or ROOT_NAME})",
                                    row.torch, consumer.paddle, row.torch_type, row.paddle_type),
                                t["probe_input"], p["probe_input"], tol, floor)
        checks = [probe_row] + [c for c in checks]
        decisive = [probe_row]
    else:
        decisive = checks
    own = [c for c in decisive if not c.passed]
    out: dict[str, Any] = {"layer": pair.torch, "paddle_layer": pair.paddle, "replayed": what,
                           "phase": row.phase, "checks": [c.to_json() for c in checks],
                           "verdict": "own" if own else ("inherited" if not row.passed else "ok")}
    worst = max(decisive, key=lambda c: c.norm_err if np.isfinite(c.norm_err) else float("inf"))
    out["replay_norm_err"], out["replay_max_abs"] = worst.norm_err, worst.max_abs
    if own:
        if pair.torch:
            out["why"] = (f"run alone on torch's input, paddle's {pair.paddle or ROOT_NAME} differs from torch's "
                          f"{pair.torch} by {worst.norm_err:.2e} of max|torch| ({worst.what}): the layer itself "
                          f"computes differently")
        else:   # the innermost mapped layer around the row is the model: its own forward() code
            out["why"] = (f"run alone on torch's input, the two models differ by {worst.norm_err:.2e} of max|torch| "
                          f"({worst.what}) while every mapped layer inside agrees up to here: look at the code "
                          f"in the model's own forward() around {row.label} (operations between layers: "
                          f"reshapes, masks, scaling, functional calls)")
        settings = {}   # the two layers' own settings (an epsilon, a flag): often the bug itself
        for side, mods, name in (("torch", lmap.torch_modules, pair.torch), ("paddle", lmap.paddle_modules, pair.paddle)):
            mod = mods.get(name) or {}
            if isinstance(mod.get("settings"), str) and mod["settings"]:
                settings[side] = f"{mod.get('type', '')}({mod['settings']})"
        if settings:
            out["settings"] = settings
        adv = advice_for(*_advice_keys(lmap, row, pair))
        if adv is None and row.what == "output" and lmap.torch_modules.get(pair.torch, {}).get("children"):
            adv = advice_for("container")   # a block of its own type: the code between its sublayers
        crossed = (rc.cache.get("automap") or {}).get("order_notes")
        if crossed and (row.what == "input" or adv is None or adv.get("kind") == "container"):
            adv = dict(adv or {"kind": "mapping", "causes": []})   # the code between layers uses what order paired
            adv["causes"] = list(adv["causes"]) + [
                f"the automatic mapping paired interchangeable modules by order alone ({crossed[0]}): if the port "
                f"computes them in another order they are crossed; pair them in [keys] (automap.toml)"]
        if adv:
            out["advice"] = adv
    elif row.passed:
        out["why"] = f"run alone on torch's input, both sides agree to {worst.norm_err:.1e} of max|torch|"
    else:
        out["why"] = (f"run alone on torch's input, both sides agree to {worst.norm_err:.1e} of max|torch|: "
                      f"the layer is right, its input (or gradient) was already off")
    return out


def suspects(rows: list[Row], i: int, cleared: set[tuple[str, str]], forward_rows: list[Row] | None = None
             ) -> list[Row]:
    """What a replay of ``rows[i]``'s block must not run again (``replay``'s ``earlier``): the rows
    before it, and for a backward row every other row of its phase plus the forward rows (in
    backward, a block's gradient comes before its sublayers', and its replay runs them forward
    too), less those a replay has shown to agree run alone (``cleared``: (phase, key))."""
    r = rows[i]
    pool = rows[:i] if r.phase == "forward" else (list(forward_rows or []) + [e for j, e in enumerate(rows) if j != i])
    return [e for e in pool if (e.phase, e.key) not in cleared]


def own_walk(rc: RunContext, lmap: LayerMap, rows: list[Row], start: int, inputs: dict[str, np.ndarray],
             tol_for: Callable[[str], LayerTolerance], labels: np.ndarray | None, executed: set[str],
             cleared: set[tuple[str, str]], forward_rows: list[Row] | None = None,
             floor_for: Callable[[str], float] = lambda phase: 0.0):
    """Replay each divergent row after ``rows[start]``, in order: yields (index, row, isolation), or
    (index, row, exception) for a replay that failed (a layer that cannot run alone). A row shown
    to agree run alone is added to ``cleared``, so a block holding only such rows is replayed
    rather than assumed inherited. Ctrl-C and dead or hung workers propagate."""
    from .errors import Interrupted, ProtocolMismatch, WorkerDied, WorkerHung
    for i in range(start + 1, len(rows)):
        r = rows[i]
        if r.passed:
            continue
        try:
            iso = replay(rc, lmap, r, inputs, tol_for(r.phase), executed,
                         labels if r.phase == "backward" else None,
                         earlier=suspects(rows, i, cleared, forward_rows), floor=floor_for(r.phase))
        except (Interrupted, WorkerDied, WorkerHung, ProtocolMismatch):
            raise
        except Exception as exc:
            yield i, r, exc
            continue
        if iso.get("verdict") == "inherited" and iso.get("replay_norm_err") is not None:
            cleared.add((r.phase, r.key))
        yield i, r, iso


def _replay_checks(rc: RunContext, pair: LayerPair, t: dict, p: dict, tol: LayerTolerance,
                   backward: bool, floor: float = 0.0) -> list[Row]:
    phase = "backward" if backward else "forward"
    checks = [compare_row(Row(phase, "output", f"{pair.torch or ROOT_NAME} (replay output)", pair.torch, pair.paddle,
                              pair.torch_type, pair.paddle_type), t["output"], p["output"], tol, floor)]
    if not backward:
        return checks
    if t.get("grad_input") is not None and p.get("grad_input") is not None:
        checks.append(compare_row(Row(phase, "grad", f"{pair.torch or ROOT_NAME} (replay input gradient)", pair.torch,
                                      pair.paddle, pair.torch_type, pair.paddle_type),
                                  t["grad_input"], p["grad_input"], tol, floor))
    for local, g in (t.get("param_grads") or {}).items():
        full = f"{pair.torch}.{local}" if pair.torch else local
        for pname, parr, _ in rc.weight_map.convert_one(full, g):
            plocal = pname[len(pair.paddle) + 1:] if pair.paddle else pname
            theirs = (p.get("param_grads") or {}).get(plocal)
            if theirs is not None:
                checks.append(compare_row(Row(phase, "param_grad", f"param:{pname} (replay)", full, pname,
                                              pair.torch_type, pair.paddle_type), parr, theirs, tol, floor))
    return checks


def _advice_keys(lmap: LayerMap, row: Row, pair: LayerPair) -> list[str]:
    """Advice for an input row is about the code that made the input; else about the layer."""
    if row.what == "input":
        made = [lmap.torch_modules.get(m, {}).get("type", "") for m in row.made_by]
        keys = [k for k in made if k]
        if row.torch_type.lower() in ("layernorm", "rmsnorm"):
            keys.append("input:residual")
        elif any("attention" in k.lower() for k in keys) or "attention" in row.torch:
            keys.append("input:attention")
        return keys + [pair.torch_type, pair.paddle_type]
    return [row.torch_type, row.paddle_type]


def top(row_tensors: tuple[np.ndarray, np.ndarray] | None, k: int = 5) -> list[dict[str, Any]]:
    if row_tensors is None:
        return []
    return top_differences(row_tensors[0], row_tensors[1], k)


def describe_first(row: Row, iso: dict[str, Any] | None) -> str:
    """One paragraph for the terminal and the report."""
    text = (f"first divergent layer ({row.phase}): {row.label} [{row.torch_type}] <-> {row.paddle or ROOT_NAME}: "
            f"{row.reason}")
    if iso:
        verdict = {"own": "OWN ERROR", "inherited": "inherited", "ok": "agrees",
                   "unknown": "not isolated"}.get(iso["verdict"], iso["verdict"])
        text += f"\n  isolated: {verdict}: {iso.get('why', '')}"
        for side, shown in (iso.get("settings") or {}).items():
            text += f"\n    {side:6s} {shown}"
        for c in (iso.get("advice") or {}).get("causes", []):
            text += f"\n    - usual cause: {c}"
    return text
