"""The lockstep driver: start both workers, walk the requested steps, write the run directory.

Every step is a function ``step(rc) -> StepResult`` registered in ``coordinator.steps``.
The run directory gets each step's reprod_log files as the step finishes, an
``events.jsonl`` appended and flushed per step, and ``summary.json`` rewritten
atomically after every step, so a crash or Ctrl-C keeps everything already done.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .compare import TensorDiff, Tolerance
from .errors import ExitCode, LockstepError, UsageError
from .session import Session, WorkerSpec


@dataclass
class StepResult:
    name: str
    passed: bool
    worst: float | None = None          # the worst statistic the verdict was taken on
    tolerance: str = ""
    message: str = ""
    diffs: list[TensorDiff] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    status: str = ""                    # passed | failed | error | skipped

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status or ("passed" if self.passed else "failed"),
                "passed": self.passed, "worst": self.worst, "tolerance": self.tolerance,
                "message": self.message, "seconds": round(self.seconds, 3),
                "diffs": [d.to_json() for d in self.diffs], "details": _jsonable(self.details)}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x


@dataclass
class RunOptions:
    steps: list[str]
    out: Path
    seed: int = 0
    torch_model: str = "minilm"
    paddle_model: str = "minilm"
    model_path: str | None = None
    mapping: str | None = None
    paddle_inject: list[str] = field(default_factory=list)
    torch_inject: list[str] = field(default_factory=list)
    stop_at_first: bool = False
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    schedule: str = "auto"
    threads: int = 0
    env_set: str = "cpu"
    torch_device: str = "cpu"
    paddle_device: str = "cpu"
    fail_fast: bool = False
    params: dict[str, Any] = field(default_factory=dict)   # step hyper-parameters (lr, warmup, ...)
    worker_argv: dict[str, list[str]] = field(default_factory=dict)
    worker_env: dict[str, dict[str, str]] = field(default_factory=dict)
    deadlines: dict[str, float] = field(default_factory=dict)


class RunContext:
    """What steps share: the session, both workers' model info, converted weights, the run directory."""

    def __init__(self, opts: RunOptions, session: Session, say: Callable[[str], None]):
        self.opts = opts
        self.session = session
        self.say = say
        self.out = opts.out
        self.model_info: dict[str, dict] = {}
        self.conversions: list[Any] = []
        self.weight_map: Any = None
        self.converted = False
        self.cache: dict[str, Any] = {}

    def param(self, name: str) -> Any:
        from .params import DEFAULTS
        return self.opts.params.get(name, DEFAULTS[name])

    def tol(self, step: str, default: Tolerance) -> Tolerance:
        return self.opts.tolerances.get(step, default)

    def both(self, op: str, torch_body: Any = None, paddle_body: Any = None, on_partial=None,
             timeout: float | None = None) -> tuple[Any, Any]:
        """Run one op on both workers: at once (parallel) or in turns (alternate)."""
        pb = torch_body if paddle_body is None else paddle_body
        if self.session_schedule == "alternate":
            t = self.session.request("torch", op, torch_body, on_partial, timeout)
            p = self.session.request("paddle", op, pb, on_partial, timeout)
            return t, p
        r = self.session.request_many({"torch": (op, torch_body), "paddle": (op, pb)}, on_partial, timeout)
        return r["torch"], r["paddle"]

    @property
    def session_schedule(self) -> str:
        return self.cache.get("schedule", "parallel")


def choose_schedule(requested: str, torch_device: str, paddle_device: str, cores: int) -> tuple[str, str]:
    """Parallel when the workers do not compete for the same cores; turns on a small CPU box."""
    if requested in ("parallel", "alternate"):
        return requested, "requested"
    on_gpu = not torch_device.startswith("cpu") and not paddle_device.startswith("cpu")
    if on_gpu:
        return "parallel", "both workers on GPUs"
    if cores >= 8:
        return "parallel", f"{cores} cores: each worker gets half"
    return "alternate", f"{cores} CPU cores: workers take turns, each with all cores (measured faster than sharing)"


class Summary:
    """summary.json (atomic rewrite) + events.jsonl (append + flush per event)."""

    def __init__(self, out: Path, header: dict[str, Any]):
        self.out = out
        self.data: dict[str, Any] = dict(header, steps=[], status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.events = open(out / "events.jsonl", "a", buffering=1)
        self.write()

    def event(self, kind: str, **fields: Any) -> None:
        self.events.write(json.dumps(_jsonable(dict(kind=kind, t=time.time(), **fields))) + "\n")
        self.events.flush()
        os.fsync(self.events.fileno())

    def add_step(self, result: StepResult) -> None:
        self.data["steps"].append(result.to_json())
        self.event("step", **result.to_json())
        self.write()

    def write(self) -> None:
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(_jsonable(self.data), indent=1))
        tmp.replace(self.out / "summary.json")

    def close(self, status: str, exit_code: int, error: str | None = None) -> None:
        self.data.update(status=status, exit_code=exit_code, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if error:
            self.data["error"] = error
        self.write()
        self.event("end", status=status, exit_code=exit_code, error=error)
        self.events.close()


class Interrupted(Exception):
    pass


def run(opts: RunOptions, worker_specs: dict[str, WorkerSpec], say: Callable[[str], None],
        on_step: Callable[[StepResult], None] | None = None, header: dict[str, Any] | None = None
        ) -> tuple[int, Summary]:
    """Execute the steps; return (exit code, summary). Never leaves a worker process behind."""
    from .steps import STEPS
    unknown = [s for s in opts.steps if s not in STEPS]
    if unknown:
        raise UsageError(f"unknown step(s) {', '.join(unknown)} (known: {', '.join(STEPS)}, all)")
    opts.out.mkdir(parents=True, exist_ok=True)
    summary = Summary(opts.out, dict(header or {}, steps_requested=opts.steps))
    interrupted = {"count": 0}

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted["count"] += 1
        if interrupted["count"] >= 2:
            for h in session.workers.values():
                if h.proc is not None and h.proc.poll() is None:
                    h.proc.kill()
            os._exit(ExitCode.INTERRUPTED)
        raise Interrupted()

    old = signal.signal(signal.SIGINT, on_sigint)
    session = Session(opts.out, deadlines=opts.deadlines)
    code = ExitCode.ALIGNED
    try:
        for spec in worker_specs.values():
            session.launch(spec)
        say(f"waiting for workers ({', '.join(worker_specs)}) to say hello ...")
        hellos = session.wait_hello()
        summary.data["workers"] = hellos
        summary.event("hello", workers=hellos)
        for name, h in hellos.items():
            say(f"  {name}: {h.get('framework')} {h.get('framework_version')} on {h.get('device')} "
                f"(python {h.get('python')}, {h.get('executable')})")
        rc = RunContext(opts, session, say)
        sched, why = choose_schedule(opts.schedule, opts.torch_device, opts.paddle_device, os.cpu_count() or 1)
        rc.cache["schedule"] = sched
        summary.data["schedule"] = {"mode": sched, "why": why}
        say(f"schedule: {sched} ({why})")
        any_failed = False
        for name in opts.steps:
            say(f"step {name} ...")
            t0 = time.monotonic()
            try:
                result = STEPS[name](rc)
                result.status = "passed" if result.passed else "failed"
            except LockstepError:
                raise
            except Exception as exc:  # a bug in a step must not lose the steps already done
                import traceback
                result = StepResult(name, False, message=f"{type(exc).__name__}: {exc}", status="error",
                                    details={"traceback": traceback.format_exc()})
            result.seconds = time.monotonic() - t0
            summary.add_step(result)
            if on_step:
                on_step(result)
            if not result.passed:
                any_failed = True
                if opts.fail_fast:
                    break
        code = ExitCode.DIVERGED if any_failed else ExitCode.ALIGNED
        summary.close("diverged" if any_failed else "aligned", code)
    except Interrupted:
        code = ExitCode.INTERRUPTED
        summary.close("interrupted", code, "interrupted by Ctrl-C; steps completed before it are kept")
    except LockstepError as exc:
        code = exc.exit_code
        summary.close("error", code, str(exc))
        raise
    finally:
        signal.signal(signal.SIGINT, old)
        session.close()
    return code, summary
