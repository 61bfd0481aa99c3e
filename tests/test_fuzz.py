"""Fuzzing the wire: malformed messages never crash a worker, the coordinator or the codec.

* a live fake worker (real subprocess) gets 10,000 seeded random malformed multipart
  messages from a ROUTER acting as coordinator; each is answered (error or reply), the
  worker survives, its malformed counter matches, and valid requests still work;
* the coordinator's ROUTER (``Session``) gets 10,000 from a rogue DEALER using a
  registered worker's identity plus strangers and an impostor of a live worker, while
  real requests run; all are dropped and counted, every real request succeeds;
* a frame over the per-frame limit is refused by a worker with an error (it keeps
  serving) and costs a peer of the coordinator its connection (ZeroMQ MAXMSGSIZE);
* hypothesis: any corruption of a valid message decodes or raises ProtocolError, nothing else.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import FAKE
from coordinator.errors import ProtocolMismatch
from coordinator.session import Session, WorkerSpec
from protocol import PROTOCOL_VERSION, ProtocolError
from protocol.codec import decode, encode

N_FUZZ = 10_000
SEED = int(os.environ.get("LOCKSTEP_FUZZ_SEED", "20240607"))
SAFE_OPS = ["ping", "forward", "get_weights", "weight_specs", "set_weights", "load_model", "no_such_op"]


# -- the generator ------------------------------------------------------------------------
def _valid_request(rng: random.Random) -> list[bytes]:
    op = rng.choice(SAFE_OPS)
    body: object = {}
    if op == "forward":
        body = {"inputs": {"x": np.asarray(np.random.RandomState(rng.randrange(1 << 30)).standard_normal((4, 4)),
                                           np.float32)}}
    elif op == "set_weights":
        body = {rng.choice(["fc1.bias", "nope"]): np.zeros(rng.choice([8, 3]), np.float32)}
    elif op == "load_model":
        body = {"seed": rng.randrange(100)}
    elif op == "get_weights":
        body = {"keys": [rng.choice(["fc1.bias", "missing"])]}
    return [bytes(f) for f in encode("request", rng.randrange(1, 1 << 40), op, body)]


def _crafted(rng: random.Random) -> list[bytes]:
    """Well-formed msgpack with hostile contents: the checks after parsing."""
    table = rng.choice([
        [["float32", [0, 2**39, 2**39, 2**39], 1]],        # zero-sized but "too big" for numpy
        [["float32", [2**39, 2**39], 1]],                  # announces exabytes
        [["O", [1], 1]], [["<U4", [1], 1]], [["float32", [-1], 1]],
        [["float32", [4], 0]], [["float32", [4], 10**9]], [["float32", "4", 1]],
        [["float32", [1] * 40, 1]], [[1, 2, 3]], "notalist", [["bfloat16", [3], 1]],
    ])
    header = {"v": rng.choice([PROTOCOL_VERSION, PROTOCOL_VERSION + 1, -1, "1", None]),
              "kind": rng.choice(["request", "reply", "partial", "error", "hello", "bogus", 7]),
              "id": rng.choice([1, -1, "x", None, 2**63, True]),
              "op": rng.choice(SAFE_OPS + [3, None, "x" * 1000]),
              "body": rng.choice([{}, [], 5, "s", None, msgpack.ExtType(1, b"\x00\x00\x00\x00"),
                                  msgpack.ExtType(1, b"\xff\xff\xff\x7f"), msgpack.ExtType(7, b"zz"),
                                  {"inputs": {"x": msgpack.ExtType(1, b"\x00\x00\x00\x00")}}, _deep(rng)])}
    for key in rng.sample(list(header), rng.randrange(0, 2)):
        del header[key]
    head = msgpack.packb({"a": table}) + msgpack.packb(header)
    tail = [rng.randbytes(rng.choice([0, 6, 12, 16])) for _ in range(rng.randrange(0, 3))]
    return [head, *tail]


def _deep(rng: random.Random) -> object:
    x: object = 1
    for _ in range(rng.choice([10, 70, 200])):
        x = [x]
    return x


def _mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    frames = [bytearray(f) for f in frames]
    how = rng.randrange(7)
    i = rng.randrange(len(frames))
    if how == 0 and frames[i]:      # flip bytes
        for _ in range(rng.randint(1, 8)):
            frames[i][rng.randrange(len(frames[i]))] ^= 1 << rng.randrange(8)
    elif how == 1:                  # truncate
        frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
    elif how == 2 and len(frames) > 1:
        del frames[i]               # drop a frame
    elif how == 3:
        frames.insert(i, frames[i])  # duplicate a frame
    elif how == 4:
        frames.append(bytearray(rng.randbytes(rng.randrange(0, 64))))
    elif how == 5:
        frames[0] = bytearray(rng.randbytes(rng.randrange(0, 64)))
    else:
        frames[i] = frames[i] + bytearray(rng.randbytes(rng.randrange(1, 9)))  # extend
    return [bytes(f) for f in frames]


def malformed(rng: random.Random) -> list[bytes]:
    """One random message; most are malformed, a few decode (wrong kind/op/body) on purpose."""
    kind = rng.random()
    if kind < 0.15:
        return [rng.randbytes(rng.randrange(0, 48)) for _ in range(rng.randint(1, 4))]
    if kind < 0.40:
        return _crafted(rng)
    if kind < 0.45:  # decodes, but a kind no worker takes
        return [bytes(f) for f in encode(rng.choice(["reply", "partial", "hello", "error"]), 5, "x", {})]
    if kind < 0.50:  # decodes, wrong protocol version
        return [bytes(f) for f in encode("request", 6, "ping", {}, version=PROTOCOL_VERSION + 1)]
    return _mutate(_valid_request(rng), rng)


# -- a live worker ------------------------------------------------------------------------------
class FakeWorkerPeer:
    """A ROUTER acting as the coordinator, and one fake worker subprocess connected to it."""

    def __init__(self, tmp: Path, env_extra: dict | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"ipc://{tmp}/w.sock"
        self.sock.bind(self.endpoint)
        env = dict(os.environ, **(env_extra or {}))
        self.log = open(tmp / "worker.log", "wb")
        self.proc = subprocess.Popen([sys.executable, FAKE, "torch", "--connect", self.endpoint, "--name", "torch",
                                      "--parent-pid", str(os.getpid())], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)
        ident, *frames = self.recv(30)
        assert ident == b"torch" and decode(frames).kind == "hello"

    def recv(self, timeout: float = 10) -> list[bytes]:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"worker silent for {timeout}s (alive: {self.proc.poll() is None})")
        return self.sock.recv_multipart()

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([b"torch", *frames])

    def call(self, op: str, body: dict, rid: int = 1, timeout: float = 10) -> dict:
        self.send([bytes(f) for f in encode("request", rid, op, body)])
        while True:
            msg = decode(self.recv(timeout)[1:])
            if msg.id == rid and msg.kind in ("reply", "error"):
                assert msg.kind == "reply", msg.body
                return msg.body

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def worker_peer(tmp_path):
    peers = []

    def make(**env) -> FakeWorkerPeer:
        p = FakeWorkerPeer(tmp_path, env)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


@pytest.mark.timeout(120)
def test_worker_answers_10k_malformed_messages_and_keeps_working(worker_peer):
    peer = worker_peer()
    peer.call("load_model", {"seed": 0})
    rng = random.Random(SEED)
    sent = answered = rejected = 0
    t0 = time.monotonic()
    while sent < N_FUZZ:
        batch = min(200, N_FUZZ - sent)
        for _ in range(batch):
            peer.send(malformed(rng))
        sent += batch
        while answered < sent:  # every message gets exactly one reply or error (partials aside)
            msg = decode(peer.recv()[1:])
            if msg.kind in ("reply", "error"):
                answered += 1
                # the worker's own "could not parse" answer (an op's error may also carry id -1)
                rejected += msg.kind == "error" and msg.id == -1 and msg.body.get("op") == "?"
    took = time.monotonic() - t0
    print(f"[fuzz] worker: {sent} messages in {took:.1f}s, {rejected} rejected as malformed, "
          f"{answered - rejected} answered by an op (seed {SEED})")
    assert peer.proc.poll() is None, "the worker died"
    assert not peer.sock.poll(200)  # and nothing beyond one answer each
    counters = peer.call("ping", {}, rid=10**6)
    assert counters["malformed"] == rejected and rejected > N_FUZZ // 3
    peer.call("load_model", {"seed": 0}, rid=10**6 + 1)
    out = peer.call("forward", {"inputs": {"x": np.ones((4, 4), np.float32)}}, rid=10**6 + 2)
    assert out["logits"].shape == (4, 2) and np.isfinite(out["logits"]).all()


def test_oversized_frame_is_refused_by_the_worker_which_keeps_working(worker_peer):
    """A frame over the worker's limit is answered with a protocol error naming the limit;
    negative control: the same message just under the limit is served."""
    limit = 1 << 20
    peer = worker_peer(LOCKSTEP_MAX_FRAME_BYTES=str(limit))
    big = np.zeros(limit // 4 + 16, np.float32)
    peer.send([bytes(f) for f in encode("request", 7, "ping", {"x": big})])
    err = decode(peer.recv()[1:])
    assert err.kind == "error" and err.id == -1 and f"over the {limit}-byte frame limit" in err.body["message"]
    small = np.zeros(limit // 4 - 1024, np.float32)
    assert peer.call("ping", {"x": small}, rid=9)["malformed"] == 1
    assert peer.proc.poll() is None


def test_oversized_frame_costs_a_peer_its_connection_to_the_coordinator(tmp_path, monkeypatch):
    """MAXMSGSIZE on the ROUTER: the bytes are never buffered, the sender is disconnected
    (it reconnects: its next message arrives) and the real workers never notice."""
    from protocol import codec
    monkeypatch.setattr(codec, "MAX_FRAME_BYTES", 1 << 20)
    with Session(tmp_path / "run") as s:
        s.launch(_fake_spec("torch"))
        s.expect_remote(WorkerSpec("rogue", [], framework=None))
        s.wait_hello(["torch"])
        ctx = zmq.Context()
        rogue = _dealer(ctx, s.endpoint, b"rogue")
        try:
            rogue.send_multipart([b"\x00" * ((1 << 20) + 1)])
            s.drain(0.3)
            assert s.workers["rogue"].stray_messages == 0  # dropped by ZeroMQ, not decoded
            end = time.monotonic() + 10
            while s.workers["rogue"].stray_messages == 0 and time.monotonic() < end:
                rogue.send_multipart([b"small garbage"])  # after the reconnect, this gets through
                s.drain(0.2)
            assert s.workers["rogue"].stray_messages >= 1
            assert s.request("torch", "ping", {})["malformed"] == 0
        finally:
            rogue.close(0)
            ctx.term()


# -- the coordinator's ROUTER ----------------------------------------------------------------------
def _fake_spec(side: str) -> WorkerSpec:
    return WorkerSpec(side, [sys.executable, FAKE, side], framework=side)


def _dealer(ctx: zmq.Context, endpoint: str, ident: bytes) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, ident)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(endpoint)
    return s


@pytest.mark.timeout(120)
def test_coordinator_survives_10k_malformed_messages_while_running(tmp_path):
    rng = random.Random(SEED + 1)
    inputs = {"inputs": {"x": np.ones((4, 4), np.float32)}}
    with Session(tmp_path / "run") as s:
        for side in ("torch", "paddle"):
            s.launch(_fake_spec(side))
        s.expect_remote(WorkerSpec("rogue", [], framework=None))  # a registered identity nobody serves
        s.wait_hello(["torch", "paddle"])
        s.request_many({"torch": ("load_model", {}), "paddle": ("load_model", {})})
        ref = s.request("torch", "forward", inputs)["logits"]
        ctx = zmq.Context()
        rogue = _dealer(ctx, s.endpoint, b"rogue")
        strangers = [_dealer(ctx, s.endpoint, f"stranger-{i}".encode()) for i in range(3)]
        impostor = _dealer(ctx, s.endpoint, b"torch")   # a live worker's identity: ZeroMQ refuses it
        try:
            discarded0 = s.discarded
            from_rogue = from_strangers = 0
            t0 = time.monotonic()
            while from_rogue + from_strangers < N_FUZZ:
                for _ in range(200):
                    sock = rng.choice([rogue, rogue, rogue] + strangers)
                    sock.send_multipart(malformed(rng))
                    if sock is rogue:
                        from_rogue += 1
                    else:
                        from_strangers += 1
                    impostor.send_multipart(malformed(rng), zmq.NOBLOCK)
                r = s.request_many({"torch": ("forward", inputs), "paddle": ("ping", {})})
                assert np.array_equal(r["torch"]["logits"], ref)  # real work goes on, untouched
            s.drain(0.5)
            took = time.monotonic() - t0
            malformed_n = s.workers["rogue"].stray_messages
            dropped = s.discarded - discarded0
            print(f"[fuzz] coordinator: {from_rogue} from the rogue + {from_strangers} from strangers in "
                  f"{took:.1f}s: {malformed_n} malformed, {dropped} discarded (seed {SEED + 1})")
            assert malformed_n + dropped == from_rogue + from_strangers  # each counted once, none lost
            assert malformed_n > N_FUZZ // 3
            stats = s.stats()
            assert stats["malformed"] == {"rogue": malformed_n} and s.workers["torch"].stray_messages == 0
            for side in ("torch", "paddle"):
                assert s.workers[side].proc.poll() is None
            assert np.array_equal(s.request("torch", "forward", inputs)["logits"], ref)
        finally:
            for sock in (rogue, impostor, *strangers):
                sock.close(0)
            ctx.term()


def _serve_rogue(endpoint: str, garbage: int, reply: bool, stop: threading.Event) -> None:
    """A remote 'worker' that answers each request with garbage, then (maybe) the real reply."""
    ctx = zmq.Context()
    sock = _dealer(ctx, endpoint, b"rogue")
    sock.send_multipart(encode("hello", 0, "hello", {"protocol": PROTOCOL_VERSION, "framework": "rogue"}))
    try:
        while not stop.is_set():
            if not sock.poll(50):
                continue
            msg = decode(sock.recv_multipart())
            for i in range(garbage):
                sock.send_multipart([b"\xc1 not msgpack", bytes([i])])
            if reply:
                sock.send_multipart(encode("reply", msg.id, msg.op, {"pong": True}))
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize("real_reply", [True, False], ids=["garbage-then-reply", "garbage-only"])
def test_malformed_messages_fail_a_request_only_if_the_real_reply_never_comes(tmp_path, real_reply):
    stop = threading.Event()
    with Session(tmp_path / "run") as s:
        s.expect_remote(WorkerSpec("rogue", [], framework=None))
        t = threading.Thread(target=_serve_rogue, args=(s.endpoint, 3, real_reply, stop), daemon=True)
        t.start()
        try:
            s.wait_hello(timeout=10)
            if real_reply:
                assert s.request("rogue", "ping", {}, timeout=5) == {"pong": True}
                assert s.workers["rogue"].stray_messages == 3
            else:
                # 3 per message it gets: the ping, and any liveness probe (a pacing credit) sent meanwhile
                with pytest.raises(ProtocolMismatch, match=r"rogue worker sent (?:[3-9]|[1-9]\d+) malformed "
                                                           r"message\(s\) and no valid reply to op 'ping' within 0.5s"):
                    s.request("rogue", "ping", {}, timeout=0.5)
        finally:
            stop.set()
            t.join(5)


# -- codec properties ---------------------------------------------------------------------------------
def _hdr(table, body=None):
    return msgpack.packb({"a": table}) + msgpack.packb({"v": 1, "kind": "request", "id": 1, "op": "x", "body": body})


@pytest.mark.parametrize("frames", [
    [_hdr([["float32", [0, 2**39, 2**39, 2**39], 1]]), b""],
    [_hdr([["float64", [0] + [2**39] * 31, 1]]), b""],
], ids=["zero-size-huge-dims", "31-huge-dims"])
def test_regression_zero_sized_huge_shapes_raise_protocol_error(frames):
    """numpy's 'array is too big' ValueError used to escape decode() and kill the worker."""
    with pytest.raises(ProtocolError):
        decode(frames)


def test_frame_and_header_limits(monkeypatch):
    from protocol import codec
    monkeypatch.setattr(codec, "MAX_FRAME_BYTES", 8192)
    frames = encode("reply", 1, "x", {"a": np.zeros(10_000, np.uint8)})
    assert [len(f) for f in frames[1:]] == [8192, 1808]  # chunked below the frame limit
    assert decode(frames).body["a"].size == 10_000
    with pytest.raises(ProtocolError, match="header of op 'x' is .* bytes, limit 8192"):
        encode("reply", 1, "x", {"keys": ["k" * 100] * 100})
    with pytest.raises(ProtocolError, match="exceeds 8192"):
        decode([b"\x90" * 9000])


msgpackable = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(table=msgpackable, header=st.dictionaries(st.sampled_from(["v", "kind", "id", "op", "body", "x"]),
                                                   msgpackable, max_size=6),
       tails=st.lists(st.binary(max_size=24), max_size=3))
def test_property_any_msgpack_header_decodes_or_raises_protocol_error(table, header, tails):
    try:
        decode([msgpack.packb({"a": table}) + msgpack.packb(header), *tails])
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(arr=hnp.arrays(st.sampled_from([np.float32, np.int64, np.uint8, np.float16]),
                      hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
       data=st.data())
def test_property_corrupting_a_valid_message_decodes_or_raises_protocol_error(arr, data):
    frames = [bytearray(f) for f in encode("request", 3, "forward", {"inputs": {"x": arr}, "n": [1, "a"]})]
    i = data.draw(st.integers(0, len(frames) - 1))
    action = data.draw(st.sampled_from(["flip", "truncate", "drop", "extend"]))
    if action == "flip" and frames[i]:
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i][j] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        frames[i] = frames[i][:data.draw(st.integers(0, len(frames[i])))]
    elif action == "drop":
        del frames[i]
    else:
        frames[i] += data.draw(st.binary(min_size=1, max_size=8))
    try:
        msg = decode([bytes(f) for f in frames])
    except ProtocolError:
        return
    assert msg.kind in ("hello", "request", "partial", "reply", "error")


nested_bodies = st.recursive(
    hnp.arrays(st.sampled_from([np.float32, np.int32, np.bool_]), hnp.array_shapes(min_dims=0, max_dims=3, max_side=3))
    | st.integers(-2**31, 2**31) | st.text(max_size=5) | st.none(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
    max_leaves=10)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=200, deadline=None)
@given(body=nested_bodies)
def test_property_nested_bodies_round_trip(body):
    assert _same(decode(encode("reply", 1, "op", body)).body, body)
