"""The generic worker loop: connect, say HELLO, then answer requests from an op table.

A worker is a DEALER that *connects* to the coordinator's ROUTER (only the
coordinator binds). Each request is answered by zero or more ``partial`` messages
(streamed while the op runs, same request id) and then exactly one ``reply`` or
``error``. Malformed input is answered with an error and counted, never fatal.
"""

from __future__ import annotations

import faulthandler
import os
import platform
import signal
import sys
import threading
import time
from typing import Any, Callable

import zmq

from . import PROTOCOL_VERSION
from . import shm
from .codec import decode, encode
from .errors import ProtocolError, RemoteError

Handler = Callable[[Any, "RequestContext"], Any]
PROFILE = bool(os.environ.get("LOCKSTEP_PROFILE"))  # per-op handler/encode seconds in the worker log
PACE_WAIT_S = 60.0  # a paced worker waiting this long for a credit stops pacing (never deadlocks)
BATCH = 16           # batched partials queued at most before they are sent together


def _batch_seconds(raw: str | None) -> float:
    """``LOCKSTEP_BATCH_S``: how long a batched partial may wait for company (0: none)."""
    try:
        value = float(raw) if raw not in (None, "") else 0.02
        if value >= 0:
            return value
    except ValueError:
        pass
    print(f"lockstep: LOCKSTEP_BATCH_S={raw!r} is not a number of seconds >= 0; using 0.02",
          file=sys.stderr, flush=True)
    return 0.02


BATCH_S = _batch_seconds(os.environ.get("LOCKSTEP_BATCH_S"))  # ... or the oldest waited this long


class RequestContext:
    """Handed to every handler so it can stream partial results of the running request.

    Pacing (lockstep): a request whose body carries ``"_pace": W`` may send W partials ahead
    of the credit the coordinator grants; ``partial()`` then waits for a ``credit`` message
    (op ``credit``, this request's id, body ``{"upto": n}``). The coordinator grants each
    worker the other worker's progress plus W, so two workers run a layer-streaming op side by
    side and neither gets more than W tensors ahead (the coordinator holds at most that many
    waiting for their counterparts). Anything else arriving meanwhile ends the pacing and is
    handled after the op.
    """

    def __init__(self, sock: zmq.Socket, req_id: int, op: str, ring: shm.RingWriter | None = None,
                 pace: int = 0, pending: list | None = None):
        self._sock, self.id, self.op, self._ring = sock, req_id, op, ring
        self.partials = 0
        self.upto = pace if pace > 0 else None   # None: not paced
        self.waited_s = 0.0
        self._pending = pending if pending is not None else []
        self._queued: list[list] = []   # encoded batched partials not sent yet
        self._queued_t = 0.0

    def _wait_credit(self) -> None:
        self.flush()   # the coordinator grants credit for what it has received
        t0 = time.perf_counter()
        while self.upto is not None and self.partials >= self.upto:
            left = PACE_WAIT_S - (time.perf_counter() - t0)
            if left <= 0 or not self._sock.poll(int(left * 1000)):
                print(f"op {self.op}: no credit from the coordinator for {PACE_WAIT_S:g}s; streaming unpaced",
                      file=sys.stderr, flush=True)
                self.upto = None
                break
            frames = self._sock.recv_multipart(copy=False)
            try:
                msg = decode(frames)
            except ProtocolError:
                self._pending.append(frames)  # the main loop answers it as malformed
                continue
            if msg.kind == "request" and msg.op == "credit":
                if msg.id == self.id and isinstance(msg.body, dict) and isinstance(msg.body.get("upto"), int):
                    self.upto = max(self.upto, msg.body["upto"])
                continue  # a credit for an op already over: nothing to do
            self._pending.append(frames)
            self.upto = None
        self.waited_s += time.perf_counter() - t0

    def partial(self, body: Any, batch: bool = False) -> None:
        """Send one partial reply (e.g. one layer's output as soon as it exists).

        Snapshots every tensor before returning, so ``body`` may hold views of live framework
        tensors that the op goes on to change: large ones are copied into the shared-memory
        ring while encoding, the rest into ZeroMQ's own buffers (``copy=True``). That one copy
        is the whole cost; callers need no copy of their own.

        ``batch``: for many small messages in a row (a hook per layer), queue it and send the
        queue together once it holds ``BATCH`` messages or its oldest waited ``BATCH_S`` (checked
        here, at the next partial), before any other message, and before waiting for credit. One
        ZeroMQ send between two framework ops costs ~115 us on the reference VM (the I/O thread is
        woken each time, on cores the framework is using), ~26 us in a burst of 32. Only with a
        ring, where every message is a header of a few hundred bytes: the queued frames are
        copied at once (the snapshot), and a tensor the ring had no room for is sent at once.
        """
        if self.upto is not None and self.partials >= self.upto:
            self._wait_credit()
        frames = encode("partial", self.id, self.op, body, shm=self._ring)
        self.partials += 1
        if batch and self._ring is not None and all(len(f) <= shm.MIN_BYTES for f in frames):
            if not self._queued:
                self._queued_t = time.perf_counter()
            self._queued.append([bytes(f) for f in frames])
            if len(self._queued) >= BATCH or time.perf_counter() - self._queued_t >= BATCH_S:
                self.flush()
            return
        self.flush()
        self._sock.send_multipart(frames, copy=True)

    def flush(self) -> None:
        """Send the queued batched partials, in order."""
        queued, self._queued = self._queued, []
        for frames in queued:
            self._sock.send_multipart(frames, copy=True)


class _Shutdown(Exception):
    pass


def _parent_gone(parent_pid: int, start_ppid: int) -> bool:
    """The coordinator is gone when we were re-parented or its pid no longer exists."""
    if os.getppid() != start_ppid:
        return True
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def watch_parent(name: str, parent_pid: int | None, interval: float = 0.5) -> None:
    """Exit when the local coordinator dies, even while an op is running.

    A thread, not a check in the request loop, because a long op (or a hang) keeps the
    loop from running; ``os._exit`` because nobody is left to report to. A worker stuck
    in C code that holds the GIL cannot be noticed this way (documented limitation).
    """
    if not parent_pid:
        return
    start_ppid = os.getppid()

    def loop() -> None:
        while not _parent_gone(parent_pid, start_ppid):
            time.sleep(interval)
        print(f"[{name}] coordinator (pid {parent_pid}) is gone; exiting", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=loop, name="lockstep-parent-watch", daemon=True).start()


def serve(name: str, endpoint: str, handlers: dict[str, Handler], hello: dict[str, Any],
          curve: dict[str, bytes] | None = None, parent_pid: int | None = None,
          after_op: Callable[[], None] | None = None) -> int:
    """Run the worker until a ``shutdown`` request, or the parent coordinator dies.

    ``curve`` (optional) holds ``public``, ``secret`` and ``server`` keys (z85 bytes)
    for an encrypted, authenticated TCP connection. ``after_op`` runs after each handled op's
    reply is sent (the paddle worker puts its OpenMP threads to sleep there); if it fails, it
    is reported once in the log and not called again.
    """
    if hasattr(signal, "SIGUSR1"):
        # The coordinator sends SIGUSR1 to a hung worker to get its Python stacks in the log.
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.IDENTITY, name.encode())
    # No MAXMSGSIZE here: ZeroMQ would drop the connection for good (a protocol error is
    # never reconnected), leaving a deaf worker; decode() refuses frames over
    # codec.MAX_FRAME_BYTES instead and the coordinator gets an error at once.
    if curve:
        sock.curve_publickey = curve["public"]
        sock.curve_secretkey = curve["secret"]
        sock.curve_serverkey = curve["server"]
    link = _Link(sock, name, endpoint, keyed=curve is not None) if endpoint.startswith("tcp://") else None
    sock.connect(endpoint)
    ring = shm.writer_from_env()  # local workers: large tensors go through shared memory
    info = dict(hello, protocol=PROTOCOL_VERSION, worker=name, pid=os.getpid(), host=platform.node(),
                executable=sys.executable, python=sys.version.split()[0], shm_bytes=ring.size if ring else 0)
    sock.send_multipart(encode("hello", 0, "hello", info))
    counters = {"requests": 0, "malformed": 0}
    watch_parent(name, parent_pid)
    pending: list = []  # messages that arrived while a paced op waited for credit
    try:
        while True:
            if not pending and link is not None:
                while not sock.poll(200):   # a remote worker watches its connection between requests
                    link.check()
                    link.say_if_still_waiting()
                link.check()
            frames = pending.pop(0) if pending else sock.recv_multipart(copy=False)
            try:
                msg = decode(frames)
                if msg.kind != "request":
                    raise ProtocolError(f"workers only take requests, got {msg.kind!r}")
                if msg.version != PROTOCOL_VERSION:
                    raise ProtocolError(f"protocol version {msg.version} != worker's {PROTOCOL_VERSION}")
            except ProtocolError as exc:
                counters["malformed"] += 1
                err = RemoteError("ProtocolError", str(exc), "", name, "?")
                sock.send_multipart(encode("error", -1, "?", err.to_body()))
                continue
            if msg.op == "credit":
                continue  # pacing credit for an op that has finished: no reply expected
            counters["requests"] += 1
            try:
                handled = _dispatch(sock, name, handlers, msg, counters, ring, pending)
            except _Shutdown:
                return 0
            except zmq.Again:   # remote: a reply that could not leave for SEND_TIMEOUT_MS
                if link is None:
                    raise
                link.check()
                print(f"[{name}] could not send to the coordinator at {endpoint} for {SEND_TIMEOUT_MS / 1000:g}s; "
                      f"exiting", file=sys.stderr, flush=True)
                return 3
            if handled and after_op is not None:
                try:
                    after_op()
                except Exception as exc:  # housekeeping: never the op's failure
                    print(f"[{name}] after-op hook failed, not called again: {type(exc).__name__}: {exc}",
                          file=sys.stderr, flush=True)
                    after_op = None
    except _LinkDown as exc:
        print(f"[{name}] {exc}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:   # Ctrl-C in a remote worker's own terminal
        print(f"[{name}] interrupted (Ctrl-C); exiting", file=sys.stderr, flush=True)
        return 130
    finally:
        if link is not None:
            link.close()
        sock.close(linger=2000)
        if ring is not None:
            ring.close()


HEARTBEAT_MS = 2000        # remote (tcp): ZMTP pings; a coordinator silent 5x this long is disconnected
SEND_TIMEOUT_MS = 60_000   # remote: a reply that cannot leave this long means the coordinator is gone


class _LinkDown(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _Link:
    """A remote worker's view of its connection (socket monitor events), checked between requests.

    A worker serves one coordinator run: once connected, losing the connection (the coordinator
    stopped or was killed, its host vanished, or a restarted worker took this name over) ends it
    with exit 3 instead of waiting forever, and it can never reconnect as a stale worker to the
    next run. Refused handshakes (no keys against an encrypted coordinator, a key set that does
    not match its server key, a key the coordinator does not admit) end it with exit 2, naming
    the likely cause; libzmq would otherwise retry silently forever, or stop retrying and leave
    the worker deaf."""

    FAIL_LIMIT = 5

    def __init__(self, sock: zmq.Socket, name: str, endpoint: str, keyed: bool = False):
        self.keyed = keyed   # started with CURVE keys: a failed handshake may be about them
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * HEARTBEAT_MS)
        sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        sock.setsockopt(zmq.IPV6, 1)
        events = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.mon = sock.get_monitor_socket(events)
        self.name, self.endpoint = name, endpoint
        self.up = False
        self.failures = 0
        self.started = time.monotonic()
        self.next_note = float(os.environ.get("LOCKSTEP_WORKER_WAIT_NOTE_S") or 10.0)

    def say_if_still_waiting(self) -> None:
        """No handshake yet after 10 s, 20 s, 40 s, ...: say so (a wrong host or port is otherwise
        indistinguishable from a coordinator that is still starting)."""
        waited = time.monotonic() - self.started
        if not self.up and waited >= self.next_note:
            print(f"[{self.name}] no connection to a coordinator at {self.endpoint} after {waited:.0f}s; still "
                  f"trying (is it running, are the host and port right? Ctrl-C stops)", file=sys.stderr, flush=True)
            self.next_note *= 2

    def check(self) -> None:
        from zmq.utils.monitor import recv_monitor_message
        while self.mon.poll(0):
            ev = recv_monitor_message(self.mon)["event"]
            if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up, self.failures = True, 0
            elif ev == zmq.EVENT_DISCONNECTED and self.up:
                raise _LinkDown(f"lost the connection to the coordinator at {self.endpoint} (it stopped, was killed, "
                                f"or its host stopped answering; or a {self.name} worker was already connected to "
                                f"it): a remote worker serves one run, exiting", 3)
            elif ev == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:   # libzmq does not retry these: deaf from now on
                raise _LinkDown(f"the coordinator at {self.endpoint} refused the connection (handshake protocol "
                                f"error): it expects encrypted workers and this one has no --curve-keys, or the "
                                f"other way round", 2)
            elif ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:        # nor these
                raise _LinkDown(f"the coordinator at {self.endpoint} refused the connection: its authenticator "
                                f"does not admit this worker's key under the name {self.name!r}; use the "
                                f"{self.name}.key that `coordinator keys` wrote next to its server.key", 2)
            elif ev == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:   # retried every ~0.1 s
                self.failures += 1
                if self.failures >= self.FAIL_LIMIT:
                    why = (f"this worker's key file names another server key; use the {self.name}.key that "
                           f"`coordinator keys` wrote next to its server.key" if self.keyed else
                           "the peer closed the connection during the handshake: a coordinator that expects "
                           "encrypted workers (start this one with --curve-keys), a wrong host or port (not a "
                           "lockstep coordinator), or a proxy or firewall in between")
                    raise _LinkDown(f"the handshake with {self.endpoint} failed {self.failures} times: {why}", 2)

    def close(self) -> None:
        try:
            self.mon.close(0)
        except zmq.ZMQError:
            pass


def _ring_warm(ring: shm.RingWriter | None, body: Any) -> dict:
    """Populate the ring's pages for the next ``bytes`` of tensors ahead of a large reply."""
    want = body.get("bytes") if isinstance(body, dict) else None
    if not isinstance(want, int) or isinstance(want, bool) or want < 0:
        raise ValueError(f"ring_warm wants {{'bytes': <non-negative int>}}, got {body!r:.80}")
    if ring is None:
        return {"warmed": 0, "ring": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    done = ring.populate_free(want)
    return {"warmed": done, "ring": ring.size, "touched": ring.touched, "seconds": time.perf_counter() - t0}


def _dispatch(sock: zmq.Socket, name: str, handlers: dict[str, Handler], msg: Any, counters: dict,
              ring: shm.RingWriter | None = None, pending: list | None = None) -> bool:
    """Answer one request; True when a handler ran (not for the built-in ops or an unknown op)."""
    if ring is not None:
        counters.update(shm_tensors=ring.tensors, shm_bytes=ring.bytes, shm_full=ring.full)
    if msg.op == "shutdown":
        sock.send_multipart(encode("reply", msg.id, msg.op, {"ok": True, **counters}))
        refused = msg.body.get("refused") if isinstance(msg.body, dict) else None
        if refused:   # the coordinator never accepted this worker: say why, exit as a usage problem
            raise _LinkDown(f"the coordinator refused this worker: {str(refused)[:500]}", 2)
        raise _Shutdown
    if msg.op == "ping":
        sock.send_multipart(encode("reply", msg.id, msg.op, {"t": time.time(), **counters}))
        return False
    if msg.op == "ring_warm":
        try:
            sock.send_multipart(encode("reply", msg.id, msg.op, _ring_warm(ring, msg.body)))
        except ValueError as exc:
            sock.send_multipart(encode("error", msg.id, msg.op, RemoteError.from_exception(exc, name, msg.op).to_body()))
        return False
    handler = handlers.get(msg.op)
    if handler is None:
        err = RemoteError("UnknownOp", f"{name} worker has no op {msg.op!r} (has: {', '.join(sorted(handlers))})",
                          "", name, msg.op)
        sock.send_multipart(encode("error", msg.id, msg.op, err.to_body()))
        return False
    body = msg.body if msg.body is not None else {}
    pace = body.pop("_pace", 0) if isinstance(body, dict) else 0
    rctx = RequestContext(sock, msg.id, msg.op, ring, pace if isinstance(pace, int) else 0, pending)
    t0 = time.perf_counter()
    try:
        result = handler(body, rctx)
        rctx.flush()
        t1 = time.perf_counter()
        frames = encode("reply", msg.id, msg.op, result, shm=ring, seconds=t1 - t0 - rctx.waited_s)
        if PROFILE:
            print(f"[{name}] op {msg.op}: handler {t1 - t0:.3f} s (waited for credit {rctx.waited_s:.3f} s), "
                  f"encode {time.perf_counter() - t1:.3f} s, {rctx.partials} partials, {len(frames) - 1} frames",
                  file=sys.stderr, flush=True)
    except (Exception, SystemExit) as exc:  # every handler failure crosses as text (a user's sys.exit() too)
        print(f"[{name}] op {msg.op} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        err = RemoteError.from_exception(exc, name, msg.op)
        frames = encode("error", msg.id, msg.op, err.to_body())
        rctx.flush()  # its partials hold ring pages the coordinator releases when it reads them
    sock.send_multipart(frames, copy=False)
    return True
