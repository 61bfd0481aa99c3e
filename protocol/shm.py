"""Shared-memory fast path for tensors a local worker sends to the coordinator.

Over a socket every tensor byte is copied twice by the kernel and once more by
ZeroMQ's I/O threads, all competing with both frameworks for the same cores; on the
2-core reference machine that tops out near a quarter of memcpy (bench/RESULTS.md).
For a worker the coordinator launched itself, tensors instead go through one
anonymous shared file (``memfd``) per worker: the worker copies the tensor into free
pages once and sends only the header; the coordinator's array is a view of those
pages, no copy, and the pages are handed back when the last view of the array dies.

Layout of the file::

    [0, 4096)                 header: magic, page size, page count
    [4096, 4096 + MAP)        page map: one byte per data page, 0 free / 1 in use
    [4096 + MAP, ...)         data pages (PAGE bytes each)

Ownership of a map byte is one-directional: only the worker sets 0 -> 1 (for pages
it saw free), only the coordinator sets 1 -> 0 (for pages whose tensor it has
dropped), so neither side ever writes a byte the other may be writing.

Trust: the coordinator validates every region a message announces (page-aligned,
inside the data area, pages marked in use, not overlapping a live tensor) before it
makes a view, and raises ProtocolError otherwise. The worker can still change the
bytes of a tensor it has sent; that is no more than sending different bytes, and
memory safety never depends on it. Remote workers (tcp) have no ring: frames only.

``LOCKSTEP_SHM_MIB`` sets the ring size per worker (default 1024; 0 turns the fast
path off). When the ring is full the worker simply sends frames. Pages are touched only
when used, so a ring costs memory up to the most tensor bytes the coordinator held from
that worker at once (BERT-base backward: every gradient and parameter, 836 MiB) -- the
same peak those tensors would take as received frames, kept for the session.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import sys
import weakref
from typing import Any

import numpy as np

from .errors import ProtocolError

PAGE = 64 << 10           # allocation granularity
MIN_BYTES = PAGE          # smaller tensors travel as frames (the header dominates anyway)
HEADER = 4096
MAGIC = b"LSRING01"
ENV = "LOCKSTEP_SHM"      # "<fd>:<data bytes>", set by the coordinator for the worker it launches
SIZE_ENV = "LOCKSTEP_SHM_MIB"
DEFAULT_MIB = 1024
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14; Python < 3.13 lacks the name


def configured_bytes() -> int:
    """Ring size from ``LOCKSTEP_SHM_MIB`` (0: no ring); whole pages."""
    raw = os.environ.get(SIZE_ENV, "")
    try:
        mib = float(raw) if raw else DEFAULT_MIB
    except ValueError:
        raise ProtocolError(f"{SIZE_ENV}={raw!r} is not a number of MiB") from None
    if mib < 0:
        raise ProtocolError(f"{SIZE_ENV}={raw!r} is negative")
    return int(mib * (1 << 20)) // PAGE * PAGE


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


class _Anchor(np.ndarray):
    """Region owner: its own base is the mmap (not an array), so numpy's view chains stop
    here and every view of a received tensor keeps it alive; its finalizer frees the pages."""


class _Ring:
    def __init__(self, fd: int, data_bytes: int):
        if data_bytes < PAGE or data_bytes % PAGE:
            raise ProtocolError(f"shared-memory ring of {data_bytes} bytes is not a positive number of pages")
        self.npages = data_bytes // PAGE
        self.size = data_bytes
        self.data_off = HEADER + math.ceil(self.npages / 4096) * 4096
        self.total = self.data_off + data_bytes
        self.mm = mmap.mmap(fd, self.total, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        whole = np.frombuffer(self.mm, np.uint8, self.data_off)
        self.pagemap = whole[HEADER:HEADER + self.npages]
        self.data = np.ndarray.__new__(np.ndarray, (data_bytes,), np.uint8, buffer=self.mm, offset=self.data_off)

    def close(self) -> None:
        """Drop this end's references; the mapping goes with the last array viewing it.

        Never ``mmap.close()``: numpy arrays made with ``buffer=`` keep the mmap object
        but no buffer export, so closing it would leave received tensors dangling.
        """
        self.pagemap = self.data = self.mm = None  # type: ignore[assignment]


class RingReader(_Ring):
    """The coordinator's end: creates the file, turns announced regions into arrays."""

    def __init__(self, data_bytes: int):
        fd = os.memfd_create("lockstep-tensors", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, HEADER + math.ceil(data_bytes // PAGE / 4096) * 4096 + data_bytes)
            super().__init__(fd, data_bytes)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd  # handed to the worker (pass_fds), then closed by close_fd()
        self.mm[0:24] = MAGIC + struct.pack("<QQ", PAGE, self.npages)
        self.live = np.zeros(self.npages, bool)
        self.tensors = 0
        self.bytes = 0

    def env_value(self) -> str:
        return f"{self.fd}:{self.size}"

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_fd()
        super().close()

    def prefault(self) -> None:
        """Touch every page once. A page's first write costs a fault and zeroing (~1.4 GB/s on
        the reference VM against ~10 GB/s for memcpy); pages then stay for the session. Runs
        fault them lazily (first-fit reuse keeps the touched set at the high-water mark of
        held tensors); benchmarks call this to measure the steady state."""
        self.data[::4096] = 0

    def in_use_bytes(self) -> int:
        return int(self.live.sum()) * PAGE

    def view(self, offset: Any, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The array a message announces at ``offset``; validated, zero-copy."""
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset % PAGE:
            raise ProtocolError(f"shared-memory offset {offset!r:.40} is not a page-aligned position")
        if nbytes < 1 or offset + nbytes > self.size:
            raise ProtocolError(f"shared-memory region [{offset}, {offset + nbytes}) is outside the "
                                f"{self.size}-byte ring")
        first, count = offset // PAGE, math.ceil(nbytes / PAGE)
        pages = slice(first, first + count)
        if self.live[pages].any():
            raise ProtocolError(f"shared-memory region at {offset} overlaps a tensor still in use")
        if not self.pagemap[pages].all():
            raise ProtocolError(f"shared-memory region at {offset} was not marked in use by the worker")
        self.live[pages] = True
        anchor = np.ndarray.__new__(_Anchor, (nbytes,), np.uint8, buffer=self.mm, offset=self.data_off + offset)
        weakref.finalize(anchor, _release, weakref.ref(self), first, count)
        self.tensors += 1
        self.bytes += nbytes
        return anchor.view(np.ndarray).view(dtype).reshape(shape)


def _release(ring_ref: "weakref.ref[RingReader]", first: int, count: int) -> None:
    ring = ring_ref()
    if ring is None or ring.pagemap is None:
        return
    ring.live[first:first + count] = False
    ring.pagemap[first:first + count] = 0


class RingWriter(_Ring):
    """The worker's end: copies a tensor into free pages, or says there is no room."""

    def __init__(self, fd: int, data_bytes: int):
        super().__init__(fd, data_bytes)
        magic, page, npages = bytes(self.mm[0:8]), *struct.unpack("<QQ", self.mm[8:24])
        if magic != MAGIC or page != PAGE or npages != self.npages:
            raise ProtocolError(f"shared-memory ring header {magic!r}/{page}/{npages} does not match this "
                                f"worker's {MAGIC!r}/{PAGE}/{self.npages}")
        self.fd = fd
        self.tensors = 0
        self.bytes = 0
        self.full = 0  # tensors that went as frames for lack of room
        self.touched = 0  # data bytes [0, touched) have been written once (first-fit keeps them low)
        self.copy_threads = copy_threads()
        self._pool: Any = None

    def populate(self, upto: int) -> int:
        """Make the data pages below ``upto`` resident and writable in one go; bytes newly done.

        A page's first write otherwise costs a fault plus zeroing each (836 MiB: ~1.0 s on the
        reference VM); allocating the file range and populating the page table in two system
        calls takes ~0.65 s, and ``ring_warm`` lets the coordinator do it for both workers at
        once, before the tensors exist. Kernels without MADV_POPULATE_WRITE just fault lazily.
        """
        upto = min(int(upto), self.size)
        start = self.touched
        if upto <= start:
            return 0
        upto = -(-upto // PAGE) * PAGE
        try:
            os.posix_fallocate(self.fd, self.data_off + start, upto - start)
            self.mm.madvise(MADV_POPULATE_WRITE, self.data_off + start, upto - start)
        except (OSError, ValueError):
            pass  # no fallocate on this file, or an older kernel: the copy faults the pages in
        self.touched = upto
        return upto - start

    def populate_free(self, nbytes: int) -> int:
        """Populate as far as the first ``nbytes`` of free pages reach (where first-fit will put
        the next tensors, after the pages still in use); bytes newly done."""
        free = np.cumsum(self.pagemap == 0)
        need = -(-int(nbytes) // PAGE)
        if need <= 0:
            return 0
        reach = int(np.searchsorted(free, need)) + 1 if need <= free[-1] else self.npages
        return self.populate(reach * PAGE)

    def put(self, raw: np.ndarray) -> int | None:
        """Copy the uint8 bytes ``raw`` into the first free run of pages; its offset, or None."""
        return self.put_with(raw.size, lambda dst: self._copy(dst, raw))

    def put_with(self, n: int, fill: Any) -> int | None:
        """Reserve the first free run of pages for ``n`` bytes and let ``fill(dst)`` write them
        (``dst``: a uint8 view of the run; a GPU tensor is copied device-to-ring this way, with no
        host array in between); its offset, or None when there is no room. If ``fill`` raises,
        the pages are free again."""
        if n < MIN_BYTES or n > self.size:
            return None
        need = math.ceil(n / PAGE)
        # First fit: the lowest run of ``need`` free (0) pages. One substring search over a
        # snapshot of the map (16 KB for 1 GiB) costs ~2 us for a BERT-sized tensor, the numpy
        # run-length scan it replaced ~25 us. The coordinator only ever frees pages meanwhile, so a
        # snapshot can miss a run freed just now, never hand out one in use.
        first = self.pagemap.tobytes().find(bytes(need))
        if first < 0:
            self.full += 1
            return None
        self.pagemap[first:first + need] = 1
        offset = first * PAGE
        try:
            if offset + n > self.touched:
                self.populate(offset + n)
            fill(self.data[offset:offset + n])
        except BaseException:
            self.pagemap[first:first + need] = 0
            raise
        self.tensors += 1
        self.bytes += n
        return offset

    def _copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """One copy into the ring; a large one split over ``copy_threads`` threads (numpy drops the
        GIL while it copies). A hook copies while the framework's own compute threads wait for
        it, so on a many-core host this takes cores that would idle: 202 MiB per forward of the
        benchmark stack is ~40 ms on one thread (bench/RESULTS.md, layer capture)."""
        n = src.size
        parts = min(self.copy_threads, n // COPY_PART_MIN)
        if parts < 2:
            np.copyto(dst, src)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self.copy_threads, thread_name_prefix="lockstep-ring")
        step = -(-n // parts)
        list(self._pool.map(lambda lo: np.copyto(dst[lo:lo + step], src[lo:lo + step]), range(0, n, step)))

    def unput(self, offset: int, nbytes: int) -> None:
        """Hand back pages of a message that was never sent (the coordinator never saw them)."""
        first = offset // PAGE
        self.pagemap[first:first + math.ceil(nbytes / PAGE)] = 0
        self.tensors -= 1
        self.bytes -= nbytes


COPY_ENV = "LOCKSTEP_COPY_THREADS"
COPY_PART_MIN = 1 << 20   # bytes per copying thread, at least


def copy_threads(environ: Any = None) -> int:
    """Threads for one large copy into the ring: ``LOCKSTEP_COPY_THREADS``, else 1 for a worker
    of up to 4 threads (2 cores: measured no gain, the coordinator needs the other core) and
    half its threads, at most 8, above that."""
    env = os.environ if environ is None else environ
    raw = env.get(COPY_ENV, "")
    if raw.strip():
        try:
            return max(1, int(raw))
        except ValueError:
            print(f"lockstep: {COPY_ENV}={raw!r} is not a number; copying on one thread", file=sys.stderr)
            return 1
    try:
        threads = int(env.get("LOCKSTEP_THREADS", "") or 0)
    except ValueError:
        threads = 0
    return 1 if threads <= 4 else min(8, threads // 2)


def writer_from_env() -> RingWriter | None:
    """The ring the coordinator handed this worker, if any; a broken one is reported and skipped."""
    raw = os.environ.pop(ENV, "")
    if not raw:
        return None
    try:
        fd_text, size_text = raw.split(":")
        return RingWriter(int(fd_text), int(size_text))
    except (ValueError, OSError, ProtocolError) as exc:
        print(f"lockstep: shared-memory ring {ENV}={raw!r} unusable ({exc}); sending tensors as frames",
              file=sys.stderr, flush=True)
        return None
