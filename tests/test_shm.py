"""The shared-memory fast path (protocol/shm.py): worker -> coordinator tensors as views of a
memfd ring. Round trips, page hand-back, fallback to frames when the ring is full, and a
coordinator that refuses every malformed region announcement (negative controls)."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest

from protocol import codec, shm
from protocol.errors import ProtocolError

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs Linux memfd")

MIB = 1 << 20


@pytest.fixture
def ring():
    reader = shm.RingReader(4 * MIB)
    writer = shm.RingWriter(reader.fd, reader.size)  # same process, same file: what a worker sees
    yield reader, writer
    writer.close()
    reader.close()


def roundtrip(writer, reader, body, kind="reply"):
    frames = codec.encode(kind, 7, "op", body, shm=writer)
    return frames, codec.decode([bytes(f) for f in frames], shm=reader)


def test_large_tensors_travel_as_views_of_the_ring_and_small_ones_as_frames(ring):
    reader, writer = ring
    big = np.arange(300_000, dtype=np.float32).reshape(300, 1000)
    small = np.arange(10, dtype=np.float64)
    frames, msg = roundtrip(writer, reader, {"big": big, "small": small, "n": 3})
    assert len(frames) == 2  # header + the small tensor's frame; the big one is in the ring
    np.testing.assert_array_equal(msg.body["big"], big)
    np.testing.assert_array_equal(msg.body["small"], small)
    assert msg.body["big"].dtype == np.float32 and msg.body["big"].shape == (300, 1000)
    assert not msg.body["big"].flags.owndata  # a view: no copy on the coordinator
    assert reader.tensors == 1 and reader.bytes == big.nbytes
    assert msg.nbytes == big.nbytes + small.nbytes


def test_pages_come_back_when_the_last_view_dies(ring):
    reader, writer = ring
    a = np.ones(MIB // 4, np.float32)
    _, msg = roundtrip(writer, reader, {"a": a})
    view = msg.body["a"][10:20].reshape(2, 5).T  # a view of a view keeps the pages
    del msg
    gc.collect()
    assert reader.in_use_bytes() == MIB and int(writer.pagemap.sum()) == 16
    _, msg2 = roundtrip(writer, reader, {"a": a * 2})
    assert reader.in_use_bytes() == 2 * MIB  # placed after the live tensor, not over it
    np.testing.assert_array_equal(view, np.ones((5, 2), np.float32))
    del view, msg2
    gc.collect()
    assert reader.in_use_bytes() == 0 and int(writer.pagemap.sum()) == 0
    _, msg3 = roundtrip(writer, reader, {"a": a})
    assert reader.in_use_bytes() == MIB  # reused from the first page


def test_first_fit_takes_the_lowest_hole_that_is_big_enough(ring):
    reader, writer = ring
    page = shm.PAGE
    held = [roundtrip(writer, reader, {"a": np.full(n * page, i, np.uint8)})[1]
            for i, n in enumerate((2, 1, 3, 2))]            # pages [0,2) [2,3) [3,6) [6,8)
    offsets = [int(m.body["a"].ctypes.data - reader.data.ctypes.data) for m in held]
    assert offsets == [0, 2 * page, 3 * page, 6 * page]
    del held[2], held[0]                                    # holes: 2 pages at 0, 3 pages at 3
    gc.collect()
    _, three = roundtrip(writer, reader, {"a": np.full(3 * page, 7, np.uint8)})
    _, two = roundtrip(writer, reader, {"a": np.full(2 * page, 8, np.uint8)})
    _, more = roundtrip(writer, reader, {"a": np.full(2 * page, 9, np.uint8)})
    at = lambda m: int(m.body["a"].ctypes.data - reader.data.ctypes.data) // page  # noqa: E731
    assert (at(three), at(two), at(more)) == (3, 0, 8)       # the 2-page hole was too small for 3
    for m, v in ((three, 7), (two, 8), (more, 9), (held[0], 1), (held[1], 3)):
        assert (m.body["a"] == v).all()


def test_a_full_ring_falls_back_to_frames_and_nothing_is_lost(ring):
    reader, writer = ring
    held = [roundtrip(writer, reader, {"a": np.full(MIB // 4, i, np.float32)})[1] for i in range(4)]
    assert reader.in_use_bytes() == 4 * MIB
    frames, msg = roundtrip(writer, reader, {"a": np.full(MIB // 4, 9, np.float32)})
    assert len(frames) == 2 and writer.full == 1  # went as a frame
    assert not np.shares_memory(msg.body["a"], reader.data)   # not a view of the ring
    np.testing.assert_array_equal(msg.body["a"], np.full(MIB // 4, 9, np.float32))
    for i, m in enumerate(held):  # the held ones were not overwritten
        assert float(m.body["a"][0]) == i and float(m.body["a"][-1]) == i


def test_a_message_that_fails_to_encode_hands_its_pages_back(ring):
    reader, writer = ring
    with pytest.raises(ProtocolError, match="cannot encode"):
        codec.encode("reply", 1, "op", {"a": np.ones(MIB, np.uint8), "bad": object()}, shm=writer)
    assert int(writer.pagemap.sum()) == 0




@pytest.mark.parametrize("offset, nbytes, why", [
    (12345, MIB, "not a page-aligned"),
    (-shm.PAGE, MIB, "not a page-aligned"),
    (4 * MIB - shm.PAGE, MIB, "outside"),
    (0, MIB, "not marked in use"),
    ("x", MIB, "not a page-aligned"),
])
def test_the_coordinator_refuses_bad_region_announcements(ring, offset, nbytes, why):
    reader, _ = ring
    import msgpack
    body = msgpack.packb({"v": codec_version(), "kind": "reply", "id": 1, "op": "op",
                          "body": {"a": msgpack.ExtType(codec.EXT_ARRAY, (0).to_bytes(4, "little"))}},
                         use_bin_type=True)
    head = msgpack.packb({"a": [["uint8", [nbytes], 0, offset]]}, use_bin_type=True) + body
    with pytest.raises(ProtocolError, match=why):
        codec.decode([head], shm=reader)
    assert reader.in_use_bytes() == 0


def test_overlapping_a_live_tensor_and_rings_on_ringless_connections_are_refused(ring):
    reader, writer = ring
    frames, msg = roundtrip(writer, reader, {"a": np.ones(MIB, np.uint8)})
    again = [bytes(f) for f in frames]  # a replay of the same announcement while the first is alive
    with pytest.raises(ProtocolError, match="overlaps a tensor still in use"):
        codec.decode(again, shm=reader)
    with pytest.raises(ProtocolError, match="no ring"):
        codec.decode(again, shm=None)
    np.testing.assert_array_equal(msg.body["a"], np.ones(MIB, np.uint8))


def test_views_outlive_the_ring_being_closed():
    reader = shm.RingReader(MIB)
    writer = shm.RingWriter(reader.fd, reader.size)
    _, msg = roundtrip(writer, reader, {"a": np.full(MIB // 8, 3.0)})
    writer.close()
    reader.close()  # the mapping stays while a view exists
    assert float(msg.body["a"].sum()) == 3.0 * (MIB // 8)


def test_bad_ring_size_setting_is_named(monkeypatch):
    monkeypatch.setenv(shm.SIZE_ENV, "lots")
    with pytest.raises(ProtocolError, match="LOCKSTEP_SHM_MIB"):
        shm.configured_bytes()
    monkeypatch.setenv(shm.SIZE_ENV, "0")
    assert shm.configured_bytes() == 0


def codec_version():
    from protocol import PROTOCOL_VERSION
    return PROTOCOL_VERSION


@pytest.mark.parametrize("ring_mib", ["256", "0", "1"])
@pytest.mark.timeout(60)
def test_a_launched_worker_streams_through_the_ring(tmp_path, monkeypatch, ring_mib):
    """Through a real worker process: partials and the reply arrive intact with the ring
    (256 MiB), without it (0: frames only) and with a ring too small to hold them (1 MiB)."""
    from conftest import FAKE
    from coordinator.session import Session, WorkerSpec
    monkeypatch.setenv(shm.SIZE_ENV, ring_mib)
    sizes = [1 << 18, 3 << 18, 100, 1 << 20]  # 1 MiB, 3 MiB, tiny, 4 MiB of float32
    got = {}
    with Session(tmp_path / "run") as s:
        s.launch(WorkerSpec("torch", [sys.executable, FAKE, "torch"], framework="torch"))
        hello = s.wait_hello(timeout=30)["torch"]
        reply = s.request("torch", "tensors", {"sizes": sizes, "stream": True},
                          on_partial=lambda name, b: got.__setitem__(b["i"], b["t"]))
        for i, n in enumerate(sizes):
            want = (np.arange(n, dtype=np.float32) * 0.5 + i).astype(np.float32)
            np.testing.assert_array_equal(reply[f"t{i}"], want)
            np.testing.assert_array_equal(got[i], want)
        with pytest.raises(Exception, match="cannot encode"):
            s.request("torch", "tensors", {"sizes": [1 << 20], "unencodable": True})
        stats = s.stats()["shm"]
        del reply
        got.clear()  # drop the received views: their pages go back
        gc.collect()
        counters = s.request("torch", "ping", {})
    if ring_mib == "0":
        assert hello["shm_bytes"] == 0 and stats == {}
    else:
        assert hello["shm_bytes"] == int(ring_mib) * MIB
        assert stats["torch"]["tensors"] >= (6 if ring_mib == "256" else 1)
        assert counters["shm_tensors"] == stats["torch"]["tensors"]
        if ring_mib == "1":
            assert counters["shm_full"] >= 1


@pytest.mark.timeout(120)
def test_fake_run_reports_ring_traffic_and_a_bad_ring_size_is_a_usage_error(tmp_path):
    from conftest import ROOT, coordinator, fake_env, load_summary
    base = ["run", "--steps", "weights,forward", "--mapping", str(ROOT / "tests/data/fake_mlp.toml")]
    env = fake_env()
    env[shm.SIZE_ENV] = "lots"
    bad = coordinator(base + ["--out", str(tmp_path / "bad")], env=env)
    assert bad.returncode == 2 and "LOCKSTEP_SHM_MIB" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
    env[shm.SIZE_ENV] = "64"
    ok = coordinator(base + ["--out", str(tmp_path / "ok")], env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rings = load_summary(tmp_path / "ok")["protocol"]["shm"]
    assert set(rings) == {"torch", "paddle"}  # both local workers got one (the fake MLP's tensors are tiny:
    assert all(r["tensors"] == 0 for r in rings.values())  # all under 64 KiB, so none used it)


def _rss_shmem_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssShmem:"))


def test_populate_free_makes_the_next_tensors_pages_resident_after_the_live_ones():
    reader = shm.RingReader(16 * MIB)
    writer = shm.RingWriter(reader.fd, reader.size)
    try:
        _, held = roundtrip(writer, reader, {"a": np.ones(MIB // 4, np.float32)})  # pages [0, 1 MiB) in use
        assert writer.touched == MIB  # put() populated what it wrote
        before = _rss_shmem_kib()
        assert writer.populate_free(0) == 0 and _rss_shmem_kib() == before  # control: nothing asked, nothing done
        done = writer.populate_free(4 * MIB)  # first-fit puts the next 4 MiB after the live tensor
        assert done == 4 * MIB and writer.touched == 5 * MIB
        assert _rss_shmem_kib() - before >= 4 * 1024  # resident now, not at the first copy
        assert writer.populate_free(4 * MIB) == 0  # already there
        assert writer.populate_free(100 * MIB) == 11 * MIB and writer.touched == 16 * MIB  # capped at the ring
        _, msg = roundtrip(writer, reader, {"b": np.full(MIB, 2.0, np.float32)})
        np.testing.assert_array_equal(msg.body["b"], np.full(MIB, 2.0, np.float32))
        np.testing.assert_array_equal(held.body["a"], np.ones(MIB // 4, np.float32))
        del msg, held
    finally:
        writer.close()
        reader.close()


@pytest.mark.timeout(60)
def test_ring_warm_op_populates_a_launched_workers_ring_and_refuses_a_bad_body(tmp_path, monkeypatch):
    from conftest import FAKE
    from coordinator.session import Session, WorkerSpec
    from coordinator.errors import WorkerFailed
    monkeypatch.setenv(shm.SIZE_ENV, "64")
    with Session(tmp_path / "run") as s:
        s.launch(WorkerSpec("torch", [sys.executable, FAKE, "torch"], framework="torch"))
        s.wait_hello(timeout=30)
        first = s.warm_rings({"torch": 8 * MIB, "paddle": 8 * MIB})  # paddle was never launched: skipped
        assert set(first) == {"torch"} and first["torch"]["warmed"] == 8 * MIB
        assert s.warm_rings({"torch": 8 * MIB})["torch"]["warmed"] == 0  # the same pages: nothing new
        assert s.warm_rings({"torch": 0}) == {}
        with pytest.raises(WorkerFailed, match="torch worker failed in op 'ring_warm': ValueError: ring_warm wants"):
            s.request("torch", "ring_warm", {"bytes": "lots"})
        assert s.request("torch", "ping", {})["requests"] >= 3  # the worker carried on


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.timeout(60)
def test_batched_partials_wait_for_company_and_arrive_in_order(tmp_path, monkeypatch, batch):
    """Hooks send one small message per layer; batched, they are queued and sent together (at
    BATCH messages, or at the next partial once the oldest waited BATCH_S, or when the op ends).
    Three batched partials followed by a 1 s pause arrive only after it; the control (not
    batched) arrives before. Nothing is lost or reordered, ring tensors and frames alike."""
    monkeypatch.setenv("LOCKSTEP_BATCH_S", "0.5")   # the first three are queued well within it
    import time
    from conftest import FAKE
    from coordinator.session import Session, WorkerSpec
    from protocol.worker import BATCH
    sizes = [1 << 18, 100, 3 << 18] + [1 << 16] * (BATCH + 5)  # ring, frame, ring, then enough to fill a batch
    got: list[tuple[int, float]] = []
    arrays = {}

    def on_partial(name, b):
        got.append((b["i"], time.time()))
        arrays[b["i"]] = b["t"]
    with Session(tmp_path / "run") as s:
        s.launch(WorkerSpec("torch", [sys.executable, FAKE, "torch"], framework="torch"))
        s.wait_hello(timeout=30)
        t0 = time.time()
        s.request("torch", "tensors", {"sizes": sizes, "stream": True, "batch": batch, "pause": [2, 1.0]},
                  on_partial=on_partial)
        assert [i for i, _ in got] == list(range(len(sizes)))
        for i, n in enumerate(sizes):
            np.testing.assert_array_equal(arrays[i], (np.arange(n, dtype=np.float32) * 0.5 + i).astype(np.float32))
        first_three = max(t for i, t in got[:3]) - t0
        if batch:
            assert first_three >= 1.0, first_three
        else:
            assert first_three < 0.9, first_three

        got.clear()   # a failing op: what it queued arrives before the error, and its pages come back
        with pytest.raises(Exception, match="failed after partial 2"):
            s.request("torch", "tensors", {"sizes": sizes, "stream": True, "batch": batch, "raise_after": 2},
                      on_partial=on_partial)
        assert [i for i, _ in got] == [0, 1, 2]
        arrays.clear()
        gc.collect()
        assert s.workers["torch"].ring.in_use_bytes() == 0


def test_batch_wait_setting_is_checked():
    from protocol.worker import _batch_seconds
    assert _batch_seconds(None) == _batch_seconds("") == 0.02
    assert _batch_seconds("0") == 0.0 and _batch_seconds("0.5") == 0.5
    assert _batch_seconds("soon") == 0.02 and _batch_seconds("-1") == 0.02   # named on stderr, default kept


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_a_large_copy_split_over_threads_lands_whole(ring, threads):
    """Many-core workers split a large copy into the ring over threads: every byte lands, odd
    sizes too (control: one thread)."""
    reader, writer = ring
    writer.copy_threads = threads
    arr = np.random.RandomState(threads).standard_normal(3 * MIB // 4 + 13).astype(np.float32)  # not a part multiple
    _, msg = roundtrip(writer, reader, {"t": arr})
    np.testing.assert_array_equal(msg.body["t"], arr)
    assert (writer._pool is not None) == (threads > 1)


def test_copy_threads_setting():
    assert shm.copy_threads({"LOCKSTEP_THREADS": "2"}) == 1          # small hosts: one thread
    assert shm.copy_threads({"LOCKSTEP_THREADS": "8"}) == 4
    assert shm.copy_threads({"LOCKSTEP_THREADS": "64"}) == 8
    assert shm.copy_threads({"LOCKSTEP_THREADS": "8", "LOCKSTEP_COPY_THREADS": "2"}) == 2
    assert shm.copy_threads({"LOCKSTEP_COPY_THREADS": "x"}) == 1
    assert shm.copy_threads({}) == 1


def _host_copy(src: np.ndarray, calls: list) -> codec.HostCopy:
    """What torch_worker.adapter.to_wire makes of a GPU tensor, with a numpy array as the 'device'."""
    def fill(dst):
        calls.append(("fill", dst.dtype, dst.shape, dst.flags.c_contiguous and dst.flags.writeable))
        dst[...] = src
    return codec.HostCopy(src.dtype, src.shape, fill, lambda: (calls.append(("host",)), src.copy())[1])


def test_host_copy_is_written_straight_into_the_ring(ring):
    reader, writer = ring
    src = np.arange(300_000, dtype=np.float32).reshape(300, 1000)
    calls: list = []
    frames, msg = roundtrip(writer, reader, {"t": _host_copy(src, calls)}, kind="partial")
    assert calls == [("fill", np.dtype(np.float32), (300, 1000), True)]   # no host array in between
    assert len(frames) == 1 and reader.tensors == 1
    np.testing.assert_array_equal(msg.body["t"], src)
    assert not msg.body["t"].flags.owndata


def test_host_copy_without_ring_or_too_small_becomes_a_host_array(ring):
    reader, writer = ring
    src = np.arange(300_000, dtype=np.float32)
    calls: list = []
    msg = codec.decode([bytes(f) for f in codec.encode("partial", 1, "op", {"t": _host_copy(src, calls)})])
    assert calls == [("host",)]
    np.testing.assert_array_equal(msg.body["t"], src)
    small = np.arange(10, dtype=np.int64)
    _, msg = roundtrip(writer, reader, {"t": _host_copy(small, calls)})
    assert calls[-1] == ("host",) and reader.tensors == 0 and writer.full == 0
    np.testing.assert_array_equal(msg.body["t"], small)


def test_host_copy_without_room_goes_as_frames_counted_once(ring):
    reader, writer = ring
    held = [roundtrip(writer, reader, {"a": np.full(MIB // 4, i, np.float32)})[1] for i in range(4)]   # full
    calls: list = []
    src = np.arange(MIB // 4, dtype=np.float32)
    frames, msg = roundtrip(writer, reader, {"t": _host_copy(src, calls)})
    assert calls == [("host",)] and len(frames) == 2 and writer.full == 1   # one refusal, one count
    np.testing.assert_array_equal(msg.body["t"], src)
    assert len(held) == 4


def test_host_copy_that_fails_frees_its_pages_and_names_the_op(ring):
    reader, writer = ring
    ok = np.ones(MIB // 4, np.float32)

    def broken(dst):
        raise RuntimeError("CUDA error: an illegal memory access")
    bad = codec.HostCopy(np.float32, (MIB // 4,), broken, lambda: ok)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        codec.encode("partial", 1, "capture_layers", {"a": ok, "b": bad}, shm=writer)
    assert int(writer.pagemap.sum()) == 0        # neither the first tensor's pages nor the failed one's stay taken
    _, msg = roundtrip(writer, reader, {"a": ok})
    assert reader.in_use_bytes() == MIB


def test_host_copy_refuses_dtypes_the_wire_does_not_carry():
    with pytest.raises(TypeError, match="HostCopy of dtype complex64"):
        codec.HostCopy(np.complex64, (4,), lambda d: None, lambda: None)
    with pytest.raises(TypeError, match=">f4"):
        codec.HostCopy(np.dtype(">f4"), (4,), lambda d: None, lambda: None)
