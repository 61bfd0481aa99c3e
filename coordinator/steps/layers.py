"""Step ``layers``: every mapped layer compared live, forward then one backward pass.

Both workers stream each layer's output (and, where no mapped layer made it, its input)
as it is computed; the coordinator compares each pair the moment both halves are here and
drops it. The first divergent layer is replayed alone on torch's input on both sides to
tell its OWN error (the layer computes differently) from an INHERITED one (its input was
already off), with the usual causes for its kind (``coordinator/advice.toml``).

Parameters: ``layers_backward`` (default on: one backward pass, cross-entropy on seeded
labels, dropout off), ``layer_map`` (TOML override of the automatic pairing),
``layers_hold_mib`` (memory for tensors waiting for their counterpart; the rest spills to
disk). Tolerances: ``--tolerance layers=rel:5e-6`` (forward) and
``layers.backward=rel:1e-4``, on max|diff| / max|torch| (see docs/layers.md).
``--stop-at-first`` ends the run at the first divergent layer. ``layers_isolate=all`` replays
every divergent row after the first too and reports each layer that is wrong by itself (a
second bug behind the first), as the debugger's ``continue own`` does.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..errors import WorkerFailed
from ..layerdiff import ROOT_NAME, Row
from ..layerrun import (capture, describe_first, layer_map, own_walk, replay, seeded_labels, suspects, tolerances,
                        top)
from ..layerview import LayerView
from ..runner import RunContext, StepResult
from .common import ensure_converted, gen_inputs


def run(rc: RunContext) -> StepResult:
    ensure_converted(rc)
    lmap = layer_map(rc)
    fwd_tol, bwd_tol = tolerances(rc)
    inputs = gen_inputs(rc)
    stop = bool(rc.opts.stop_at_first)
    hows = Counter(p.how for p in lmap.pairs)
    n_un = lmap.to_json()["n_unmapped"]
    rc.say(f"  {len(lmap.pairs)} layer pairs ({', '.join(f'{v} by {k}' for k, v in hows.items())}); "
           f"unmapped: {n_un['torch']} torch, {n_un['paddle']} paddle (listed in the report)")
    details: dict[str, Any] = {"tolerance": {"forward": fwd_tol.describe(), "backward": bwd_tol.describe()},
                               "map": lmap.to_json(), "stop_at_first": stop}
    failures: list[str] = []
    with LayerView(rc.say) as view:
        fwd = capture(rc, lmap, inputs, fwd_tol, on_row=view.on_row, stop_at_first=stop)
    fwd_rows = fwd.diff.ordered("forward")
    details["forward"] = _phase(rc, lmap, fwd, inputs, fwd_tol, None, failures)
    ran_backward = bool(rc.param("layers_backward")) and not (stop and failures)
    if ran_backward:
        labels = seeded_labels(rc, inputs)
        factory = rc.model_info["torch"].get("kind") == "factory"
        rc.say("  backward: one pass, " + ("the factory's loss (or cross-entropy on its single output)"
                                           if factory else "cross-entropy on seeded labels") + ", dropout off")
        try:
            with LayerView(rc.say) as view:
                bwd = capture(rc, lmap, inputs, bwd_tol, backward=True, labels=labels, on_row=view.on_row,
                              stop_at_first=stop)
        except WorkerFailed as exc:
            hint = "--param layers_backward=false compares the forward pass alone"
            if not failures:
                rc.say(f"  the backward pass failed in a worker; {hint}")
                raise
            # the forward diagnosis is what the user needs: keep it, say why backward is missing
            details["backward"] = {"error": str(exc).splitlines()[0], "hint": hint}
            failures.append(f"backward: not compared, the pass failed in a worker ({hint}): "
                            f"{str(exc).splitlines()[0]}")
        else:
            details["backward"] = _phase(rc, lmap, bwd, inputs, bwd_tol, labels, failures, fwd_rows)
    else:
        details["backward"] = {"skipped": "layers_backward is off" if not rc.param("layers_backward") else
                               "stopped at the first divergence (--stop-at-first)"}
    rows = [r for ph in ("forward", "backward") for r in details.get(ph, {}).get("rows", [])]
    _write_tsv(rc, rows)
    # the worst figure of the rows that failed, in either phase (else of every row): a backward
    # failure is not hidden behind a clean forward pass
    failing = [r for r in rows if r.get("norm_err") is not None and not r.get("passed", True)]
    finite = failing or [r for r in rows if r.get("norm_err") is not None]
    top = max(finite, key=lambda r: r["norm_err"]) if finite else None
    worst = top["norm_err"] if top else None
    if top:   # the verdict table says which phase and row the figure is (the two tolerances differ)
        details["worst_of"] = {"phase": top["phase"], "row": top["torch"] or "<model>", "what": top["what"]}
    passed = not failures
    details["stop_run"] = stop and not passed
    if passed:
        msg = (f"{details['forward']['compared']} forward"
               + (f" and {details['backward']['compared']} backward" if ran_backward else "")
               + f" layer tensors within tolerance (forward {fwd_tol.describe()}"
               + (f"; backward {bwd_tol.threshold:g}" if ran_backward else "") + ")")
    else:
        msg = failures[0]
    tolerance = f"forward {fwd_tol.describe()}; backward {bwd_tol.describe()}" if ran_backward else fwd_tol.describe()
    return StepResult("layers", passed, worst, tolerance, msg, [], details)


def _phase(rc: RunContext, lmap: Any, cap: Any, inputs: dict, tol: Any, labels: Any,
           failures: list[str], forward_rows: list[Row] | None = None) -> dict[str, Any]:
    """Summarize one capture; replay its first divergence (``layers_isolate=all``: and every
    divergent row after it); append failure messages."""
    ld = cap.diff
    phase = "backward" if labels is not None else "forward"
    rows = ld.ordered(phase)
    out: dict[str, Any] = {"rows": [r.to_json() for r in rows], "compared": len(rows),
                           "failed": sum(1 for r in rows if not r.passed), "stats": cap.stats}
    sides = {side: [x for x in cap.stats.get(f"only_{side}", []) if "output" in x or "grad" in x]
             for side in ("torch", "paddle")}
    missing = sides["torch"] + sides["paddle"]
    if missing and not ld.stopped:
        # A module that ran on one side only: torch's nn.MultiheadAttention applies out_proj's
        # weights functionally (its hook never fires) where paddle calls its out_proj; a port that
        # skips an identity layer. Not a divergence by itself: whatever it changes shows in the
        # rows after it. Only a phase that compared nothing at all fails on it.
        out["one_side_only"] = {s: v for s, v in sides.items() if v}
        said = "; ".join(f"{len(v)} from {s} only (the other side never ran it as a layer), first: {v[0]}"
                         for s, v in sides.items() if v)
        if rows:
            out["note"] = f"not compared: {said}"
            print(f"  note ({phase}): not compared: {said}", flush=True)
        else:
            failures.append(f"{phase}: no layer pair was compared; {said}")
    first: Row | None = ld.first.get(phase)
    floor = tol.floor_frac * ld.phase_scale.get(phase, 0.0)   # as the live rows were judged
    if first is not None:
        f = first.to_json()
        f["top"] = top(ld.tensors(first), 5)
        try:
            iso = replay(rc, lmap, first, inputs, tol, ld.executed, labels, floor=floor,
                         earlier=suspects(rows, rows.index(first), set(), forward_rows))
        except Exception as exc:  # isolation is a diagnosis: report, do not lose the comparison
            iso = {"verdict": "unknown", "why": f"replay failed: {type(exc).__name__}: {exc}"}
        f["isolation"] = iso
        out["first"] = f
        print(describe_first(first, iso), flush=True)   # unwrapped: names and advice stay on their lines
        verdict = {"own": "own error", "inherited": "inherited"}.get(iso.get("verdict"), "not isolated")
        more = ""
        if rc.param("layers_isolate") == "all":
            out["own_errors"] = _all_own(rc, lmap, ld, rows, rows.index(first), inputs, tol, labels, forward_rows,
                                         phase)
            if out["own_errors"]:
                more = (f"; {len(out['own_errors'])} more own error(s) after it: "
                        + ", ".join(e["label"] for e in out["own_errors"][:5]))
        failures.insert(0 if phase == "forward" else len(failures),
                        f"first divergent layer ({phase}): {first.label} [{first.torch_type}] "
                        f"({verdict}): {first.reason}{more}")
    ld.close()
    return out


def _all_own(rc: RunContext, lmap: Any, ld: Any, rows: list[Row], start: int, inputs: dict, tol: Any,
             labels: Any, forward_rows: list[Row] | None, phase: str) -> list[dict[str, Any]]:
    """``layers_isolate=all``: every divergent row after the first is replayed; the layers wrong by
    themselves are returned (label, row, isolation), the rest counted in one line."""
    found: list[dict[str, Any]] = []
    counts: Counter = Counter()
    rc.say(f"  isolating every divergent {phase} row after the first ({sum(1 for r in rows[start + 1:] if not r.passed)})"
           f" ...")
    floor = tol.floor_frac * ld.phase_scale.get(phase, 0.0)
    for _i, r, iso in own_walk(rc, lmap, rows, start, inputs, lambda _ph: tol, labels, ld.executed, set(),
                               forward_rows if phase == "backward" else None, lambda _ph: floor):
        if isinstance(iso, Exception):
            iso = {"verdict": "unknown", "why": f"replay failed: {type(iso).__name__}: {iso}"}
        counts[iso.get("verdict")] += 1
        if iso.get("verdict") in ("own", "unknown"):
            found.append({"label": r.label, "row": r.to_json(), "isolation": iso})
            print(describe_first(r, iso).replace("first divergent layer", "also divergent", 1), flush=True)
    rc.say(f"  {phase}: after the first, {counts['inherited']} inherited, {counts['own']} own error(s)"
           + (f", {counts['unknown']} not isolated" if counts["unknown"] else ""))
    return found


def _write_tsv(rc: RunContext, rows: list[dict[str, Any]]) -> None:
    """layers.tsv: one line per compared tensor, for grep and spreadsheets. ``n`` numbers the rows
    within their phase as report.html does; ``seq`` is the worker's event number."""
    cols = ("phase", "n", "what", "seq", "torch", "paddle", "torch_type", "shape", "max_abs", "norm_err",
            "tolerance", "passed")
    n: Counter = Counter()
    with open(rc.out / "layers.tsv", "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            n[r.get("phase")] += 1
            cell = {c: r.get(c, "") for c in cols}
            cell["n"] = n[r.get("phase")]
            for side in ("torch", "paddle"):
                if cell[side] == "":
                    cell[side] = ROOT_NAME   # the model itself, as the terminal and report.html name it
            f.write("\t".join(str(cell[c]) for c in cols) + "\n")
