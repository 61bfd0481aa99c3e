"""Step ``forward``: identical seeded inputs, eval mode; compare every output the workers return."""

from __future__ import annotations

from ..compare import Tolerance
from ..runner import RunContext, StepResult
from .common import diff_dicts, ensure_converted, finish, gen_inputs

DEFAULT = Tolerance(1e-5, "max")


def run(rc: RunContext) -> StepResult:
    ensure_converted(rc)
    inputs = gen_inputs(rc)
    t_out, p_out = rc.both("forward", {"inputs": inputs})
    rc.cache["forward_outputs"] = (t_out, p_out, inputs)
    tol = rc.tol("forward", DEFAULT)
    diffs = diff_dicts(t_out, p_out, tol)
    for d in diffs:
        rel = f"  rel {d.value:.3e}" if d.method == "rel" else ""
        rc.say(f"  {d.name:12s} max {d.max_abs:.3e}  mean {d.mean_abs:.3e}{rel}  {'ok' if d.passed else 'FAIL ' + d.reason}")
    details = {"inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in inputs.items()}}
    return finish(rc, "forward", t_out, p_out, diffs, tol, details)
