"""Step ``weights``: convert torch's state dict with the mapping, push it, read it back bit-for-bit."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..compare import Tolerance, compare
from ..runner import RunContext, StepResult
from .common import ensure_converted, finish


def run(rc: RunContext) -> StepResult:
    converted = ensure_converted(rc)
    back = rc.session.request("paddle", "get_weights", {"keys": list(converted)})
    tol = Tolerance(0.0, "max")  # a round trip must be exact
    diffs = [compare(k, converted[k], back.get(k, np.array([])), tol) for k in converted]
    pd_path = rc.out / "model_state.pdparams"
    saved = rc.session.request("paddle", "save_weights", {"path": str(pd_path)})
    mapped = {r.target: {"torch": r.source, "ops": r.ops} for r in rc.conversions}
    n_t = len(rc.cache["torch_weights"])
    ignored = [k for k in rc.cache["torch_weights"] if rc.weight_map.ignored_source(k)]
    sources = {src for r in rc.conversions for src in r.source.split(" + ")}   # a merge's parts
    ops = Counter(op.split("(")[0] for r in rc.conversions for op in r.ops)
    merged = sum(1 for r in rc.conversions if " + " in r.source)
    if merged:
        ops["merge"] = merged
    details = {"mapping": rc.weight_map.origin, "torch_keys": n_t, "paddle_keys": len(converted),
               "ignored_torch_keys": ignored, "transposed": sum(1 for r in rc.conversions if r.ops),
               "operations": dict(ops), "pdparams": saved, "keys": mapped}
    past = {"transpose": "transposed", "reshape": "reshaped", "split": "from splits", "cast": "cast", "merge": "merged"}
    how = ", ".join(f"{n} {past.get(op, op)}" for op, n in sorted(ops.items())) or "none transformed"
    rc.say(f"  {len(sources)}/{n_t - len(ignored)} torch tensors mapped to {len(converted)} paddle tensors "
           f"({how}), saved {pd_path.name}")
    npy = bool(rc.param("weights_npy"))
    if not npy:
        details["npy"] = "not written (--param weights_npy=false)"
    return finish(rc, "weights", {k: converted[k] for k in converted}, back, diffs, tol, details, npy=npy)
