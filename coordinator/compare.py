"""Tensor comparison that never lies: shapes first, no broadcasting, NaN never passes.

``compare(name, ref, got, tol)`` returns a ``TensorDiff`` with max/mean/min absolute
and max relative error, and a verdict on the statistic named by ``tol.method``
(reprod_log's ``mean`` by default, ``max`` for the stricter checks, ``rel`` for the worst
difference relative to the reference tensor's largest magnitude: one threshold for tensors
of any size or precision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from protocol.codec import BFloat16


@dataclass(frozen=True)
class Tolerance:
    threshold: float = 1e-6
    method: str = "mean"   # mean | max | min, as in reprod_log's report; or rel (see compare())

    def describe(self) -> str:
        if self.method == "rel":
            return f"max|diff|/max|ref| <= {self.threshold:g}"
        return f"{self.method} <= {self.threshold:g}"


METHODS = ("max", "mean", "min", "rel")


@dataclass
class TensorDiff:
    name: str
    passed: bool
    reason: str = ""
    shape: tuple = ()
    dtype: str = ""
    max_abs: float = float("nan")
    mean_abs: float = float("nan")
    min_abs: float = float("nan")
    max_rel: float = float("nan")
    ref_scale: float = float("nan")       # max |ref|: what method rel divides by
    value: float = float("nan")           # the statistic the verdict was taken on
    worst_index: tuple | None = None      # position of the largest absolute difference
    tolerance: str = ""
    method: str = ""                      # the statistic the verdict was taken on (Tolerance.method)
    extra: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not np.isfinite(self.ref_scale):
            del d["ref_scale"]   # only measured when the tensors differ
        for k in ("max_abs", "mean_abs", "min_abs", "max_rel", "ref_scale", "value"):
            if k not in d:
                continue
            v = d[k]
            d[k] = None if v is None or not np.isfinite(v) else float(v)
            if v is not None and not np.isfinite(v):
                d[k + "_text"] = str(v)
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index) if self.worst_index is not None else None
        return d


def as_array(x: Any) -> np.ndarray:
    if isinstance(x, BFloat16):
        return x.to_float32()
    return np.asarray(x)


def _first_nonfinite(a: np.ndarray) -> tuple | None:
    if a.dtype.kind != "f":
        return None
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape)) if a.ndim else ()


STATS_CHUNK = 1 << 18  # elements per float64 pass: temporaries stay in cache (a 47 MB gradient: ~5x faster)


TILE = 128  # a transposing copy goes TILE x TILE at a time (64 KB of float32: both sides in L1/L2)


def is_transpose(x: np.ndarray) -> bool:
    """A 2-D view whose transpose is C-contiguous: a torch weight seen in paddle's layout."""
    return x.ndim == 2 and not x.flags.c_contiguous and x.T.flags.c_contiguous


def _tile_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for a transposed 2-D ``src``, in square tiles. numpy's own strided copy
    of a transposed 9 MB weight takes ~10 ms; tiles that stay in cache take ~3.5 ms."""
    rows, cols = src.shape
    for r in range(0, rows, TILE):
        for c in range(0, cols, TILE):
            dst[r:r + TILE, c:c + TILE] = src[r:r + TILE, c:c + TILE]


def block_count(a: np.ndarray, b: np.ndarray, chunk: int) -> int:
    """How many blocks ``row_blocks`` yields for these arrays (what ``part`` divides)."""
    starts, _ = _block_grid(a, b, chunk)
    return len(starts)


def _block_grid(a: np.ndarray, b: np.ndarray, chunk: int) -> tuple[range, int]:
    """The blocks' starts (flat offsets when both arrays are contiguous, else rows) and their step."""
    if a.ndim <= 1 or (a.flags.c_contiguous and b.flags.c_contiguous):
        return range(0, a.size, chunk), chunk
    per_row = a.size // a.shape[0]
    step = max(1, chunk // max(per_row, 1))
    if is_transpose(a) or is_transpose(b):
        step = max(TILE, step // TILE * TILE)
    return range(0, a.shape[0], step), step


def row_blocks(a: np.ndarray, b: np.ndarray, chunk: int, part: tuple[int, int] = (0, 1)):
    """Yield (flat offset, a block, b block) covering two same-shape arrays in C order, about
    ``chunk`` elements each, every block 1-D and contiguous.

    Contiguous arrays are cut flat (views). A transposed 2-D view on either side (a torch
    weight compared in paddle's layout, no full transposing copy) is copied block by block
    into one reused buffer through ``_tile_copy``, TILE rows at a time. Anything else
    strided is copied per block by numpy.

    ``part=(p, n)``: only the p-th of n consecutive runs of blocks (threads comparing one large
    tensor each take a part; every call has its own scratch buffers)."""
    starts, step = _block_grid(a, b, chunk)
    p, n = part
    lo, hi = len(starts) * p // n, len(starts) * (p + 1) // n
    starts = starts[lo:hi]
    if a.ndim <= 1 or (a.flags.c_contiguous and b.flags.c_contiguous):
        fa, fb = a.reshape(-1), b.reshape(-1)
        for start in starts:
            yield start, fa[start:start + chunk], fb[start:start + chunk]
        return
    per_row = a.size // a.shape[0]
    transposed = [x for x in (a, b) if is_transpose(x)]
    bufs = {id(x): np.empty((min(step, x.shape[0]), x.shape[1]), x.dtype) for x in transposed}

    def flat(x: np.ndarray, r0: int) -> np.ndarray:
        blk = x[r0:r0 + step]
        if blk.flags.c_contiguous:
            return blk.reshape(-1)
        buf = bufs.get(id(x))
        if buf is None:
            return np.ascontiguousarray(blk).reshape(-1)
        buf = buf[:blk.shape[0]]
        _tile_copy(buf, blk)
        return buf.reshape(-1)
    for r0 in starts:
        yield r0 * per_row, flat(a, r0), flat(b, r0)


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical? Cheap when they are not: the first block decides whether the whole
    arrays are compared (strided views skip it: their blocks show a zero max instead)."""
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        return False
    fa, fb = a.reshape(-1), b.reshape(-1)
    return bool(np.array_equal(fa[:STATS_CHUNK], fb[:STATS_CHUNK]) and np.array_equal(fa, fb))


def _diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[int, float, float, float, float, float] | None:
    """(flat index of the max, max, mean, min |a-b|, max relative, max |a|) of two same-shape
    arrays, in float64; None when they are bit-identical.

    Blockwise, so that a large gradient never allocates full-size float64 temporaries (page faults
    and memory traffic dominated the backward step's comparisons, bench/RESULTS.md) and a strided
    view costs no full copy.
    """
    if _identical(a, b):
        return None
    worst, max_abs, total, min_abs, max_rel, scale = 0, -1.0, 0.0, float("inf"), 0.0, 0.0
    for start, ab, bb in row_blocks(a, b, STATS_CHUNK):
        a64 = np.asarray(ab, dtype=np.float64).reshape(-1)
        diff = np.abs(a64 - np.asarray(bb, dtype=np.float64).reshape(-1))
        i = int(np.argmax(diff))
        if diff[i] > max_abs:
            worst, max_abs = start + i, float(diff[i])
        total += float(diff.sum())
        min_abs = min(min_abs, float(diff.min()))
        mag = np.abs(a64)
        scale = max(scale, float(mag.max()))
        with np.errstate(divide="ignore", invalid="ignore"):
            max_rel = max(max_rel, float((diff / np.maximum(mag, 1e-12)).max()))
    if max_abs == 0.0:
        return None  # equal values (a strided pair, or +0 vs -0)
    return worst, max_abs, total / a.size, min_abs, max_rel, scale


def compare(name: str, ref: Any, got: Any, tol: Tolerance = Tolerance(), ref_side: str = "torch",
            got_side: str = "paddle") -> TensorDiff:
    a, b = as_array(ref), as_array(got)
    base = dict(name=name, shape=tuple(a.shape), dtype=str(a.dtype), tolerance=tol.describe(), method=tol.method)
    if a.shape != b.shape:
        return TensorDiff(passed=False, reason=f"shape mismatch: {ref_side} {tuple(a.shape)} vs "
                          f"{got_side} {tuple(b.shape)}", **base)
    for side, arr in ((ref_side, a), (got_side, b)):
        if arr.dtype.kind not in "biuf":  # a string, None or object slipped in: nothing to compare
            return TensorDiff(passed=False, reason=f"{side} value is not a numeric tensor (dtype {arr.dtype})",
                              **base)
    if a.dtype.kind != b.dtype.kind:
        return TensorDiff(passed=False, reason=f"dtype mismatch: {ref_side} {a.dtype} vs {got_side} {b.dtype}",
                          **base)
    for side, arr in ((ref_side, a), (got_side, b)):
        pos = _first_nonfinite(arr)
        if pos is not None:
            bad = arr[pos] if arr.ndim else arr
            return TensorDiff(passed=False, reason=f"{bad} in {side} output at index {list(pos)}",
                              worst_index=pos, **base)
    if a.size == 0:
        return TensorDiff(passed=True, max_abs=0.0, mean_abs=0.0, min_abs=0.0, max_rel=0.0, value=0.0, **base)
    stats = _diff_stats(a, b)
    if stats is None:  # bit-identical: every block took the fast path
        return TensorDiff(passed=True, max_abs=0.0, mean_abs=0.0, min_abs=0.0, max_rel=0.0, value=0.0, **base)
    flat_worst, max_abs, mean_abs, min_abs, max_rel, scale = stats
    pos = np.unravel_index(flat_worst, a.shape) if a.ndim else ()
    ref_v, got_v = float(a[pos]), float(b[pos])
    # rel: an all-zero reference has no size to be relative to, so it is judged on max |diff| itself
    value = {"mean": mean_abs, "max": max_abs, "min": min_abs,
             "rel": max_abs / scale if scale > 0 else max_abs}[tol.method]
    passed = bool(np.isfinite(value) and value <= tol.threshold)
    worst = tuple(int(i) for i in pos)
    what = (f"max|diff|/max|{ref_side}| {value:.3e}" if tol.method == "rel" and scale > 0 else
            f"max abs diff {value:.3e} ({ref_side} is all zeros)" if tol.method == "rel" else
            f"{tol.method} abs diff {value:.3e}")
    reason = "" if passed else (f"{what} > {tol.threshold:g} "
                                f"(max {max_abs:.3e} at {list(worst)}: {ref_side} {ref_v:.9g} "
                                f"vs {got_side} {got_v:.9g}"
                                + (f"; max|{ref_side}| {scale:.4g}" if tol.method == "rel" and scale > 0 else "")
                                + ")" + _rounding_hint(a, max_abs, tol))
    return TensorDiff(passed=passed, reason=reason, max_abs=max_abs, mean_abs=mean_abs, min_abs=min_abs,
                      max_rel=max_rel, ref_scale=scale, value=value, worst_index=worst, **base)


def _rounding_hint(a: np.ndarray, max_abs: float, tol: Tolerance) -> str:
    """An absolute tolerance on large values can be below the float type's own resolution there:
    say so when the worst difference is a few units in the last place of the tensor's largest value."""
    if a.dtype.kind != "f" or tol.method != "max" or not np.isfinite(max_abs):
        return ""
    big = float(np.max(np.abs(a)))
    ulp = float(np.spacing(a.dtype.type(big))) if big else 0.0
    if not ulp or max_abs > 16 * ulp:
        return ""
    return (f"; that is {max_abs / ulp:.0f} ulp of the tensor's largest value, {big:.4g}: at this size "
            f"{a.dtype} cannot hold {tol.threshold:g}, rounding alone exceeds it (loosen it for this "
            f"model, e.g. --tolerance STEP=max:{float(f'{4 * max_abs:.0e}'):g})")


def top_differences(ref: Any, got: Any, k: int = 5) -> list[dict[str, Any]]:
    """The k positions with the largest absolute difference (for the debugger and reports)."""
    a, b = as_array(ref).astype(np.float64), as_array(got).astype(np.float64)
    if a.shape != b.shape or a.size == 0:
        return []
    diff = np.abs(a - b).reshape(-1)
    diff = np.where(np.isnan(diff), np.inf, diff)
    idx = np.argsort(diff)[::-1][:k]
    return [{"index": [int(i) for i in np.unravel_index(int(j), a.shape)], "ref": float(a.reshape(-1)[j]),
             "got": float(b.reshape(-1)[j]), "abs_diff": float(diff[j])} for j in idx]
