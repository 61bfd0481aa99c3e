"""Transport benchmark: our codec + ZeroMQ sockets vs a plain numpy copy.

A sender process encodes float32 tensors (msgpack header + raw frames, zero-copy send) over
an ipc socket; the receiver decodes them into numpy arrays (no copy). Throughput is compared
with numpy memcpy of the same size in the same run. Usage:

    .venv/bin/python bench/transport.py            # 4 KiB, 1 MiB, 16 MiB, 128 MiB
    .venv/bin/python bench/transport.py --smoke    # tiny sizes, for CI
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from protocol.codec import decode, encode  # noqa: E402


def memcpy_gbps(nbytes: int, reps: int) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(reps):
        np.copyto(dst, src)
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


def _pair_sender(endpoint: str, nbytes: int, reps: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.connect(endpoint)
    a = np.ones(nbytes // 4, np.float32)
    s.recv()
    for i in range(reps):
        s.send_multipart(encode("partial", i, "bench", {"t": a}), copy=False)
    s.recv()
    s.close(linger=1000)
    ctx.term()


def pair_gbps(nbytes: int, reps: int, endpoint: str) -> float:
    ctx = zmq.Context()
    r = ctx.socket(zmq.PAIR)
    r.bind(endpoint)
    p = mp.get_context("fork").Process(target=_pair_sender, args=(endpoint, nbytes, reps))
    p.start()
    r.send(b"go")
    t0 = time.perf_counter()
    total = 0
    for _ in range(reps):
        msg = decode(r.recv_multipart(copy=False))
        total += msg.body["t"].nbytes
    took = time.perf_counter() - t0
    r.send(b"done")
    p.join(10)
    r.close(0)
    ctx.term()
    assert total == nbytes * reps
    return total / took / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI keeps the script from rotting)")
    args = ap.parse_args()
    sizes = [4 << 10, 64 << 10] if args.smoke else [4 << 10, 1 << 20, 16 << 20, 128 << 20]
    print(f"{'size':>9} {'memcpy GB/s':>12} {'codec+zmq GB/s':>15} {'ratio':>7}")
    d = tempfile.mkdtemp(prefix="lsb-")
    for n in sizes:
        reps = max(3, min(2000, (512 << 20) // n)) if not args.smoke else 20
        m = memcpy_gbps(n, reps)
        s = pair_gbps(n, reps, f"ipc://{d}/p{n}")
        label = f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
        print(f"{label:>9} {m:12.2f} {s:15.2f} {s / m:7.1%}")


if __name__ == "__main__":
    main()
