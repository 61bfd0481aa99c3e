"""Faults and bad input against the real CLI with numpy fake workers (no framework needed).

Every case starts ``coordinator run`` as a subprocess, injects one fault into a fake
worker through ``LOCKSTEP_FAKE_FAULT_<SIDE>`` and checks: the exit code, that the report
(stdout and summary.json) names worker, signal/exit code, op, step and log tail, that
no worker process is left behind, and that completed steps survive. Faults that fire in
a worker write a time stamp first (``LOCKSTEP_FAKE_STAMP_DIR``), so the detection time
(fault -> coordinator exit) is measured; set ``LOCKSTEP_TIMINGS_FILE`` to collect them.
Detection bounds asserted here are loose (10 s): they catch "waited for a deadline",
not speed; docs/robustness.md has the measured numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, fake_env
from coordinator.compare import Tolerance, compare
from coordinator.errors import ExitCode, UsageError

MAPPING = str(ROOT / "tests/data/fake_mlp.toml")
OTHER = {"torch": "paddle", "paddle": "torch"}
LOOSE_S = 10.0  # "detected, not waited out": real detection is well under 2 s (see docs/robustness.md)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def record_timing(name: str, seconds: float) -> None:
    print(f"[timing] {name}: {seconds:.3f}s")
    path = os.environ.get("LOCKSTEP_TIMINGS_FILE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": name, "seconds": round(seconds, 4)}) + "\n")


class Run:
    """One `coordinator run` subprocess against fake workers; output read by a thread."""

    def __init__(self, tmp: Path, *args: str, out: Path | None = None, env_extra: dict | None = None,
                 cwd: Path | None = None, use_out: bool = True, **faults: str):
        tmp.mkdir(parents=True, exist_ok=True)
        self.stamps = tmp / "stamps"
        self.stamps.mkdir(exist_ok=True)
        self.out = out or tmp / "run"
        env = fake_env(**faults)
        env["LOCKSTEP_FAKE_STAMP_DIR"] = str(self.stamps)
        env.update(env_extra or {})
        cmd = [sys.executable, "-m", "coordinator.cli", "run", "--mapping", MAPPING, *args]
        if use_out:
            cmd[4:4] = ["--out", str(self.out)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=str(cwd or ROOT))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.exited_at: float | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float = 60) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"coordinator did not exit within {timeout}s:\n{self.stdout}")
        self.exited_at = time.time()
        self._reader.join(5)
        return self.proc.returncode

    def wait_for(self, predicate, what: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"never saw {what} (rc {self.proc.poll()}):\n{self.stdout}")
            time.sleep(0.02)

    def wait_for_stamp(self, name: str, timeout: float = 30) -> float:
        path = self.stamps / name
        self.wait_for(path.exists, f"stamp {name}", timeout)
        return self.stamp(name)

    def stamp(self, name: str) -> float:
        return float((self.stamps / name).read_text())

    def pids(self) -> dict[str, int]:
        return {side: int((self.stamps / f"{side}.pid").read_text())
                for side in ("torch", "paddle") if (self.stamps / f"{side}.pid").exists()}

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def events(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "events.jsonl").read_text().splitlines()]

    def log(self, side: str) -> str:
        path = self.out / f"{side}_worker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.pids().values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runs(tmp_path):
    started: list[Run] = []

    def start(*args: str, name: str = "a", **kw) -> Run:
        r = Run(tmp_path / name, *args, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.cleanup()


def assert_no_workers_left(run: Run, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while any(alive(p) for p in run.pids().values()) and time.monotonic() < end:
        time.sleep(0.05)
    left = {s: p for s, p in run.pids().items() if alive(p)}
    assert not left, f"worker processes left behind: {left}"


def assert_report_is_intact(run: Run, completed: list[str], stopped_in: str | None = None) -> dict:
    """Every completed step kept, then (``stopped_in``) the step the run ended in, recorded as an
    error (or interrupted) with the reason, so the report says where and why it stopped."""
    s = run.summary()  # valid JSON (atomic rewrite) ...
    names = completed + ([stopped_in] if stopped_in else [])
    assert [x["name"] for x in s["steps"]] == names  # ... holding every completed step
    assert all(x["passed"] for x in s["steps"][:len(completed)])
    if stopped_in:
        last = s["steps"][-1]
        assert not last["passed"] and last["status"] in ("error", "interrupted")
        assert last["message"] and s["first_failure"]["step"] == stopped_in
    ev = run.events()
    assert [e["name"] for e in ev if e["kind"] == "step"] == names
    assert ev[-1]["kind"] == "end" and ev[-1]["exit_code"] == run.proc.returncode
    return s


# -- worker death ------------------------------------------------------------------------
# (side, fault point, op named in the report, step named in the report)
DEATHS = [
    ("torch", "hello", "hello", None),
    ("paddle", "hello", "hello", None),
    ("torch", "load_model", "load_model", "weights"),
    ("paddle", "load_model", "load_model", "weights"),
    ("torch", "get_weights", "get_weights", "weights"),
    ("paddle", "weight_specs", "weight_specs", "weights"),
    ("paddle", "set_weights", "set_weights", "weights"),
    ("torch", "forward", "forward", "forward"),
    ("paddle", "forward", "forward", "forward"),
    ("paddle", "forward-partial", "forward", "forward"),  # dies while replying (after a partial)
]
EXIT_TOO = {"hello", "load_model", "set_weights", "forward-partial"}  # exit(17): same path as kill
DEATH_CASES = [("kill", *d) for d in DEATHS] + [("exit", *d) for d in DEATHS if d[1] in EXIT_TOO]


@pytest.mark.parametrize("how,side,point,op,step", DEATH_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in DEATH_CASES])
def test_worker_death_is_reported_with_worker_signal_op_step_and_log(runs, side, point, op, step, how):
    run = runs("--steps", "weights,forward", **{side: f"{how}@{point}"})
    rc = run.wait()
    detect = run.exited_at - run.stamp(f"{side}.{how}@{point}")
    record_timing(f"death {how}@{point} ({side})", detect)
    before_hello = point == "hello"
    assert rc == (ExitCode.ENVIRONMENT if before_hello else ExitCode.WORKER_DIED), run.stdout
    cause = "killed by signal SIGKILL" if how == "kill" else "exited with code 17"
    s = run.summary()
    for text in (run.stdout, s["error"]):
        assert f"{side} worker {cause}" in text
        assert f"during {op}" in text
        assert f"fake {side}: op {point}" in text          # the tail of its log
        if before_hello:
            assert "before HELLO" in text
        else:
            assert f"step '{step}'" in text
            assert f"stopped the {OTHER[side]} worker" in text
    assert s["status"] == "error" and s["exit_code"] == rc
    assert detect < LOOSE_S
    assert_no_workers_left(run)
    assert_report_is_intact(run, ["weights"] if step == "forward" else [], None if before_hello else step)
    # nothing was retried or relaunched: the op reached the dying worker exactly once
    assert run.log(side).count(f"fake {side}: op {point}\n") == 1


def test_worker_death_in_parallel_schedule(runs):
    run = runs("--steps", "weights,forward", "--schedule", "parallel", torch="kill@forward")
    assert run.wait() == ExitCode.WORKER_DIED, run.stdout
    record_timing("death kill@forward (torch, parallel)", run.exited_at - run.stamp("torch.kill@forward"))
    assert "torch worker killed by signal SIGKILL during forward" in run.stdout
    assert_no_workers_left(run)
    assert_report_is_intact(run, ["weights"], "forward")


def test_idle_worker_death_is_noticed_while_the_other_is_busy(runs):
    """paddle is killed while torch runs a 60 s forward: noticed at once, not after torch finishes."""
    run = runs("--steps", "weights,forward", "--schedule", "alternate", torch="slow=60@forward")
    run.wait_for_stamp("torch.slow@forward")
    killed = time.time()
    os.kill(run.pids()["paddle"], signal.SIGKILL)
    assert run.wait() == ExitCode.WORKER_DIED, run.stdout
    record_timing("death of the idle worker (external SIGKILL)", run.exited_at - killed)
    assert run.exited_at - killed < LOOSE_S
    assert "paddle worker killed by signal SIGKILL while idle (last op save_weights)" in run.stdout
    assert "stopped the torch worker" in run.stdout
    assert_no_workers_left(run)


# -- hangs ---------------------------------------------------------------------------------
def test_hang_that_ignores_sigterm_is_killed_with_its_stack(runs):
    """A hang in C code holding the GIL with SIGTERM ignored: stack via faulthandler, then SIGKILL."""
    run = runs("--steps", "weights,forward", "--timeout", "1", torch="hangnoterm@forward")
    assert run.wait() == ExitCode.WORKER_HUNG, run.stdout
    s = run.summary()
    for text in (run.stdout, s["error"]):
        assert "torch worker did not answer op 'forward' within 1s" in text
        assert "killed with SIGKILL (it ignored SIGTERM" in text
        assert "in fault" in text and "fake_worker.py" in text   # faulthandler's dump of the stuck frame
        assert "step 'forward'" in text
    assert_no_workers_left(run)
    assert_report_is_intact(run, ["weights"], "forward")


def test_timeout_applies_to_every_op(runs):
    """--timeout covers ops without their own default (weight_specs would otherwise wait 900 s)."""
    run = runs("--steps", "weights", "--timeout", "1", paddle="hang@weight_specs")
    assert run.wait(timeout=30) == ExitCode.WORKER_HUNG, run.stdout
    assert "paddle worker did not answer op 'weight_specs' within 1s; terminated (SIGTERM)" in run.stdout
    assert "in fault" in run.stdout
    assert_no_workers_left(run)


def test_session_deadlines_star_overrides_defaults_but_not_hello(tmp_path):
    from coordinator.session import DEFAULT_DEADLINE, DEFAULT_DEADLINES, Session
    with Session(tmp_path / "a", deadlines={"*": 2.0}) as s:
        assert s.deadline_for("load_model") == 2.0 and s.deadline_for("anything") == 2.0
        assert s.deadlines["hello"] == DEFAULT_DEADLINES["hello"]
    with Session(tmp_path / "b", deadlines={"forward": 5.0}) as s:
        assert s.deadline_for("forward") == 5.0
        assert s.deadline_for("load_model") == DEFAULT_DEADLINES["load_model"]
        assert s.deadline_for("weight_specs") == DEFAULT_DEADLINE


# -- start-up failures -----------------------------------------------------------------------
def test_missing_interpreter_names_environment_and_fix(runs):
    run = runs("--steps", "weights",
               env_extra={"LOCKSTEP_WORKER_ARGV_PADDLE": json.dumps(["/nonexistent/bin/python", "-m", "paddle_worker"])})
    assert run.wait() == ExitCode.ENVIRONMENT, run.stdout
    assert "paddle worker: interpreter /nonexistent/bin/python does not exist" in run.stdout
    assert "LOCKSTEP_WORKER_ARGV_PADDLE" in run.stdout
    assert "/nonexistent/bin/python" in run.summary()["error"]
    assert_no_workers_left(run)


def test_environment_without_the_framework_says_what_is_missing(runs):
    argv = [sys.executable, "-c", "import lockstep_no_such_framework"]
    run = runs("--steps", "weights", env_extra={"LOCKSTEP_WORKER_ARGV_TORCH": json.dumps(argv)})
    assert run.wait() == ExitCode.ENVIRONMENT, run.stdout
    text = run.stdout
    assert "torch worker exited with code 1 during hello (start-up) before HELLO" in text
    assert f"its environment ({sys.executable}) cannot import what it needs: ModuleNotFoundError: " \
           "No module named 'lockstep_no_such_framework'" in text
    assert "fix: LOCKSTEP_WORKER_ARGV_TORCH chooses this worker's command" in text
    assert_no_workers_left(run)


def test_silent_worker_times_out_at_hello_and_is_stopped(runs):
    run = runs("--steps", "weights", "--hello-timeout", "1", paddle="silent-before-hello")
    assert run.wait(timeout=30) == ExitCode.ENVIRONMENT, run.stdout
    assert "no HELLO from paddle worker within 1s" in run.stdout
    assert "paddle: LOCKSTEP_WORKER_ARGV_PADDLE" in run.stdout
    assert set(run.pids()) == {"torch", "paddle"}
    assert_no_workers_left(run, timeout=1.0)  # stopped by the coordinator, not by the parent watch


def test_hello_from_the_wrong_framework_is_refused_before_weights_move(runs):
    run = runs("--steps", "weights", paddle="wrong-framework")
    assert run.wait() == ExitCode.ENVIRONMENT, run.stdout
    assert "paddle worker says it runs 'tensorflow', expected 'paddle'" in run.stdout
    assert "LOCKSTEP_WORKER_ARGV_PADDLE chooses this worker's command" in run.stdout
    assert not (run.out / "weights_torch.npy").exists()
    assert "op get_weights" not in run.log("torch")
    assert_no_workers_left(run)


def test_sys_exit_inside_an_op_is_that_op_failing_not_the_worker_dying(runs):
    """A user's code calling sys.exit() in an op: a worker error naming the op (exit 7), the worker
    still alive to be shut down, instead of a worker death (exit 4)."""
    run = runs("--steps", "weights,forward", paddle="sysexit=3@forward")
    assert run.wait() == ExitCode.WORKER_ERROR, run.stdout
    assert "paddle worker failed in op 'forward': SystemExit: 3" in " ".join(run.stdout.split())
    assert_no_workers_left(run)


def test_a_hello_with_fields_of_the_wrong_type_is_a_protocol_error_not_a_crash(runs):
    """A HELLO is data from the network: device_uuid as a map (unhashable) crashed the GPU check
    with a TypeError and exit 1; now it is exit 6 naming the worker and the fields, with a closed
    report (the control: the same run without the fault passes, test_fake_run)."""
    run = runs("--steps", "weights", torch="bad-hello")
    assert run.wait() == ExitCode.PROTOCOL, run.stdout
    text = " ".join(run.stdout.split())
    assert "torch worker sent a malformed HELLO ('threads' is a str; 'determinism' holds more than name: value " \
           "pairs; 'device_uuid' is a dict)" in text and "Traceback" not in run.stdout
    s = run.summary()
    assert s["status"] == "error" and s["exit_code"] == ExitCode.PROTOCOL
    assert "op get_weights" not in run.log("paddle")
    assert_no_workers_left(run)


# -- protocol faults during a run --------------------------------------------------------------
def test_garbage_before_the_real_reply_is_counted_and_dropped(runs):
    run = runs("--steps", "weights,forward", paddle="garbage@forward")
    assert run.wait() == ExitCode.ALIGNED, run.stdout
    s = run.summary()
    assert s["protocol"]["malformed"] == {"paddle": 1}
    assert "header is not valid msgpack" in s["protocol"]["first_malformed"]["paddle"]
    assert "warning: dropped malformed messages" in run.stdout


def test_garbage_instead_of_the_reply_is_a_protocol_error(runs):
    """Negative control of the above: the real reply never comes, so the run fails (exit 6)."""
    run = runs("--steps", "weights,forward", "--timeout", "1", paddle="garbageonly@forward")
    assert run.wait() == ExitCode.PROTOCOL, run.stdout
    assert "paddle worker sent 1 malformed message(s) and no valid reply to op 'forward' within 1s" in run.stdout
    assert_no_workers_left(run)
    assert_report_is_intact(run, ["weights"], "forward")


@pytest.mark.parametrize("fault", ["dup@forward", "stale@forward"])
def test_duplicate_and_stale_replies_are_discarded_by_request_id(runs, fault):
    """stale@forward sends all-zero logits under an old id first: accepting it would diverge."""
    run = runs("--steps", "weights,forward,forward,forward", paddle=fault)
    assert run.wait() == ExitCode.ALIGNED, run.stdout
    s = run.summary()
    assert [x["passed"] for x in s["steps"]] == [True, True, True, True]
    assert s["protocol"]["discarded"] >= 2  # one per forward (the last dup may arrive after the run)


# -- numerics ------------------------------------------------------------------------------------
def test_weights_read_back_one_ulp_off_fails_the_weights_step_naming_the_key(runs):
    """Negative control of the weights step's read-back: paddle keeps one element of one tensor one
    ULP off what it was sent (a lossy load); the exact round trip must fail there, naming it."""
    run = runs("--steps", "weights,forward", paddle="badset@set_weights")
    assert run.wait() == ExitCode.DIVERGED, run.stdout
    s = run.summary()
    weights = s["steps"][0]
    assert weights["name"] == "weights" and not weights["passed"]
    bad = [d for d in weights["diffs"] if not d["passed"]]
    assert len(bad) == 1 and bad[0]["name"] == sorted(d["name"] for d in weights["diffs"])[0], bad
    assert 0 < bad[0]["max_abs"] < 1e-6 and bad[0]["worst_index"] == [0] * len(bad[0]["shape"])
    assert bad[0]["name"] in run.stdout


def test_shapes_never_broadcast():
    a, b = np.ones((3, 1), np.float32), np.ones(3, np.float32)
    assert np.allclose(a, b)  # what a naive check would say
    d = compare("x", a, b, Tolerance(1e-3, "max"))
    assert not d.passed and d.reason == "shape mismatch: torch (3, 1) vs paddle (3,)"
    assert not compare("s", np.float32(1), np.ones(1, np.float32)).passed  # 0-d vs (1,)


@pytest.mark.parametrize("side", ["torch", "paddle"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_first_nonfinite_position_is_named(side, bad):
    ref = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = ref.copy()
    target = ref if side == "torch" else got
    target[1, 2] = bad
    target[2, 0] = np.nan  # a later one must not be the one reported
    d = compare("h", ref, got, Tolerance(1e9, "max"))
    assert not d.passed
    assert d.reason == f"{bad} in {side} output at index [1, 2]" and d.worst_index == (1, 2)


def test_nonfinite_never_passes_even_when_identical():
    for v in (np.nan, np.inf):
        a = np.array([1.0, v], np.float32)
        assert not compare("x", a, a.copy(), Tolerance(1e9, "max")).passed


def test_dtype_and_non_numeric_values_fail():
    assert "dtype mismatch" in compare("x", np.ones(2, np.int64), np.ones(2, np.float32)).reason
    assert "not a numeric tensor" in compare("x", np.array(["a"]), np.array(["a"])).reason
    assert "not a numeric tensor" in compare("x", None, None).reason
    ok = compare("x", np.ones(4, np.float32), np.ones(4, np.float32) + 1e-7, Tolerance(1e-6, "max"))
    assert ok.passed  # positive control


@pytest.mark.parametrize("side", ["torch", "paddle"])
def test_summary_points_at_the_first_step_and_tensor_with_nan(runs, side):
    run = runs("--steps", "weights,forward", **{side: "nan@forward"})
    assert run.wait() == ExitCode.DIVERGED, run.stdout
    s = run.summary()
    assert s["steps"][0]["name"] == "weights" and s["steps"][0]["passed"]
    ff = s["first_failure"]
    assert ff["step"] == "forward" and ff["tensor"] == "logits"
    assert ff["reason"] == f"nan in {side} output at index [1, 1]"


# -- Ctrl-C --------------------------------------------------------------------------------------
def test_sigterm_stops_the_run_like_ctrl_c(runs):
    """kill / timeout / systemd send SIGTERM: the same orderly stop, partial report, no workers left."""
    run = runs("--steps", "weights,forward,weights", "--schedule", "alternate", "--interrupt-grace", "30",
               paddle="slow=3@forward")
    run.wait_for_stamp("paddle.slow@forward")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == ExitCode.INTERRUPTED, run.stdout
    s = assert_report_is_intact(run, ["weights", "forward"])
    assert s["status"] == "interrupted" and "step 'weights' and later not started" in s["error"]
    assert "SIGTERM: starting no new op" in run.stdout
    assert_no_workers_left(run)


def test_ctrl_c_lets_the_op_in_flight_finish_then_stops(runs):
    run = runs("--steps", "weights,forward,weights", "--schedule", "alternate", "--interrupt-grace", "30",
               paddle="slow=3@forward")
    run.wait_for_stamp("paddle.slow@forward")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait() == ExitCode.INTERRUPTED, run.stdout
    s = assert_report_is_intact(run, ["weights", "forward"])  # forward's last op finished within the grace
    assert s["status"] == "interrupted" and s["exit_code"] == 130
    assert "step 'weights' and later not started" in s["error"]
    assert run.log("paddle").count("op get_weights") == 1  # the third step issued no work
    assert "interrupt: starting no new op" in run.stdout
    assert_no_workers_left(run)


def test_ctrl_c_times_out_the_op_in_flight_after_the_grace(runs):
    run = runs("--steps", "weights,forward", "--interrupt-grace", "1", paddle="slow=60@forward")
    run.wait_for_stamp("paddle.slow@forward")
    sent = time.time()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait() == ExitCode.INTERRUPTED, run.stdout
    record_timing("Ctrl-C with a 1 s grace -> exit", run.exited_at - sent)
    s = assert_report_is_intact(run, ["weights"], "forward")
    assert s["status"] == "interrupted"
    assert "'forward' on paddle did not finish within the 1s grace period" in s["error"]
    assert_no_workers_left(run)


def test_second_ctrl_c_kills_at_once(runs):
    run = runs("--steps", "weights,forward", "--interrupt-grace", "60", paddle="slow=60@forward")
    run.wait_for_stamp("paddle.slow@forward")
    run.proc.send_signal(signal.SIGINT)
    run.wait_for(lambda: "interrupt: starting no new op" in run.stdout, "the first interrupt's notice")
    sent = time.time()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=10) == ExitCode.INTERRUPTED, run.stdout
    record_timing("second Ctrl-C -> exit", run.exited_at - sent)
    s = assert_report_is_intact(run, ["weights"])
    assert s["status"] == "interrupted" and "interrupted twice" in s["error"]
    assert_no_workers_left(run, timeout=1.0)


# -- coordinator killed ------------------------------------------------------------------------
def test_workers_exit_when_the_coordinator_is_killed(runs):
    """torch is busy in a 60 s op, paddle idle: both notice the dead parent and exit."""
    run = runs("--steps", "weights,forward", "--schedule", "alternate", torch="slow=60@forward")
    run.wait_for_stamp("torch.slow@forward")
    pids = run.pids()
    killed = time.monotonic()
    run.proc.kill()
    run.proc.wait()
    end = killed + 5.0
    while any(alive(p) for p in pids.values()) and time.monotonic() < end:
        time.sleep(0.05)
    record_timing("coordinator SIGKILL -> both workers gone", time.monotonic() - killed)
    assert not [s for s, p in pids.items() if alive(p)], "workers outlived the coordinator by 5 s"
    for side in pids:
        assert "coordinator (pid" in run.log(side) and "is gone; exiting" in run.log(side)


# -- isolation -----------------------------------------------------------------------------------
def test_two_concurrent_runs_do_not_interfere(runs):
    good = runs("--steps", "weights,forward", name="good")
    bad = runs("--steps", "weights,forward", name="bad", paddle="bug@forward")
    assert good.wait() == ExitCode.ALIGNED, good.stdout
    assert bad.wait() == ExitCode.DIVERGED, bad.stdout
    g, b = good.summary(), bad.summary()
    assert g["status"] == "aligned" and b["status"] == "diverged"
    pids = {w["pid"] for s in (g, b) for w in s["workers"].values()}
    assert len(pids) == 4
    assert {w["pid"] for w in g["workers"].values()} == set(good.pids().values())


def test_concurrent_runs_without_out_get_their_own_directories(runs, tmp_path):
    a = runs("--steps", "weights", name="x", use_out=False, cwd=tmp_path)
    b = runs("--steps", "weights", name="y", use_out=False, cwd=tmp_path)
    assert a.wait() == 0 and b.wait() == 0, a.stdout + b.stdout
    dirs = sorted(p for p in (tmp_path / "runs").iterdir() if (p / "summary.json").exists())
    assert len(dirs) == 2


def test_a_run_directory_in_use_is_refused(tmp_path):
    from coordinator.session import lock_run_dir
    fd = lock_run_dir(tmp_path)
    try:
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            lock_run_dir(tmp_path)
    finally:
        os.close(fd)
    os.close(lock_run_dir(tmp_path))  # released with the run


def test_unknown_op_is_answered_with_an_error_naming_worker_and_op(tmp_path):
    from coordinator.errors import WorkerFailed
    from coordinator.session import Session, WorkerSpec
    from conftest import FAKE
    with Session(tmp_path / "run") as s:
        s.launch(WorkerSpec("torch", [sys.executable, FAKE, "torch"], framework="torch"))
        s.wait_hello(timeout=30)
        with pytest.raises(WorkerFailed, match=r"torch worker failed in op 'no_such_op': UnknownOp: .*has: .*forward"):
            s.request("torch", "no_such_op", {})
        assert s.request("torch", "ping", {})["requests"] == 2  # still serving
