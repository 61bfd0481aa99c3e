"""Launch workers, handshake, and exchange requests with them over one ROUTER socket.

Only the coordinator binds: an ipc socket inside a private 0700 run directory (or
a TCP address for remote workers). Workers connect with their name as identity.
Every wait polls the socket *and* the worker processes, so a dead worker is
noticed within ``LIVENESS_S`` and reported with its exit code and log tail.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq

from protocol import PROTOCOL_VERSION
from protocol import codec, shm
from protocol.codec import Message, decode, encode
from protocol.errors import ProtocolError, RemoteError

from .errors import (Interrupted, ProtocolMismatch, UsageError, WorkerDied, WorkerFailed, WorkerHung,
                     WorkerStartupError)

LIVENESS_S = 0.2
TERM_GRACE_S = 3.0        # SIGTERM, then this long, then SIGKILL
INTERRUPT_GRACE_S = 10.0  # after the first Ctrl-C, how long the op in flight may still take
MAX_STASH = 64            # messages kept while waiting for HELLOs (more is a flood: dropped, counted)
DEFAULT_DEADLINES = {"hello": 120.0, "load_model": 600.0, "train": 7200.0, "perf": 1800.0}
DEFAULT_DEADLINE = 900.0
UNPACED = 1 << 62         # a pacing credit that never runs out

Partial = Callable[[str, Any], None]


@dataclass
class WorkerSpec:
    """How to start one worker: data, like a jupyter kernel spec."""

    name: str                      # identity on the wire: "torch" or "paddle" (or a fake)
    argv: list[str]                # absolute interpreter first
    env: dict[str, str] = field(default_factory=dict)
    framework: str | None = None   # the framework HELLO must report (None: any)
    fix: str = ""                  # what to tell the user when this worker cannot start


HEARTBEAT_MS = 2000   # remote (tcp) connections: ZMTP ping interval; a peer silent 5x that is dropped
PROBE_S = 1.0         # how often a remote worker's connection is checked while waiting


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    proc: subprocess.Popen | None
    log_path: Path | None
    hello: dict[str, Any] = field(default_factory=dict)
    current_op: str | None = None
    last_op: str | None = None
    stray_messages: int = 0        # malformed messages from this identity, dropped
    first_malformed: str = ""
    last_malformed: str = ""
    stopped: bool = False          # stopped on purpose (stop_worker): its exit is no death
    ring: shm.RingReader | None = None  # shared-memory fast path for its tensors (local workers)
    busy_s: float = 0.0            # handler seconds its replies reported (the framework's compute)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(log is empty)"

    def exit_description(self) -> str:
        code = self.proc.returncode if self.proc else None
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"


def private_run_socket(run_dir: Path) -> str:
    """An ipc endpoint in a 0700 directory; falls back to a short temp dir when the path is too long."""
    sock_dir = run_dir / ".sock"
    path = sock_dir / "coordinator"
    if len(str(path)) > 100:  # ipc paths are limited to ~107 bytes (and no empty .sock/ is left behind)
        sock_dir = Path(tempfile.mkdtemp(prefix="lockstep-"))
        return f"ipc://{sock_dir / 'c'}"
    sock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(sock_dir, 0o700)
    return f"ipc://{path}"


# What the coordinator reads from a HELLO, and the types it may hold (any of them may also be null).
HELLO_FIELDS: dict[str, tuple] = {
    "protocol": (int,), "worker": (str,), "framework": (str,), "framework_version": (str,), "device": (str,),
    "threads": (int,), "pid": (int,), "host": (str,), "executable": (str,), "python": (str,),
    "platform": (str,), "shm_bytes": (int,), "cuda_available": (bool,), "libraries": (dict,),
    "determinism": (dict,), "deterministic": (dict,), "device_name": (str,), "device_memory": (int, float),
    "device_index": (int,), "visible_devices": (str,), "device_uuid": (str,), "device_pci": (str,),
    "nvidia_smi": (dict,), "injects": (list,),
}


def hello_problems(info: dict) -> list[str]:
    """Fields of a HELLO whose type is not what the coordinator expects (``host`` as a list would
    otherwise crash the placement checks); a dict's keys must be strings, its values scalars."""
    out = []
    for key, types in HELLO_FIELDS.items():
        if info.get(key) is not None and not isinstance(info[key], types):
            out.append(f"{key!r} is a {type(info[key]).__name__}")
        elif isinstance(info.get(key), list) and not all(isinstance(v, str) for v in info[key]):
            out.append(f"{key!r} holds more than names")
        elif isinstance(info.get(key), dict):
            if any(not isinstance(k, str) or isinstance(v, (list, dict)) for k, v in info[key].items()):
                out.append(f"{key!r} holds more than name: value pairs")
    return out


def lock_run_dir(run_dir: Path) -> int:
    """Hold ``<run_dir>/.lock`` for the whole run; returns the fd (closing it releases the lock).

    Two runs pointed at one directory would otherwise both bind its ipc socket (the
    second silently steals it) and interleave their reports: the second fails at once.
    """
    import fcntl
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UsageError(f"run directory {run_dir} is in use by another run (pid {holder}); "
                         f"choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class Session:
    """One ROUTER, several workers; context manager that always stops the workers."""

    def __init__(self, run_dir: Path, endpoint: str | None = None, deadlines: dict[str, float] | None = None,
                 server_curve: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)  # ZeroMQ drops a peer sending more
        if endpoint and endpoint.startswith("tcp://"):
            # Remote workers: ZMTP heartbeats drop a peer whose host vanished (no FIN) within
            # seconds; "[::1]" needs IPv6 on. No ROUTER_HANDOVER: a second connection under a
            # name already connected is refused (it could hold the other worker's key), and that
            # worker exits (protocol/worker.py _Link).
            self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
            self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * HEARTBEAT_MS)
            self.sock.setsockopt(zmq.IPV6, 1)
        self._probed: dict[str, float] = {}   # remote workers: when each was last checked for a connection
        self.auth = None
        if server_curve:
            from .security import start_authenticator
            self.auth = start_authenticator(self.ctx, server_curve["allowed"])
            self.auth.watch(self.sock)  # handshake failures that never reach the authenticator
            self.sock.curve_server = True
            self.sock.curve_publickey = server_curve["public"]
            self.sock.curve_secretkey = server_curve["secret"]
        self.endpoint = endpoint or private_run_socket(self.run_dir)
        self._own_sock = None if endpoint else Path(self.endpoint[len("ipc://"):])  # removed by close()
        self.sock.bind(self.endpoint)
        # --listen ipc://PATH: the socket file bind created goes too (its directory is the user's)
        self._listen_file = Path(endpoint[len("ipc://"):]) if endpoint and endpoint.startswith("ipc://") else None
        if self.endpoint.startswith("tcp://") and self.endpoint.endswith(":0"):
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[str, WorkerHandle] = {}
        given = dict(deadlines or {})
        star = given.pop("*", None)  # "*": every op (--timeout), except the HELLO wait
        self.default_deadline = DEFAULT_DEADLINE if star is None else star
        self.deadlines = {k: (v if star is None or k == "hello" else star) for k, v in DEFAULT_DEADLINES.items()}
        self.deadlines.update(given)
        self._ids = itertools.count(1)
        self._inbox: list[tuple[str, Message]] = []
        self.discarded = 0             # stale/duplicate replies and messages from unknown identities
        self.interrupted_at: float | None = None
        self.interrupted_by: int | None = None   # the signal (SIGINT, SIGTERM) that asked for it
        self.interrupt_grace = INTERRUPT_GRACE_S

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def launch(self, spec: WorkerSpec) -> WorkerHandle:
        """Start a local worker process; its stdout/stderr go to a log file, never a pipe."""
        log_path = self.run_dir / f"{spec.name}_worker.log"
        env = dict(os.environ)
        env.update(spec.env)
        env["PYTHONUNBUFFERED"] = "1"
        argv = list(spec.argv) + ["--connect", self.endpoint, "--name", spec.name, "--parent-pid", str(os.getpid())]
        if not Path(argv[0]).is_absolute() or not Path(argv[0]).exists():
            raise WorkerStartupError(f"{spec.name} worker: interpreter {argv[0]} does not exist "
                                     f"({spec.fix or 'run `coordinator envs create` to build the environment'})")
        ring = self._make_ring(spec.name)
        if ring is not None:
            env[shm.ENV] = ring.env_value()
        logf = open(log_path, "ab", buffering=0)
        try:
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=str(self.run_dir), start_new_session=True,
                                    pass_fds=(ring.fd,) if ring is not None else ())
        except OSError as exc:
            if ring is not None:
                ring.close()
            raise WorkerStartupError(f"{spec.name} worker could not start {argv[0]}: {exc}"
                                     f"{' (' + spec.fix + ')' if spec.fix else ''}") from exc
        finally:
            logf.close()
            if ring is not None:
                ring.close_fd()  # the worker has its copy; the mapping stays
        handle = WorkerHandle(spec, proc, log_path, ring=ring)
        self.workers[spec.name] = handle
        return handle

    def _make_ring(self, name: str) -> shm.RingReader | None:
        """A shared-memory ring for a local worker (``LOCKSTEP_SHM_MIB``; 0 or no memfd: frames only)."""
        try:
            size = shm.configured_bytes()
        except ProtocolError as exc:
            raise UsageError(str(exc)) from None
        if not size or not shm.available():
            return None
        try:
            return shm.RingReader(size)
        except (OSError, ProtocolError) as exc:
            print(f"lockstep: no shared-memory ring for the {name} worker ({exc}); tensors go as frames",
                  file=sys.stderr)
            return None

    def expect_remote(self, spec: WorkerSpec) -> WorkerHandle:
        """Register a worker started elsewhere (``coordinator worker ... --connect``)."""
        handle = WorkerHandle(spec, None, None)
        self.workers[spec.name] = handle
        return handle

    def wait_hello(self, names: list[str] | None = None, timeout: float | None = None) -> dict[str, dict]:
        """Wait for every named worker's HELLO; refuse version or framework mismatches."""
        names = names or list(self.workers)
        timeout = timeout if timeout is not None else self.deadlines["hello"]
        pending = set(n for n in names if not self.workers[n].hello)
        deadline = time.monotonic() + timeout
        while pending:
            if self.interrupted_at is not None:
                raise Interrupted("interrupted while waiting for the workers to start")
            left = deadline - time.monotonic()
            if left <= 0:
                who = ", ".join(sorted(pending))
                local = [n for n in sorted(pending) if self.workers[n].proc is not None]
                tails = "\n".join(f"--- {n} log tail ---\n{self.workers[n].log_tail()}" for n in local)
                fixes = "".join(f"\n{n}: {self.workers[n].spec.fix}" for n in sorted(pending) if self.workers[n].spec.fix)
                auth = f"\n{self.auth.explain()}" if self.auth is not None else ""
                why = (f"started, but silent: stuck importing, or cannot reach {self.endpoint}" if local else
                       f"remote: not started, cannot reach {self.endpoint}, or refused (its own output says "
                       f"why)")
                raise WorkerStartupError(f"no HELLO from {who} worker within {timeout:g}s ({why}){fixes}{auth}"
                                         + (f"\n{tails}" if tails else ""))
            got = self._recv(min(left, LIVENESS_S))
            if got is None:
                self._check_alive(pending, op="hello (start-up)", startup=True)
                continue
            name, msg = got
            if msg.kind == "hello" and name not in pending:
                self.discarded += 1  # a second HELLO: nothing to do with it
                continue
            if msg.kind != "hello":
                self._stash(name, msg)
                continue
            self._accept_hello(name, msg)
            pending.discard(name)
        return {n: self.workers[n].hello for n in names}

    def _accept_hello(self, name: str, msg: Message) -> None:
        handle = self.workers[name]
        info = msg.body if isinstance(msg.body, dict) else {}
        bad = hello_problems(info)
        if bad:   # a remote peer's HELLO is data from the network: checked before anything trusts it
            self._send(name, encode("request", 0, "shutdown", {}))
            raise ProtocolMismatch(f"{name} worker sent a malformed HELLO ({'; '.join(bad[:3])}); refusing it "
                                   f"before any weights move (is it a lockstep worker of this version?)")
        theirs = info.get("protocol", msg.version)
        if msg.version != PROTOCOL_VERSION or theirs != PROTOCOL_VERSION:
            self._send(name, encode("request", 0, "shutdown", {}))
            raise ProtocolMismatch(f"{name} worker speaks protocol version {theirs}, the coordinator "
                                   f"{PROTOCOL_VERSION}; refusing before any weights move "
                                   f"(reinstall the worker environment: coordinator envs create --force)")
        want = handle.spec.framework
        if want and info.get("framework") != want:
            self._send(name, encode("request", 0, "shutdown", {}))
            fix = f" ({handle.spec.fix})" if handle.spec.fix else ""
            raise WorkerStartupError(f"{name} worker says it runs {info.get('framework')!r}, expected {want!r}: "
                                     f"check the environment it was started from ({info.get('executable')}){fix}")
        handle.hello = info

    def close(self, timeout: float = 5.0) -> None:
        """Ask workers to shut down, then terminate, then kill: nothing is left behind.

        A worker that never said HELLO (silent, or still importing) cannot hear a
        shutdown request: it is terminated at once instead of after ``timeout``.
        """
        for name, h in self.workers.items():
            if h.proc is None or h.proc.poll() is None:
                body: dict[str, Any] = {}
                if h.proc is None and not h.hello:   # remote, never accepted: whoever holds the name is told
                    body["refused"] = (f"no HELLO was accepted from a {name} worker on this connection (a key that "
                                       f"belongs to another worker, or it connected after the HELLO wait); the "
                                       f"coordinator's output says which")
                try:
                    self._send(name, encode("request", next(self._ids), "shutdown", body))
                except Exception:
                    pass
        end = time.monotonic() + timeout
        for h in self.workers.values():
            if h.proc is None:
                continue
            if not h.hello:
                self._kill(h)
                continue
            try:
                h.proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(h)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        for h in self.workers.values():
            if h.ring is not None:
                h.ring.close()  # unmapped now, or with the last array still viewing it
        self.sock.close(0)
        self.ctx.term()
        if self._own_sock is not None:   # the socket file and its private directory (.sock, or a temp one)
            try:
                self._own_sock.unlink(missing_ok=True)
                self._own_sock.parent.rmdir()
            except OSError:
                pass
            self._own_sock = None
        if self._listen_file is not None:
            self._listen_file.unlink(missing_ok=True)
            self._listen_file = None
        from .envs import remove_worker_site
        remove_worker_site(self.run_dir)   # the workers' import links (local workers only), now unused

    def _kill(self, h: WorkerHandle) -> str:
        """SIGTERM, then SIGKILL after TERM_GRACE_S; says which it took (a hang in C may ignore SIGTERM)."""
        if h.proc is None:
            return "not stopped (remote: not started by this coordinator)"
        if h.proc.poll() is not None:
            return "already exited"
        h.proc.terminate()
        try:
            h.proc.wait(TERM_GRACE_S)
            return "terminated (SIGTERM)"
        except subprocess.TimeoutExpired:
            h.proc.kill()
            h.proc.wait(5)
            return f"killed with SIGKILL (it ignored SIGTERM for {TERM_GRACE_S:g}s)"

    def interrupt(self) -> None:
        """First Ctrl-C: issue no new op; the op in flight gets ``interrupt_grace`` seconds to finish."""
        if self.interrupted_at is None:
            self.interrupted_at = time.monotonic()

    def deadline_for(self, op: str) -> float:
        return self.deadlines.get(op, self.default_deadline)

    def busy(self) -> dict[str, float]:
        """Seconds each worker has spent in its op handlers so far, as its replies reported them
        (pacing waits excluded): the frameworks' own compute, for telling it from ours."""
        return {n: h.busy_s for n, h in self.workers.items()}

    def stats(self) -> dict[str, Any]:
        """Protocol counters for the report: what was dropped instead of failing the run."""
        return {"discarded": self.discarded,
                "shm": {n: {"tensors": h.ring.tensors, "bytes": h.ring.bytes}
                        for n, h in self.workers.items() if h.ring is not None},
                "malformed": {n: h.stray_messages for n, h in self.workers.items() if h.stray_messages},
                "first_malformed": {n: h.first_malformed for n, h in self.workers.items() if h.first_malformed}}

    def drain(self, quiet_s: float = 0.2) -> None:
        """Read and drop whatever arrives until the socket is quiet for ``quiet_s`` (tests, shutdown)."""
        while self.sock.poll(int(quiet_s * 1000)):
            if self._recv(0) is not None:
                self.discarded += 1

    def stop_worker(self, name: str) -> None:
        self.workers[name].stopped = True
        self._kill(self.workers[name])

    # -- requests --------------------------------------------------------------------
    def request(self, name: str, op: str, body: Any = None, on_partial: Partial | None = None,
                timeout: float | None = None) -> Any:
        return self.request_many({name: (op, body)}, on_partial, timeout)[name]

    def warm_rings(self, nbytes: dict[str, int]) -> dict[str, Any]:
        """Have the named local workers populate their shared-memory pages for the next ``nbytes``
        of tensors, all at once (protocol op ``ring_warm``): a step about to receive a large reply
        from each worker pays the page faults side by side instead of inside each reply's copy.
        Workers without a ring answer at once."""
        calls = {n: ("ring_warm", {"bytes": int(b)}) for n, b in nbytes.items()
                 if b > 0 and n in self.workers and self.workers[n].ring is not None}
        return self.request_many(calls) if calls else {}

    def request_many(self, calls: dict[str, tuple[str, Any]], on_partial: Partial | None = None,
                     timeout: float | None = None, pace: int = 0) -> dict[str, Any]:
        """Send one request to each named worker at once, gather the replies.

        ``pace`` (> 0, two or more workers, dict bodies): lockstep streaming. Each worker may
        send ``pace`` partials beyond the slowest other worker's count; the coordinator grants
        more as the others progress (``credit`` messages, protocol/worker.py) and everything
        once another worker has replied. So a fast worker cannot run ahead and make the
        coordinator hold its whole output while waiting for the slow one's.

        Partial replies are handed to ``on_partial(worker, body)`` as they arrive.
        Replies whose request id is not outstanding (stale, duplicate) are discarded;
        malformed messages are counted and dropped (see docs/robustness.md). Nothing is
        ever retried: a mutating op that timed out may have run, so the run fails instead.
        """
        if self.interrupted_at is not None:
            ops = ", ".join(f"{op!r} on {n}" for n, (op, _) in calls.items())
            raise Interrupted(f"interrupted: did not start {ops}")
        outstanding: dict[str, int] = {}
        paced = pace > 0 and len(calls) > 1 and all(isinstance(b, dict) for _, b in calls.values())
        got_partials = dict.fromkeys(calls, 0)
        granted = dict.fromkeys(calls, pace)
        for name, (op, body) in calls.items():
            rid = next(self._ids)
            self._send(name, encode("request", rid, op, dict(body, _pace=pace) if paced else body), op=op)
            outstanding[name] = rid
            self.workers[name].current_op = op
            self.workers[name].last_op = op
        results: dict[str, Any] = {}
        errors: list[RemoteError] = []
        limits = {n: timeout or self.deadline_for(calls[n][0]) for n in calls}
        deadlines = {n: time.monotonic() + limits[n] for n in calls}
        malformed0 = {n: self.workers[n].stray_messages for n in calls}
        while outstanding:
            got = self._next_for(outstanding)
            if got is None:
                self._check_alive(set(self.workers), op=None)  # an idle worker dying counts too
                now = time.monotonic()
                for n in list(outstanding):
                    if now > deadlines[n]:
                        self._hung(n, calls[n][0], limits[n], self.workers[n].stray_messages - malformed0[n])
                self._check_interrupt_grace(outstanding, calls)
                continue
            name, msg = got
            if msg.kind == "partial":
                if on_partial:
                    on_partial(name, msg.body)
                if paced:
                    got_partials[name] += 1
                    self._grant(outstanding, got_partials, granted, pace)
                continue
            del outstanding[name]
            if paced:
                for other in outstanding:  # nothing left to keep pace with
                    granted[other] = UNPACED
                    self._send(other, encode("request", outstanding[other], "credit", {"upto": UNPACED}))
            self.workers[name].current_op = None
            self.workers[name].busy_s += msg.seconds or 0.0
            if msg.kind == "error":
                errors.append(RemoteError.from_body(msg.body))
            else:
                results[name] = msg.body
        if errors:
            raise WorkerFailed(errors[0])
        return results

    def _grant(self, outstanding: dict[str, int], got: dict[str, int], granted: dict[str, int], pace: int) -> None:
        """Let every worker still running go ``pace`` partials past the slowest other one."""
        for name in outstanding:
            others = [got[o] for o in got if o != name and o in outstanding]
            upto = min(others) + pace if others else UNPACED
            if upto > granted[name]:
                granted[name] = upto
                self._send(name, encode("request", outstanding[name], "credit", {"upto": upto}))

    def _check_interrupt_grace(self, outstanding: dict[str, int], calls: dict[str, tuple[str, Any]]) -> None:
        if self.interrupted_at is None or time.monotonic() < self.interrupted_at + self.interrupt_grace:
            return
        busy = ", ".join(f"{calls[n][0]!r} on {n}" for n in outstanding)
        how = "; ".join(f"{n}: {self._kill(self.workers[n])}" for n in outstanding)  # rather than in close()
        raise Interrupted(f"interrupted: {busy} did not finish within the {self.interrupt_grace:g}s grace period; "
                          f"{how}")

    def _next_for(self, outstanding: dict[str, int]) -> tuple[str, Message] | None:
        for i, (name, msg) in enumerate(self._inbox):
            if outstanding.get(name) == msg.id:
                return self._inbox.pop(i)
        got = self._recv(LIVENESS_S)
        if got is None:
            return None
        name, msg = got
        if msg.kind == "error" and msg.id == -1 and name in outstanding:
            # the worker could not parse something we sent: a protocol failure, not an op failure
            raise ProtocolMismatch(f"{name} worker rejected a message: {RemoteError.from_body(msg.body).message}")
        if outstanding.get(name) != msg.id or msg.kind not in ("partial", "reply", "error"):
            self.discarded += 1  # stale or duplicate reply, or one for a request we gave up on
            return None
        return got

    def _stash(self, name: str, msg: Message) -> None:
        if len(self._inbox) >= MAX_STASH:
            self.discarded += 1
            return
        self._inbox.append((name, msg))

    def _send(self, name: str, frames: list, op: str = "?") -> None:
        try:
            self.sock.send_multipart([name.encode(), *frames], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._check_alive({name}, op=op)
                raise WorkerDied(f"{name} worker is not connected (op {op!r})") from None
            raise

    def _recv(self, timeout_s: float) -> tuple[str, Message] | None:
        """One decoded message, or None: nothing came, or what came was dropped and counted.

        A malformed message never fails the run by itself: a rogue or broken peer could
        otherwise end any run at will. It is counted per identity; if the real reply
        then never comes, the deadline turns the count into a protocol error.
        """
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frames = self.sock.recv_multipart(copy=False)
        ident = bytes(frames[0].buffer).decode("utf-8", "replace")
        if ident not in self.workers:
            self.discarded += 1
            return None
        if self.auth is not None and len(frames) > 1 and not self.auth.owns(ident, frames[1]):
            self.discarded += 1  # an admitted key speaking under another worker's name
            return None
        try:
            return ident, decode(frames[1:], shm=self.workers[ident].ring)
        except ProtocolError as exc:
            h = self.workers[ident]
            h.stray_messages += 1
            h.last_malformed = str(exc)[:300]
            h.first_malformed = h.first_malformed or h.last_malformed
            return None

    def _check_alive(self, names: set[str], op: str | None, startup: bool = False) -> None:
        for n in sorted(names):
            h = self.workers[n]
            if h.proc is None and h.hello and not h.stopped:
                self._probe_remote(n, op)
            if h.proc is None or h.stopped or h.proc.poll() is None:
                continue
            what = op or h.current_op
            when = f"during {what}" if what else f"while idle (last op {h.last_op or 'none'})"
            stopped = "".join(f"; stopped the {o} worker: {self._kill(w)}" for o, w in self.workers.items()
                              if o != n and w.proc is not None)
            if startup:
                raise WorkerStartupError(f"{n} worker {h.exit_description()} {when} before HELLO{stopped}"
                                         f"{_startup_hint(h)}\nlog {h.log_path}:\n{h.log_tail()}")
            raise WorkerDied(f"{n} worker {h.exit_description()} {when}{stopped}; "
                             f"log {h.log_path}:\n{h.log_tail()}")

    def _probe_remote(self, name: str, op: str | None) -> None:
        """A remote worker has no process here to poll: every PROBE_S, send it a no-op (a pacing
        credit for request 0, which workers skip) that ROUTER_MANDATORY refuses at once when its
        connection is gone (the process died, or heartbeats timed out): a death, not a hang."""
        now = time.monotonic()
        if now - self._probed.get(name, 0.0) < PROBE_S:
            return
        self._probed[name] = now
        h = self.workers[name]
        try:
            self.sock.send_multipart([name.encode(), *encode("request", 0, "credit", {})], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                return   # EAGAIN: connected, its queue is full (busy): alive
            what = op or h.current_op
            when = f"during {what}" if what else f"while idle (last op {h.last_op or 'none'})"
            host = h.hello.get("host", "?")
            raise WorkerDied(f"{name} worker (remote, on {host}, pid {h.hello.get('pid', '?')}) lost its connection "
                             f"{when}: its process died or its host stopped answering heartbeats "
                             f"({5 * HEARTBEAT_MS / 1000:g}s); its log is on {host}") from None

    def _hung(self, name: str, op: str, limit: float, malformed: int = 0) -> None:
        h = self.workers[name]
        if h.proc is not None and h.proc.poll() is None and hasattr(signal, "SIGUSR1"):
            try:
                os.kill(h.proc.pid, signal.SIGUSR1)  # faulthandler dumps every thread's stack to the log
                time.sleep(0.5)
            except ProcessLookupError:
                pass
        how = self._kill(h)
        for w in self.workers.values():
            self._kill(w)
        stacks = f"Its stacks (log {h.log_path}):\n{h.log_tail(60)}"
        if malformed:
            raise ProtocolMismatch(f"{name} worker sent {malformed} malformed message(s) and no valid reply to op "
                                   f"{op!r} within {limit:g}s (last: {h.last_malformed}); {how}. {stacks}")
        raise WorkerHung(f"{name} worker did not answer op {op!r} within {limit:g}s; {how}. {stacks}")


def _startup_hint(h: WorkerHandle) -> str:
    """Turn the usual start-up failures into what to do about them."""
    import re
    lines = []
    m = re.search(r"^(ModuleNotFoundError|ImportError): .*$", h.log_tail(60), re.MULTILINE)
    if m:
        lines.append(f"its environment ({h.spec.argv[0] if h.spec.argv else '?'}) cannot import what it needs: "
                     f"{m.group(0)}")
    if h.spec.fix:
        lines.append(f"fix: {h.spec.fix}")
    return "".join(f"\n{line}" for line in lines)
