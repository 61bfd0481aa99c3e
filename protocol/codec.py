"""Codec: one small msgpack header frame, then raw frames for every tensor.

``encode(kind, id, op, body) -> frames`` and ``decode(frames) -> Message`` hold no
sockets. Arrays anywhere inside ``body`` (nested dicts/lists) are replaced in the
header by a msgpack ext placeholder that points into an ``arrays`` table of
``[dtype, shape, nframes]``; their bytes travel as separate frames, large ones split
into chunks so no single ZeroMQ message grows past ``CHUNK_BYTES``.

Decoding trusts nothing: the dtype comes from a fixed whitelist (no object dtypes,
no pickle, ever), ``prod(shape) * itemsize`` must equal the bytes received, every
frame must be consumed, and the header has a size limit.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

from .errors import ProtocolError

# Little-endian, fixed-size numeric dtypes only.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                 "int64", "uint64", "float16", "float32", "float64")
}
BF16 = "bfloat16"  # travels as its uint16 bit pattern

EXT_ARRAY = 1
CHUNK_BYTES = 8 << 20           # split larger tensors (8 MiB: below glibc's mmap ceiling, bench/RESULTS.md)
MAX_HEADER_BYTES = 64 << 20     # a header this large is garbage or abuse


def _frame_limit() -> int:
    """Per-frame size limit: decode() refuses bigger frames, and it is ZeroMQ's MAXMSGSIZE
    on the coordinator's ROUTER (a peer sending more is disconnected before the bytes
    are buffered; an honest worker reconnects).

    ``LOCKSTEP_MAX_FRAME_BYTES`` overrides it (both sides must agree: a local worker
    inherits the coordinator's environment). ``encode`` never produces a larger frame
    (tensors are chunked below it; a larger header is refused by name).
    """
    raw = os.environ.get("LOCKSTEP_MAX_FRAME_BYTES", "")
    try:
        value = int(raw) if raw else 64 << 20
    except ValueError:
        raise ProtocolError(f"LOCKSTEP_MAX_FRAME_BYTES={raw!r} is not an integer") from None
    return max(value, 4096)


MAX_FRAME_BYTES = _frame_limit()  # per-frame limit: chunks and headers stay below it
MAX_MESSAGE_BYTES = 1 << 36     # total tensor bytes one message may announce

KINDS = ("hello", "request", "partial", "reply", "error")


@dataclass
class BFloat16:
    """A bfloat16 tensor as its raw uint16 bits (numpy has no bfloat16)."""

    bits: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.bits, np.ndarray) or self.bits.dtype != np.uint16:
            raise TypeError("BFloat16 needs a uint16 ndarray of bit patterns")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    def to_float32(self) -> np.ndarray:
        """Exact widening: bfloat16 is the top half of a float32."""
        return (self.bits.astype(np.uint32) << 16).view(np.float32)

    @classmethod
    def from_float32(cls, a: np.ndarray) -> "BFloat16":
        """Round to nearest even, as the frameworks do."""
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return cls(rounded.astype(np.uint16))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BFloat16) and self.bits.shape == other.bits.shape and \
            bool(np.array_equal(self.bits, other.bits))


class HostCopy:
    """A tensor its framework copies itself: ``encode`` reserves ring pages and lets it copy straight
    into them (a GPU tensor: once, device to ring, instead of into a host array that is then copied
    again; a CPU one on the framework's own threads). Elsewhere (no ring, a tensor under the ring's
    minimum, no room) ``host()`` makes the array, which goes as frames.

    ``fill(dst)`` writes the tensor into ``dst``, a C-contiguous writable array of ``dtype`` and
    ``shape``, before it returns (``encode`` snapshots, as for any array). ``dtype`` must be one
    of ``DTYPES``; ``host()`` returns an array of it and ``shape``.
    """

    __slots__ = ("dtype", "shape", "nbytes", "fill", "host")

    def __init__(self, dtype: Any, shape: tuple[int, ...], fill: Any, host: Any):
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in DTYPES or self.dtype != DTYPES[self.dtype.name]:
            raise TypeError(f"HostCopy of dtype {self.dtype} (allowed: {', '.join(DTYPES)})")
        self.shape = tuple(int(d) for d in shape)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self.fill, self.host = fill, host


@dataclass
class Message:
    kind: str
    id: int
    op: str
    body: Any = None
    version: int = 0
    nbytes: int = field(default=0, compare=False)
    seconds: float | None = field(default=None, compare=False)  # a reply's worker-side handler time


def _as_le_contiguous(a: np.ndarray) -> np.ndarray:
    name = a.dtype.name
    if name not in DTYPES:
        raise ProtocolError(f"dtype {a.dtype} cannot be sent (allowed: {', '.join(DTYPES)}, bfloat16)")
    want = DTYPES[name]
    if a.dtype != want:
        a = a.astype(want)
    return a if a.flags.c_contiguous else a.copy(order="C")  # keeps 0-d arrays 0-d


def encode(kind: str, id: int, op: str, body: Any = None, version: int | None = None,
           shm: Any = None, seconds: float | None = None) -> list:
    """Return the frames of one message: [header, tensor frames...].

    ``shm`` (a ``protocol.shm.RingWriter``, worker side only): tensors that fit go into
    the shared ring instead of frames; their table entry is ``[dtype, shape, 0, offset]``.
    ``seconds`` (replies): how long the worker's handler computed, header key ``t``.
    """
    from . import PROTOCOL_VERSION

    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r}")
    table: list[list] = []
    frames: list = []
    in_ring: list[tuple[int, int]] = []  # regions to hand back if the message is never sent

    def default(obj: Any) -> Any:
        ring = shm
        if isinstance(obj, HostCopy):
            if shm is not None:
                offset = shm.put_with(obj.nbytes, lambda dst: obj.fill(dst.view(obj.dtype).reshape(obj.shape)))
                if offset is not None:
                    in_ring.append((offset, obj.nbytes))
                    table.append([obj.dtype.name, list(obj.shape), 0, offset])
                    return msgpack.ExtType(EXT_ARRAY, struct.pack("<I", len(table) - 1))
                ring = None   # the ring said no (too small, no room): frames, without asking again
            obj = obj.host()
            if not isinstance(obj, np.ndarray):
                raise TypeError(f"HostCopy.host() returned {type(obj).__name__}, not an ndarray")
        if isinstance(obj, BFloat16):
            arr, dtype_name = _as_le_contiguous(obj.bits), BF16
        elif isinstance(obj, np.ndarray):
            arr = _as_le_contiguous(obj)
            dtype_name = arr.dtype.name
        elif isinstance(obj, np.generic):
            return obj.item()
        elif isinstance(obj, tuple):
            return list(obj)
        else:
            raise TypeError(f"cannot encode {type(obj).__name__}")
        raw = arr.reshape(-1).view(np.uint8) if arr.size else np.empty(0, np.uint8)
        offset = ring.put(raw) if ring is not None else None
        if offset is not None:
            in_ring.append((offset, raw.size))
            table.append([dtype_name, list(arr.shape), 0, offset])
            return msgpack.ExtType(EXT_ARRAY, struct.pack("<I", len(table) - 1))
        step = min(CHUNK_BYTES, MAX_FRAME_BYTES)
        chunks = [raw[i:i + step] for i in range(0, raw.size, step)] or [raw]
        table.append([dtype_name, list(arr.shape), len(chunks)])
        frames.extend(memoryview(c) for c in chunks)
        return msgpack.ExtType(EXT_ARRAY, struct.pack("<I", len(table) - 1))

    header = {"v": PROTOCOL_VERSION if version is None else version, "kind": kind,
              "id": int(id), "op": str(op), "body": body}
    if seconds is not None:
        header["t"] = float(seconds)
    try:
        try:
            packed = msgpack.packb(header, default=default, use_bin_type=True, strict_types=False)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"cannot encode message for op {op!r}: {exc}") from exc
        # The arrays table goes after the body was walked; pack it as a second map entry.
        header_frame = msgpack.packb({"a": table}, use_bin_type=True) + packed
        limit = min(MAX_HEADER_BYTES, MAX_FRAME_BYTES)
        if len(header_frame) > limit:  # the peer would drop it (or the connection): fail here, by name
            raise ProtocolError(f"header of op {op!r} is {len(header_frame)} bytes, limit {limit} "
                                f"(send large data as numpy arrays, which are chunked)")
    except BaseException:
        for offset, nbytes in in_ring:
            shm.unput(offset, nbytes)
        raise
    return [header_frame, *frames]


def _buffer(frame: Any) -> memoryview:
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    return buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > 32 or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < (1 << 40) for d in shape):
        raise ProtocolError(f"bad shape {shape!r:.100}")
    return tuple(shape)


def decode(frames: Sequence[Any], shm: Any = None) -> Message:
    """Parse and validate one message; raise ProtocolError on anything malformed.

    ``shm`` (a ``protocol.shm.RingReader``): the sender's ring, for tensors announced in
    shared memory; a message announcing one on a connection without a ring is refused.

    Only ProtocolError ever leaves: whatever else a hostile message provokes (numpy's
    "array is too big" for a zero-sized shape with huge dimensions, ...) is wrapped,
    so a peer's garbage can never crash the process that reads it.
    """
    try:
        return _decode(frames, shm)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from None


def _decode(frames: Sequence[Any], shm: Any) -> Message:
    if not frames:
        raise ProtocolError("empty message")
    head = _buffer(frames[0])
    limit = min(MAX_HEADER_BYTES, MAX_FRAME_BYTES)
    if len(head) > limit:
        raise ProtocolError(f"header frame of {len(head)} bytes exceeds {limit}")
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(head), 1),
                                ext_hook=lambda code, data: _Placeholder(code, data))
    try:
        unpacker.feed(head)
        table_map = unpacker.unpack()
        header = unpacker.unpack()
        extra = list(unpacker)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if extra or not isinstance(table_map, dict) or not isinstance(header, dict):
        raise ProtocolError("header frame must hold exactly an arrays map and a header map")
    table = table_map.get("a")
    if not isinstance(table, list):
        raise ProtocolError("header has no arrays table")
    kind, mid, op, version = header.get("kind"), header.get("id"), header.get("op"), header.get("v")
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r:.50}")
    if not isinstance(mid, int) or isinstance(mid, bool) or not isinstance(op, str) or \
            not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("header fields id/op/v missing or of the wrong type")

    arrays: list[Any] = []
    pos = 1
    total = 0
    for entry in table:
        if not (isinstance(entry, list) and len(entry) in (3, 4) and isinstance(entry[0], str)
                and isinstance(entry[2], int) and not isinstance(entry[2], bool)):
            raise ProtocolError(f"bad arrays table entry {entry!r:.100}")
        dtype_name, shape, nframes = entry[0], _check_shape(entry[1]), entry[2]
        if dtype_name == BF16:
            dtype = np.dtype("<u2")
        elif dtype_name in DTYPES:
            dtype = DTYPES[dtype_name]
        else:
            raise ProtocolError(f"dtype {dtype_name!r:.40} is not in the whitelist")
        need = math.prod(shape) * dtype.itemsize
        total += need
        if total > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message announces {total} tensor bytes, limit {MAX_MESSAGE_BYTES}")
        if len(entry) == 4:  # in the shared ring, not in frames
            if nframes != 0 or shm is None:
                raise ProtocolError(f"array {len(arrays)} announces shared memory "
                                    f"{'with frames' if nframes else 'but this connection has no ring'}")
            arr = shm.view(entry[3], need, dtype, shape)
            arrays.append(BFloat16(arr) if dtype_name == BF16 else arr)
            continue
        if nframes < 1 or pos + nframes > len(frames):
            raise ProtocolError(f"array {len(arrays)} announces {nframes} frames, message has {len(frames) - pos} left")
        bufs = [_buffer(f) for f in frames[pos:pos + nframes]]
        pos += nframes
        if any(len(b) > MAX_FRAME_BYTES for b in bufs):
            raise ProtocolError(f"array {len(arrays)} has a frame of {max(len(b) for b in bufs)} bytes, "
                                f"over the {MAX_FRAME_BYTES}-byte frame limit (LOCKSTEP_MAX_FRAME_BYTES)")
        got = sum(len(b) for b in bufs)
        if got != need or any(len(b) > MAX_FRAME_BYTES for b in bufs):
            raise ProtocolError(f"array {len(arrays)} ({dtype_name}{list(shape)}) needs {need} bytes, frames hold {got}")
        if len(bufs) == 1:
            arr = np.frombuffer(bufs[0], dtype=dtype).reshape(shape) if need else np.empty(shape, dtype)
        else:
            flat = np.empty(need, np.uint8)
            off = 0
            for b in bufs:
                flat[off:off + len(b)] = np.frombuffer(b, np.uint8)
                off += len(b)
            arr = flat.view(dtype).reshape(shape)
        arrays.append(BFloat16(arr) if dtype_name == BF16 else arr)
    if pos != len(frames):
        raise ProtocolError(f"{len(frames) - pos} unannounced frames after the tensors")

    body = _resolve(header.get("body"), arrays)
    t = header.get("t")
    seconds = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1e9 else None
    return Message(kind, mid, op, body, version, nbytes=total, seconds=seconds)


def _resolve(obj: Any, arrays: list, depth: int = 0) -> Any:
    """Put the arrays in place of their placeholders.

    A module-level function on purpose: a recursive closure is a reference cycle that
    would keep every received array alive until the cyclic GC runs (and, with the
    shared-memory ring, keep its pages from being reused).
    """
    if depth > 64:
        raise ProtocolError("body nested too deeply")
    if isinstance(obj, _Placeholder):
        idx = obj.index()
        if idx >= len(arrays):
            raise ProtocolError(f"body refers to array {idx}, only {len(arrays)} sent")
        return arrays[idx]
    if isinstance(obj, list):
        return [_resolve(x, arrays, depth + 1) for x in obj]
    if isinstance(obj, dict):
        return {k: _resolve(v, arrays, depth + 1) for k, v in obj.items()}
    return obj


class _Placeholder:
    __slots__ = ("code", "data")

    def __init__(self, code: int, data: bytes):
        self.code, self.data = code, data

    def index(self) -> int:
        if self.code != EXT_ARRAY or len(self.data) != 4:
            raise ProtocolError(f"unknown msgpack extension type {self.code}")
        return struct.unpack("<I", self.data)[0]
