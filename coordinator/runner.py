"""The lockstep driver: start both workers, walk the requested steps, write the run directory.

Every step is a function ``step(rc) -> StepResult`` registered in ``coordinator.steps``.
The run directory gets each step's reprod_log files as the step finishes, an
``events.jsonl`` appended and flushed per step, and ``summary.json`` rewritten
atomically after every step, so a crash or Ctrl-C keeps everything already done.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .compare import TensorDiff, Tolerance
from .errors import ExitCode, Interrupted, LockstepError, UsageError
from .session import Session, WorkerSpec, lock_run_dir


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
    worker_seconds: dict[str, float] = field(default_factory=dict)  # each worker's handler time in it

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status or ("passed" if self.passed else "failed"),
                "passed": self.passed, "worst": self.worst, "tolerance": self.tolerance,
                "message": self.message, "seconds": round(self.seconds, 3),
                "worker_seconds": {n: round(v, 3) for n, v in self.worker_seconds.items()},
                "diffs": [d.to_json() for d in self.diffs], "details": _jsonable(self.details)}


def _first_layer(details: dict[str, Any]) -> dict[str, Any]:
    """The layers step's first failing row (forward before backward) as label and reason."""
    for phase in ("forward", "backward"):
        first = (details.get(phase) or {}).get("first") if isinstance(details.get(phase), dict) else None
        if isinstance(first, dict) and first.get("key"):
            return {"label": f"{phase} {first['what']} {first['torch']} <-> {first['paddle']}",
                    "reason": first.get("reason")}
    return {}


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
    torch_path: list[str] = field(default_factory=list)    # sys.path dirs for a torch factory module
    paddle_path: list[str] = field(default_factory=list)   # sys.path dirs for a paddle factory module
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
    params_given: set[str] = field(default_factory=set)    # those set on the command line (not defaults)
    worker_argv: dict[str, list[str]] = field(default_factory=dict)
    worker_env: dict[str, dict[str, str]] = field(default_factory=dict)
    deadlines: dict[str, float] = field(default_factory=dict)
    interrupt_grace: float = 10.0   # after the first Ctrl-C, how long the op in flight may still run
    listen: str | None = None       # bind here and wait for remote workers instead of launching local ones
    allow_shared_gpu: bool = False  # let both workers use one physical GPU (checked again on HELLO UUIDs)


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
             timeout: float | None = None, pace: int = 0, at_once: bool = False) -> tuple[Any, Any]:
        """Run one op on both workers: at once (parallel) or in turns (alternate).

        ``pace``: in parallel, neither worker streams more than that many partials ahead of the
        other (Session.request_many); in turns there is nothing to keep pace with.
        ``at_once``: a short memory-bound op (weight snapshots): both at once whatever the
        schedule, since turns exist to keep the frameworks' compute threads apart."""
        pb = torch_body if paddle_body is None else paddle_body
        if self.session_schedule == "alternate" and not at_once:
            t = self.session.request("torch", op, torch_body, on_partial, timeout)
            p = self.session.request("paddle", op, pb, on_partial, timeout)
            return t, p
        r = self.session.request_many({"torch": (op, torch_body), "paddle": (op, pb)}, on_partial, timeout,
                                      pace=pace)
        return r["torch"], r["paddle"]

    @property
    def session_schedule(self) -> str:
        return self.cache.get("schedule", "parallel")


def choose_schedule(requested: str, torch_device: str, paddle_device: str, cores: int,
                    same_host: bool = True) -> tuple[str, str]:
    """Parallel when the workers do not compete for the same cores; turns on a small CPU box."""
    if requested in ("parallel", "alternate"):
        return requested, "requested"
    if not same_host:
        return "parallel", "workers on different hosts"
    on_gpu = not torch_device.startswith("cpu") and not paddle_device.startswith("cpu")
    if on_gpu:
        return "parallel", "both workers on GPUs"
    if cores >= 8:
        return "parallel", f"{cores} cores: each worker gets half"
    return "alternate", f"{cores} CPU cores: workers take turns, each with all cores (measured faster than sharing)"


def worker_threads(schedule: str, cores: int, requested: int = 0) -> dict[str, int]:
    """Threads per worker: all cores each when they take turns, half each when they run at once.

    Two workers each using every core at the same time oversubscribe the machine and
    both slow down; ``--threads N`` overrides (the user knows their box).
    """
    cores = max(1, cores)
    if requested > 0:
        return {"torch": requested, "paddle": requested}
    if schedule == "alternate":
        return {"torch": cores, "paddle": cores}
    half = max(1, cores // 2)
    return {"torch": max(1, cores - half), "paddle": half}


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
        if not result.passed and "first_failure" not in self.data:
            bad = next((d for d in result.diffs if not d.passed), None)
            first = _first_layer(result.details)   # the layers step: the first divergent layer
            self.data["first_failure"] = {"step": result.name,  # (a failed TensorDiff is falsy)
                                          "tensor": bad.name if bad is not None else first.get("label"),
                                          "reason": bad.reason if bad is not None else
                                          first.get("reason") or result.message}
        self.event("step", **result.to_json())
        self.write()

    def write(self) -> None:
        """Temp file, fsync, rename: a reader sees the old summary or the new one, never half."""
        tmp = self.out / "summary.json.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(_jsonable(self.data), indent=1))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.out / "summary.json")

    def close(self, status: str, exit_code: int, error: str | None = None) -> None:
        self.data.update(status=status, exit_code=exit_code, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if error:
            self.data["error"] = error
        self.write()
        self.event("end", status=status, exit_code=exit_code, error=error)
        self.events.close()


def run(opts: RunOptions, worker_specs: dict[str, WorkerSpec], say: Callable[[str], None],
        on_step: Callable[[StepResult], None] | None = None, header: dict[str, Any] | None = None,
        server_curve: dict[str, Any] | None = None,
        extra_steps: dict[str, Callable[["RunContext"], StepResult]] | None = None) -> tuple[int, Summary]:
    """Execute the steps; return (exit code, summary). Never leaves a worker process behind.

    With ``opts.listen`` the workers are not launched: they connect from elsewhere
    (``coordinator worker``), authenticated by ``server_curve`` keys when given.
    ``extra_steps`` adds steps outside the registry (``coordinator debug`` runs as one).
    """
    from .steps import STEPS
    STEPS = dict(STEPS, **(extra_steps or {}))  # noqa: N806
    unknown = [s for s in opts.steps if s not in STEPS]
    if unknown:
        raise UsageError(f"unknown step(s) {', '.join(unknown)} (known: {', '.join(STEPS)}, all)")
    opts.out.mkdir(parents=True, exist_ok=True)
    lock_fd = lock_run_dir(opts.out)  # before anything is written there
    summary = Summary(opts.out, dict(header or {}, steps_requested=opts.steps))
    session = _open_session(opts, server_curve)
    session.interrupt_grace = opts.interrupt_grace
    handler = _interrupt_handler(session, summary)
    old = signal.signal(signal.SIGINT, handler)
    old_term = signal.signal(signal.SIGTERM, handler)   # kill, timeout, systemd: stopped like Ctrl-C
    code = ExitCode.ALIGNED
    try:
        _start_workers(session, opts, worker_specs, say)
        say(f"waiting for workers ({', '.join(worker_specs)}) to say hello ...")
        try:
            hellos = session.wait_hello()
        finally:
            _note_security(summary, session)
        summary.data["workers"] = hellos
        summary.event("hello", workers=hellos)
        rc = RunContext(opts, session, say)
        rc.cache["schedule"] = _check_placement(opts, hellos, summary, say)
        any_failed = any_error = False
        for i, name in enumerate(opts.steps):
            if session.interrupted_at is not None:
                raise Interrupted(f"interrupted: step {name!r} and later not started")
            say(f"step {name} ...")
            t0, busy0 = time.monotonic(), session.busy()
            try:
                result = STEPS[name](rc)
                result.status = "passed" if result.passed else "failed"
            except LockstepError as exc:
                exc.step = name
                exc.args = (f"step {name!r}: {exc}",)  # name the step in stdout and summary.json
                stopped = StepResult(name, False, message=str(exc),
                                     status="interrupted" if isinstance(exc, Interrupted) else "error",
                                     details={"exit_code": int(exc.exit_code), "error": type(exc).__name__})
                stopped.seconds = time.monotonic() - t0
                summary.add_step(stopped)   # the report says which step the run ended in, and why
                raise
            except Exception as exc:  # a bug in a step must not lose the steps already done
                import traceback
                result = StepResult(name, False, message=f"{type(exc).__name__}: {exc}", status="error",
                                    details={"traceback": traceback.format_exc()})
                any_error = True
                say(f"step {name}: internal error {type(exc).__name__}: {exc} (a lockstep bug; traceback in "
                    f"summary.json; going on with the next step)")
            result.seconds = time.monotonic() - t0
            result.worker_seconds = {n: b - busy0.get(n, 0.0) for n, b in session.busy().items()}
            summary.add_step(result)
            if on_step:
                on_step(result)
            if result.details.get("interrupted"):   # the debugger's prompt took the Ctrl-C itself
                raise Interrupted(f"interrupted during step {name!r} (its results are kept)")
            if not result.passed:
                any_failed = True
                if opts.fail_fast or result.details.get("stop_run"):  # stop_run: --stop-at-first (layers)
                    rest = opts.steps[i + 1:]
                    if rest:
                        why = "--fail-fast" if opts.fail_fast else "--stop-at-first"
                        say(f"not run ({why}, step {name} failed): {', '.join(rest)}")
                        summary.data["steps_not_run"] = {"steps": rest, "why": f"{why}: step {name!r} failed"}
                    break
        code = ExitCode.INTERNAL if any_error else ExitCode.DIVERGED if any_failed else ExitCode.ALIGNED
        _note_protocol(summary, session, say)
        summary.close("error" if any_error else "diverged" if any_failed else "aligned", code)
    except Interrupted as exc:
        code = ExitCode.INTERRUPTED
        done = sum(1 for s in summary.data["steps"] if s.get("status") in ("passed", "failed"))
        say(f"{exc}; {done} completed step(s) kept in the report")
        _note_protocol(summary, session, say)
        by = "SIGTERM" if session.interrupted_by == signal.SIGTERM else "Ctrl-C"
        summary.close("interrupted", code, f"interrupted by {by}: {exc}; steps completed before it are kept")
    except LockstepError as exc:
        code = exc.exit_code
        _note_protocol(summary, session, say)
        summary.close("error", code, str(exc))
        raise
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
        session.close()
        with contextlib.suppress(OSError):
            (opts.out / ".lock").unlink()   # still held: no other run can have taken it meanwhile
        os.close(lock_fd)
        _write_html_report(opts.out, say)
    return code, summary


def _write_html_report(out: Path, say: Callable[[str], None]) -> None:
    """report.html next to summary.json after every run; a report bug never changes the run's outcome."""
    try:
        from .report_html import write_report
        path = write_report(out)
        say(f"report: {path}")
    except Exception as exc:  # noqa: BLE001
        say(f"warning: report.html not written: {type(exc).__name__}: {exc}")


def _note_protocol(summary: Summary, session: Session, say: Callable[[str], None]) -> None:
    """Record what was dropped (stale replies, malformed messages) instead of failing the run."""
    stats = session.stats()
    summary.data["protocol"] = stats
    if stats["malformed"]:
        say(f"warning: dropped malformed messages: {stats['malformed']} (first: {stats['first_malformed']})")


def _interrupt_handler(session: Session, summary: Summary) -> Callable[[int, Any], None]:
    """First Ctrl-C: start no new op, let the one in flight finish (grace period). Second: kill at once."""
    count = [0]

    def on_sigint(signum: int, frame: Any) -> None:
        count[0] += 1
        if count[0] >= 2:
            for h in session.workers.values():
                if h.proc is not None and h.proc.poll() is None:
                    h.proc.kill()
            try:
                summary.close("interrupted", ExitCode.INTERRUPTED, "interrupted twice: workers killed at once; "
                              "steps completed before it are kept")
            finally:
                os._exit(ExitCode.INTERRUPTED)
        session.interrupted_by = signum
        session.interrupt()
        what = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
        os.write(2, f"\n{what}: starting no new op; the op in flight has {session.interrupt_grace:g}s to finish "
                    f"(Ctrl-C again to kill the workers at once)\n".encode())

    return on_sigint


def _open_session(opts: RunOptions, server_curve: dict[str, Any] | None) -> Session:
    """A private ipc socket for local workers, or ``--listen``'s address for remote ones."""
    if not opts.listen:
        return Session(opts.out, deadlines=opts.deadlines)
    import zmq
    try:
        return Session(opts.out, endpoint=opts.listen, deadlines=opts.deadlines, server_curve=server_curve)
    except zmq.ZMQError as exc:
        raise UsageError(f"--listen {opts.listen}: cannot bind: {exc}") from None


def _start_workers(session: Session, opts: RunOptions, specs: dict[str, WorkerSpec],
                   say: Callable[[str], None]) -> None:
    """Launch local workers, or register the remote ones and tell the user how to start them."""
    if not opts.listen:
        for spec in specs.values():
            session.launch(spec)
        return
    secure = session.auth is not None
    say(f"listening on {session.endpoint} ({'CURVE, 2 admitted worker keys' if secure else 'NO encryption'}); "
        f"start the workers:")
    import ipaddress
    from .security import endpoint_host, is_loopback
    if session.endpoint.startswith("tcp://"):
        where = "<this host>"   # a wildcard or interface address: the user knows the host's name
        if is_loopback(session.endpoint):
            where = endpoint_host(session.endpoint) or "127.0.0.1"
            try:
                ip = ipaddress.ip_address(where)
                where = str(getattr(ip, "ipv4_mapped", None) or ip)
                where = f"[{where}]" if ":" in where else where
            except ValueError:
                pass   # localhost
        connect = f"tcp://{where}:{session.endpoint.rsplit(':', 1)[-1]}"
    else:
        connect = session.endpoint   # ipc://PATH: a worker on this host, with access to PATH
    for spec in specs.values():
        keys = f" --curve-keys {spec.name}.key" if secure else ""
        if not secure and connect.startswith("tcp://"):
            keys = " --insecure"   # the worker refuses plaintext TCP without it, too
        spec.fix = f"start it on its host: coordinator worker {spec.name} --connect {connect}{keys}"
        session.expect_remote(spec)
        say(f"  {spec.fix.partition(': ')[2]}")


def _note_security(summary: Summary, session: Session) -> None:
    """summary.json 'security': transport and what the authenticator admitted or refused (no keys)."""
    sec: dict[str, Any] = {"endpoint": session.endpoint, "curve": session.auth is not None}
    if session.auth is not None:
        sec.update(session.auth.record())
    summary.data["security"] = sec
    summary.write()


def check_injects(opts: RunOptions, hellos: dict[str, dict]) -> None:
    """--torch-inject/--paddle-inject names the worker applies (its HELLO lists them), checked before
    any step: a misspelt negative control would otherwise run as a silent no-op and pass."""
    for side, items in (("torch", opts.torch_inject), ("paddle", opts.paddle_inject)):
        known = hellos.get(side, {}).get("injects")
        if known is None:   # a worker that does not say (an older or a custom one): its ops decide
            continue
        unknown = [i for i in items if i.split(":")[0] not in known]
        if unknown:
            raise UsageError(f"--{side}-inject {unknown[0]!r}: the {side} worker applies no such bug (known: "
                             f"{', '.join(known) or 'none'})")


def _check_placement(opts: RunOptions, hellos: dict[str, dict], summary: Summary, say: Callable[[str], None]) -> str:
    """Print the workers, refuse a shared GPU, record determinism and the schedule; return the schedule."""
    from .placement import check_hello_devices, check_hello_gpus, describe, determinism_report, same_host
    for name, h in hellos.items():
        say(f"  {describe(name, h)}")
    check_injects(opts, hellos)
    check_hello_devices(hellos)
    shared = check_hello_gpus(hellos, opts.allow_shared_gpu)
    if shared:
        say(f"  note: {shared}")
    det = summary.data["determinism"] = determinism_report(hellos)
    for problem in det["problems"]:
        say(f"  warning: not deterministic: {problem}")
    if opts.listen:  # the devices are whatever the remote workers were started with
        devices = [str(hellos.get(n, {}).get("device", "cpu")) for n in ("torch", "paddle")]
    else:
        devices = [opts.torch_device, opts.paddle_device]
    sched, why = choose_schedule(opts.schedule, *devices, os.cpu_count() or 1, same_host=same_host(hellos))
    threads = {n: h.get("threads") for n, h in hellos.items()}
    summary.data["schedule"] = {"mode": sched, "why": why, "threads": threads}
    say(f"schedule: {sched} ({why}); threads {', '.join(f'{n} {t}' for n, t in threads.items())}")
    return sched
