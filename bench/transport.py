"""Transport benchmark: our codec + ZeroMQ DEALER -> ROUTER over ipc vs a plain numpy copy.

A sender process (the worker's side: DEALER, zero-copy send) encodes float32 tensors with
``protocol.codec.encode``; the receiver (the coordinator's side: ROUTER with the same
options as ``coordinator.session.Session``) decodes them into numpy arrays. Throughput is
compared with numpy memcpy of the same size in the same run. The memcpy baseline copies
slices that walk through 64 MiB buffers, so it is **not** cache-resident (a 1 MiB copy
repeated in place runs from L2/L3 at 40+ GB/s and is no fair yardstick for a transfer whose
bytes are new each time).

    .venv/bin/python bench/transport.py [--rounds 3]        # 4 KiB, 1 MiB, 16 MiB, 128 MiB
    .venv/bin/python bench/transport.py --chunk-mib 32 --sockbuf-mib 0   # the old settings
    .venv/bin/python bench/transport.py --smoke              # tiny sizes, for CI

Each size is measured ``--rounds`` times; the table shows the median and the best round
(the machine is shared: the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from protocol import codec, shm  # noqa: E402
from protocol.codec import decode, encode  # noqa: E402

POOL_BYTES = 64 << 20


def memcpy_gbps(nbytes: int, reps: int) -> float:
    """Copy ``nbytes`` slices walking through 64 MiB buffers (bigger sizes: whole buffers)."""
    pool = max(POOL_BYTES, nbytes)
    src = np.ones(pool, np.uint8)
    dst = np.ones(pool, np.uint8)  # touched: no page faults inside the timing
    slots = pool // nbytes
    t0 = time.perf_counter()
    for i in range(reps):
        off = (i % slots) * nbytes
        np.copyto(dst[off:off + nbytes], src[off:off + nbytes])
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


def socket_gbps(nbytes: int, reps: int) -> float:
    """The ceiling for any socket transport here: a raw AF_UNIX stream between two processes,
    4 MiB kernel buffers, the receiver reading into one preallocated, touched buffer (no
    framing, no allocation, no decode). Both kernel copies, nothing else."""
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    p = mp.get_context("fork").Process(target=_raw_sender, args=(a, nbytes, reps))
    p.start()
    a.close()
    dst = np.ones(nbytes, np.uint8)
    mv = memoryview(dst)
    try:
        t0 = time.perf_counter()
        for _ in range(reps):
            got = 0
            while got < nbytes:
                k = b.recv_into(mv[got:], nbytes - got)
                if not k:
                    raise RuntimeError("raw socket sender went away")
                got += k
        took = time.perf_counter() - t0
    finally:
        b.close()
        p.join(30)
        if p.is_alive():
            p.kill()
    return nbytes * reps / took / 1e9


def _raw_sender(sock: object, nbytes: int, reps: int) -> None:
    mv = memoryview(np.ones(nbytes, np.uint8))
    for _ in range(reps):
        sock.sendall(mv)  # type: ignore[attr-defined]
    sock.close()  # type: ignore[attr-defined]


def _sender(endpoint: str, nbytes: int, reps: int, chunk: int, sockbuf: int, ring: tuple | None) -> None:
    codec.CHUNK_BYTES = chunk  # the worker's encode() splits tensors at this size
    writer = shm.RingWriter(*ring) if ring else None  # what protocol.worker.serve opens
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"bench")
    if sockbuf:
        s.setsockopt(zmq.SNDBUF, sockbuf)
        s.setsockopt(zmq.RCVBUF, sockbuf)
    s.connect(endpoint)
    a = np.ones(nbytes // 4, np.float32)
    s.send(b"ready")
    s.recv()
    for i in range(reps):
        s.send_multipart(encode("partial", i, "bench", {"t": a}, shm=writer), copy=False)  # as the worker sends
    s.recv()
    s.close(linger=1000)
    ctx.term()


def zmq_gbps(nbytes: int, reps: int, endpoint: str, chunk: int, sockbuf: int, ring_bytes: int = 0,
             warm: bool = False) -> float:
    """Send ``reps`` tensors of ``nbytes``; time from the first request to the last decode.

    ``ring_bytes``: a shared-memory ring of that size, as ``Session.launch`` gives a local
    worker (0: frames only, the path of remote workers); ``warm``: its pages touched once
    before timing, as they are after a run's first tensors went through."""
    reader = shm.RingReader(ring_bytes) if ring_bytes else None
    if reader and warm:
        reader.prefault()
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    r.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
    if sockbuf:
        r.setsockopt(zmq.SNDBUF, sockbuf)
        r.setsockopt(zmq.RCVBUF, sockbuf)
    r.bind(endpoint)
    ring = (reader.fd, reader.size) if reader else None
    p = mp.get_context("fork").Process(target=_sender, args=(endpoint, nbytes, reps, chunk, sockbuf, ring))
    p.start()
    try:
        ident, _ = r.recv_multipart()
        r.send_multipart([ident, b"go"])
        t0 = time.perf_counter()
        total = 0
        for _ in range(reps):
            msg = decode(r.recv_multipart(copy=False)[1:], shm=reader)
            total += msg.body["t"].nbytes
            del msg  # the coordinator compares and drops: ring pages go back
        took = time.perf_counter() - t0
        r.send_multipart([ident, b"done"])
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
        r.close(0)
        ctx.term()
        if reader:
            reader.close()
    assert total == nbytes * reps
    return total / took / 1e9


def label(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI keeps the script from rotting)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per size (median and best shown)")
    ap.add_argument("--chunk-mib", type=float, default=codec.CHUNK_BYTES / (1 << 20),
                    help="codec chunk size (default: protocol.codec.CHUNK_BYTES)")
    ap.add_argument("--sockbuf-mib", type=float, default=None,
                    help="SNDBUF/RCVBUF on both sockets, 0 = OS default "
                         "(default: protocol.codec.SOCKET_BUFFER_BYTES if present)")
    ap.add_argument("--ring-mib", type=float, default=shm.configured_bytes() / (1 << 20),
                    help="shared-memory ring per worker for the 'ring' path (default: LOCKSTEP_SHM_MIB or "
                         f"{shm.DEFAULT_MIB}); 0 measures frames only")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="leave glibc's malloc defaults (the coordinator tunes its own: coordinator/placement.py)")
    args = ap.parse_args()
    tuned = False
    if not args.glibc_malloc:
        from coordinator.placement import tune_own_malloc
        tuned = tune_own_malloc()  # as `coordinator run` does at start; the forked sender inherits it
    sockbuf_default = getattr(codec, "SOCKET_BUFFER_BYTES", 0)
    sockbuf = sockbuf_default if args.sockbuf_mib is None else int(args.sockbuf_mib * (1 << 20))
    chunk = int(args.chunk_mib * (1 << 20))
    ring = int(args.ring_mib * (1 << 20)) // shm.PAGE * shm.PAGE if shm.available() else 0
    sizes = [4 << 10, 1 << 20] if args.smoke else [4 << 10, 1 << 20, 16 << 20, 128 << 20]
    rounds = 1 if args.smoke else args.rounds
    paths = [("frames", 0, False)] + ([("ring", ring, False), ("ring*", ring, True)] if ring else [])
    print(f"chunk {chunk / (1 << 20):g} MiB, socket buffers {sockbuf / (1 << 20):g} MiB (0 = OS default), "
          f"ring {ring / (1 << 20):g} MiB, {rounds} round(s), cpus {os.cpu_count()}, "
          f"malloc {'tuned as the coordinator' if tuned else 'glibc defaults'}")
    print("frames: every byte through the ipc socket (remote workers); ring: the shared-memory path "
          "Session.launch gives local workers (tensors under 64 KiB still go as frames), fresh pages; "
          "ring*: the same with the ring's pages touched once before (a run's steady state); "
          "socket: a raw unix socket between two processes, the ceiling for frames on this machine")
    print(f"{'size':>8} {'path':>7} {'memcpy GB/s':>12} {'med GB/s':>9} {'best GB/s':>10} {'ratio med':>10} "
          f"{'ratio best':>11} {'socket GB/s':>12} {'of socket':>10}")
    d = tempfile.mkdtemp(prefix="lsb-")
    for n in sizes:
        reps = 20 if args.smoke else max(4, min(4000, (512 << 20) // n))
        for path, ring_bytes, warm in paths:
            mem, got, raw = [], [], []
            for k in range(rounds):
                mem.append(memcpy_gbps(n, reps))
                got.append(zmq_gbps(n, reps, f"ipc://{d}/p{n}-{path}-{k}", chunk, sockbuf, ring_bytes, warm))
                if path == "frames" and n >= 1 << 20:
                    raw.append(socket_gbps(n, reps))
            m = max(mem)  # the memcpy yardstick at its best: ratios are conservative
            med, best = statistics.median(got), max(got)
            sock = f"{max(raw):12.2f} {med / max(raw):10.1%}" if raw else ""
            print(f"{label(n):>8} {path:>7} {m:12.2f} {med:9.2f} {best:10.2f} {med / m:10.1%} {best / m:11.1%} {sock}",
                  flush=True)


if __name__ == "__main__":
    main()
