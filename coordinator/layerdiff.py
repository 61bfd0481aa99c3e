"""Live per-layer comparison: pair tensors as the two workers stream them, diff, drop.

``LiveDiff.feed(worker, event)`` is the ``on_partial`` callback of a ``capture_layers``
request. A tensor waits in a ``HoldStore`` only until its counterpart from the other
worker arrives; then the pair is compared, handed to ``on_row`` and both are released.
With the workers taking turns, every torch tensor waits for paddle's run: the store keeps
up to ``budget`` bytes in memory and spills the rest to a scratch file (raw bytes, no
pickle), which it deletes at the end.

Rows, in torch's execution order:
  forward  ``output``      a mapped module's output
  forward  ``input``       a mapped module's input when no mapped module produced it
                           (functional code in between: attention core, residual add)
  backward ``grad``        the gradient of a mapped module's output
  backward ``param_grad``  a parameter's gradient (torch's converted to paddle's layout)
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .compare import Tolerance, block_count, compare, is_transpose, row_blocks
from .layermap import LayerMap

ROOT_NAME = "<model>"   # how the model itself (module name "") is shown
RECENT = 16   # outputs kept per side to resolve references (a referenced output is within the worker's window of 16)


@dataclass
class Row:
    phase: str                 # forward | backward
    what: str                  # output | input | grad | param_grad
    key: str
    torch: str
    paddle: str
    torch_type: str = ""
    paddle_type: str = ""
    seq: int = 0
    shape: list[int] = field(default_factory=list)
    passed: bool = True
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0          # max over elements of |diff| / |torch| (NaN, null in JSON: row passed)
    scale: float = 0.0            # max |torch|
    norm_err: float = 0.0         # max_abs / scale: the error relative to the tensor's size
    rms_rel: float = 0.0          # ||diff|| / ||torch||
    tolerance: str = ""
    reason: str = ""
    note: str = ""
    made_by: list[str] = field(default_factory=list)
    worst_index: list[int] | None = None

    @property
    def label(self) -> str:
        """torch's name (a parameter gradient's too: the paddle name is the row's other side); the
        model itself, whose module name is empty, is ``<model>``."""
        name = self.torch or ROOT_NAME
        return f"{name} <input>" if self.what == "input" else name

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("max_abs", "mean_abs", "max_rel", "scale", "norm_err", "rms_rel"):
            v = d[k]
            d[k] = float(v) if v is not None and np.isfinite(v) else None
        return d


class HoldStore:
    """Arrays waiting for their counterpart: in memory up to ``budget`` bytes, then a scratch file."""

    def __init__(self, budget: int, spill_dir: Path | None = None):
        self.budget = budget
        self.spill_dir = spill_dir
        self.mem: dict[Any, np.ndarray] = {}
        self.disk: dict[Any, tuple[int, str, tuple, bool]] = {}
        self.bytes = 0
        self.peak = 0
        self.spilled = 0
        self._file: Any = None
        self._path: str | None = None

    def put(self, key: Any, arr: np.ndarray) -> None:
        if self.bytes + arr.nbytes > self.budget and arr.nbytes > 0:
            self._spill(key, arr)
            return
        self.mem[key] = arr
        self.bytes += arr.nbytes
        self.peak = max(self.peak, self.bytes)

    def _spill(self, key: Any, arr: np.ndarray) -> None:
        """Write the array's bytes straight from its buffer (no ``tobytes`` copy). A transposed view
        (a parameter gradient already in paddle's layout) is written as its contiguous base and
        read back as the same view, so spilling never pays for the transposition."""
        if self._file is None:
            fd, self._path = tempfile.mkstemp(prefix="layers-hold-", suffix=".bin",
                                              dir=str(self.spill_dir) if self.spill_dir else None)
            self._file = os.fdopen(fd, "w+b")
        transposed = is_transpose(arr)
        a = arr.T if transposed else np.ascontiguousarray(arr)
        self._file.seek(0, os.SEEK_END)
        off = self._file.tell()
        if a.nbytes:
            self._file.write(memoryview(a.reshape(-1)).cast("B"))
        self.disk[key] = (off, a.dtype.str, a.shape, transposed)
        self.spilled += a.nbytes

    def __contains__(self, key: Any) -> bool:
        return key in self.mem or key in self.disk

    def pop(self, key: Any) -> np.ndarray:
        if key in self.mem:
            arr = self.mem.pop(key)
            self.bytes -= arr.nbytes
            return arr
        arr = self.get(key)
        del self.disk[key]
        return arr

    def get(self, key: Any) -> np.ndarray:
        """Read without releasing (the debugger revisits rows)."""
        if key in self.mem:
            return self.mem[key]
        off, dtype, shape, transposed = self.disk[key]
        self._file.flush()
        count = int(np.prod(shape)) if shape else 1
        arr = np.fromfile(self._path, dtype=np.dtype(dtype), count=count, offset=off).reshape(shape)
        return arr.T if transposed else arr

    def keys(self) -> list[Any]:
        return list(self.mem) + list(self.disk)

    def close(self) -> None:
        self.mem.clear()
        self.disk.clear()
        self.bytes = 0
        if self._file is not None:
            self._file.close()
            os.unlink(self._path)
            self._file = None


@dataclass(frozen=True)
class LayerTolerance:
    """Verdict on ``max|paddle - torch| / max(max|torch|, floor)``: the worst error relative to the
    tensor's own size, so one threshold fits embeddings (~0.3) and FFN pre-activations (~200).

    ``floor`` is ``floor_frac`` times the largest tensor seen so far in the phase, so a tensor that
    is mathematically zero (the gradient of attention's key bias, ~1e-10 of rounding noise on both
    sides) is judged against the phase's scale instead of its own noise.
    """

    threshold: float = 5e-6
    floor_frac: float = 1e-4

    def describe(self) -> str:
        return f"max|diff|/max|torch| <= {self.threshold:g}"


def _reduce_broadcast(row: Row, ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A size-1 axis on one side against B on the other: forward values broadcast (torch's position
    embeddings are [1, S, H], paddle's [B, S, H]); their gradients are the sum over that axis."""
    if ref.shape == got.shape or ref.ndim != got.ndim or \
            not all(a == b or a == 1 or b == 1 for a, b in zip(ref.shape, got.shape)):
        return ref, got
    if row.what in ("grad", "param_grad"):
        ref = ref.sum(axis=tuple(i for i, (a, b) in enumerate(zip(ref.shape, got.shape)) if a > b),
                      keepdims=True, dtype=ref.dtype)
        got = got.sum(axis=tuple(i for i, (a, b) in enumerate(zip(ref.shape, got.shape)) if b > a),
                      keepdims=True, dtype=got.dtype)
        row.note = "paddle's gradient summed over the axes torch broadcasts"
        return ref, got
    row.note = f"torch {list(ref.shape)} broadcast against paddle {list(got.shape)}"
    shape = np.broadcast_shapes(ref.shape, got.shape)
    return np.broadcast_to(ref, shape), np.broadcast_to(got, shape)


CHUNK = 1 << 18   # elements per pass (1 MB of float32): temporaries stay in cache, even for a 94 MB gradient


_ONES: dict[np.dtype, np.ndarray] = {}


def _ones(dtype: np.dtype, n: int) -> np.ndarray:
    """``n`` ones (a view of one growing array per dtype): ``dot(d, ones)`` is the fastest sum
    numpy has for float32."""
    have = _ONES.get(dtype)
    if have is None or have.size < n:
        have = np.ones(max(n, CHUNK), dtype)
        have.flags.writeable = False
        _ONES[dtype] = have
    return have[:n]


def _chunked_stats(ref: np.ndarray, got: np.ndarray, rel: bool = True, threads: int = 1) -> dict[str, Any] | None:
    """max/mean |diff|, worst position, max|ref|, RMS figures and (``rel``) the max relative
    error, a chunk at a time.

    Works in the arrays' own float type: |a - b| of two close float32 numbers is exact
    (Sterbenz). Any NaN/Inf on either side makes some |a - b| non-finite, and then None is
    returned (``compare`` names the first one). Two scratch buffers of one chunk are reused
    for every chunk, and every pass that can be a BLAS dot is one: the sums (mean and RMS
    figures, informational) are float32 dots added up in float64 per chunk, within ~1e-6
    relative of a float64 sum. This runs on the coordinator while a worker computes on the
    same cores: 0.2 s -> 0.1 s for a BERT-base forward's 420 MB (bench/RESULTS.md). Without
    ``rel`` (``compare_row``: rows that pass) max|ref| comes from max and min, and the |ref| and
    division passes are skipped: 206 -> 153 us per 1 MB chunk.

    ``threads`` > 1: a tensor of at least two ``PART_MIN`` elements is cut into up to that many
    consecutive runs of smaller chunks (a BERT-base layer output, 1.5 MiB, is under two of the
    1 MB chunks), compared at once in a thread pool (numpy drops the GIL in these passes) and
    combined in order: the same worst position as one pass (the first largest), sums added
    per run. On a many-core host the coordinator must keep up with frameworks that finish a
    layer in well under a millisecond (bench/RESULTS.md, layer capture)."""
    n = ref.size
    chunk, parts = CHUNK, 1
    if threads > 1 and n >= 2 * PART_MIN:
        chunk = min(CHUNK, max(PART_MIN, -(-n // threads)))
        parts = min(threads, block_count(ref, got, chunk))
    if parts == 1:
        res = [_part_stats(ref, got, rel, (0, 1), CHUNK)]
    else:
        res = list(_pool(threads).map(lambda p: _part_stats(ref, got, rel, (p, parts), chunk), range(parts)))
    if any(r is None for r in res):
        return None
    best, best_i, sum_d, sum_d2, sum_r2, scale, max_rel = -1.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0
    for r in res:                            # in order: the first largest wins, as in one pass
        if r["best"] > best:
            best, best_i = r["best"], r["best_i"]
        sum_d += r["sum_d"]
        sum_d2 += r["sum_d2"]
        sum_r2 += r["sum_r2"]
        scale = max(scale, r["scale"])
        max_rel = max(max_rel, r["max_rel"])
    worst = tuple(int(x) for x in np.unravel_index(best_i, ref.shape)) if ref.ndim else ()
    return {"max_abs": max(best, 0.0), "mean_abs": sum_d / n, "max_rel": max_rel if rel else float("nan"),
            "worst": worst, "scale": scale, "rms_rel": (sum_d2 / sum_r2) ** 0.5 if sum_r2 > 0 else 0.0}


PART_MIN = 1 << 16   # elements (256 KB of float32) below which a thread's share is not worth handing out
_POOLS: dict[int, Any] = {}


_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> Any:
    """One thread pool per size for the process. Its tasks are ``_part_stats`` only: a task that
    called ``_chunked_stats`` with threads > 1 would wait for a slot of its own pool."""
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            from concurrent.futures import ThreadPoolExecutor
            pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="lockstep-diff")
    return pool


def _part_stats(ref: np.ndarray, got: np.ndarray, rel: bool, part: tuple[int, int],
                chunk: int) -> dict[str, Any] | None:
    """``_chunked_stats``'s pass over one run of chunks (``row_blocks``' ``part``)."""
    n = ref.size
    dtype = ref.dtype
    blocks = row_blocks(ref, got, chunk, part)
    m = min(n, 2 * chunk)  # blocks of transposed views are whole TILE-row runs: up to ~2 chunks
    d_buf, r_buf = np.empty(m, dtype), (np.empty(m, dtype) if rel else None)
    blas = dtype in (np.float32, np.float64)
    best, best_i, sum_d, sum_d2, sum_r2, scale, max_rel = -1.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, a, b in blocks:
            k_n = a.size
            if k_n > d_buf.size:
                d_buf, r_buf = np.empty(k_n, dtype), (np.empty(k_n, dtype) if rel else None)
            d = d_buf[:k_n]
            np.subtract(a, b, out=d)
            np.abs(d, out=d)
            k = int(np.argmax(d))            # NaN wins argmax; checked below
            dk = float(d[k])
            if rel:
                absa = r_buf[:k_n]
                np.abs(a, out=absa)
                amax = float(absa.max())
            else:
                amax = max(float(a.max()), -float(a.min()))
            if not (np.isfinite(dk) and np.isfinite(amax)):
                return None
            if dk > best:
                best, best_i = dk, i + k
            if blas:
                sum_d += float(np.dot(d, _ones(dtype, k_n)))
                sum_d2 += float(np.dot(d, d))
                sum_r2 += float(np.dot(a, a))
            else:                            # float16 would overflow its own accumulator
                d64, a64 = d.astype(np.float64), a.astype(np.float64)
                sum_d += float(d64.sum())
                sum_d2 += float(np.dot(d64, d64))
                sum_r2 += float(np.dot(a64, a64))
            scale = max(scale, amax)
            if rel:
                np.divide(d, absa, out=absa)     # 0/0 is NaN, which fmax skips; x/0 is inf
                max_rel = max(max_rel, float(np.fmax.reduce(absa)))
    return {"best": best, "best_i": best_i, "sum_d": sum_d, "sum_d2": sum_d2, "sum_r2": sum_r2, "scale": scale,
            "max_rel": max_rel}


def compare_row(row: Row, ref: Any, got: Any, tol: LayerTolerance, floor: float = 0.0, threads: int = 1) -> Row:
    """Fill ``row`` with torch ``ref`` vs paddle ``got``: shape, dtype and NaN/Inf as ``compare``
    judges them (never passing), then the verdict on the normalized error (``LayerTolerance``).
    ``threads``: how many threads may compare one large tensor (``_chunked_stats``)."""
    ref, got = _reduce_broadcast(row, np.asarray(ref), np.asarray(got))
    row.shape = list(ref.shape)
    row.tolerance = tol.describe()
    st = None
    if ref.shape == got.shape and ref.dtype.kind == got.dtype.kind == "f" and ref.size:
        st = _chunked_stats(ref, got, rel=False, threads=threads)
    if st is None:                         # integers, empty, or something compare() must explain
        d = compare(row.label, ref, got, Tolerance(float("inf"), "max"))
        row.max_abs, row.mean_abs, row.max_rel = d.max_abs, d.mean_abs, d.max_rel
        row.worst_index = list(d.worst_index) if d.worst_index is not None else None
        if not d.passed:                   # shape, dtype, NaN/Inf: never passes
            row.passed, row.reason, row.norm_err = False, d.reason, float("inf")
            return row
        if ref.size:
            row.scale = float(np.max(np.abs(ref.astype(np.float64))))
    else:
        row.max_abs, row.mean_abs, row.max_rel = st["max_abs"], st["mean_abs"], st["max_rel"]
        row.worst_index, row.scale, row.rms_rel = list(st["worst"]), st["scale"], st["rms_rel"]
    denom = max(row.scale, floor)
    row.norm_err = row.max_abs / denom if denom > 0 else row.max_abs
    row.passed = bool(np.isfinite(row.norm_err) and row.norm_err <= tol.threshold)
    if not row.passed:
        if st is not None:                 # the max relative error: for the rows that fail
            row.max_rel = _chunked_stats(ref, got, threads=threads)["max_rel"]
        where = f" at {row.worst_index}" if row.worst_index is not None else ""
        row.reason = (f"max|diff| {row.max_abs:.3e}{where} is {row.norm_err:.2e} of max|torch| "
                      f"{denom:.3e} > {tol.threshold:g}")
    return row


TolFn = Callable[[str, str], LayerTolerance]   # (what, torch type) -> tolerance


class LiveDiff:
    """Pairs events from both workers, compares each pair once both are here, then drops it."""

    def __init__(self, lmap: LayerMap, tol_for: TolFn, on_row: Callable[[Row], None] | None = None,
                 weight_map: Any = None, hold_budget: int = 512 << 20, spill_dir: Path | None = None,
                 stop_at_first: bool = False, keep: Callable[[Row], bool] | None = None, threads: int = 1):
        self.lmap, self.tol_for, self.on_row = lmap, tol_for, on_row
        self.threads = max(1, int(threads))   # per large tensor (compare_row); 1 on small hosts
        self.weight_map = weight_map
        self.store = HoldStore(hold_budget, spill_dir)
        self.stop_at_first = stop_at_first
        self.keep = keep                   # rows whose tensors the caller keeps (the debugger: all)
        self.kept = HoldStore(hold_budget, spill_dir)
        self.first_tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}   # phase -> first divergence's pair
        self.rows: list[Row] = []
        self.first: dict[str, Row] = {}    # phase -> first divergent row
        self.stopped = False
        self.pending_meta: dict[tuple, dict[str, Any]] = {}
        self.recent: dict[str, OrderedDict[str, np.ndarray]] = {"torch": OrderedDict(), "paddle": OrderedDict()}
        self.no_input_row: set[str] = set()
        self.losses: dict[str, float] = {}
        self.events = {"torch": 0, "paddle": 0}
        self.problems: list[str] = []
        self.phase_scale: dict[str, float] = {}
        self.executed: set[str] = set()     # torch modules seen running (even after a stop)

    # -- feeding ------------------------------------------------------------------------
    def feed(self, side: str, ev: dict[str, Any]) -> None:
        """``on_partial`` callback: one event from one worker."""
        self.events[side] = self.events.get(side, 0) + 1
        kind = ev.get("ev")
        if side == "torch" and kind in ("in", "out"):
            self.executed.add(ev.get("module"))
        if self.stopped:
            return
        if kind == "out":
            self._on_out(side, ev)
        elif kind == "in":
            self._on_in(side, ev)
        elif kind == "grad":
            self._on_grad(side, ev)
        elif kind == "param_grad":
            self._on_param_grad(side, ev)
        elif kind == "loss":
            self.losses[side] = float(np.asarray(ev["tensor"]))

    def _torch_name(self, side: str, module: str) -> str | None:
        if side == "torch":
            return module if module in self.lmap.t2p else None
        pair = self.lmap.p2t.get(module)
        return pair.torch if pair else None

    def _resolve(self, side: str, ev: dict[str, Any], field_: str) -> np.ndarray | None:
        if "tensor" in ev:
            return ev["tensor"]
        names = ev.get(field_) or []
        for n in names:
            if n in self.recent[side]:
                return self.recent[side][n]
        if names:
            self.problems.append(f"{side} {ev.get('module')}: referenced tensor of {names} no longer held")
        return None

    def _remember(self, side: str, module: str, arr: np.ndarray) -> None:
        r = self.recent[side]
        r[module] = arr
        r.move_to_end(module)
        while len(r) > RECENT:
            r.popitem(last=False)

    def _on_out(self, side: str, ev: dict[str, Any]) -> None:
        arr = self._resolve(side, ev, "same_as")
        if arr is None:
            return
        self._remember(side, ev["module"], arr)
        t = self._torch_name(side, ev["module"])
        if t is not None:
            self._arrive(("forward", "output", t), side, arr, ev)

    def _on_in(self, side: str, ev: dict[str, Any]) -> None:
        t = self._torch_name(side, ev["module"])
        if t is None:
            return
        key = f"{t}:input"
        if side == "torch" and "ref" in ev:
            self.no_input_row.add(key)        # a mapped module made it: its own row covers it
            for s in ("paddle",):
                if (("forward", "input", key), s) in self.store:
                    self.store.pop((("forward", "input", key), s))
                    self.pending_meta.pop(("forward", "input", key), None)
            return
        if key in self.no_input_row:
            return
        arr = self._resolve(side, ev, "ref")
        if arr is not None:
            self._arrive(("forward", "input", key), side, arr, ev)

    def _on_grad(self, side: str, ev: dict[str, Any]) -> None:
        t = self._torch_name(side, ev["module"])
        if t is not None:
            self._arrive(("backward", "grad", t), side, ev["tensor"], ev)

    def _on_param_grad(self, side: str, ev: dict[str, Any]) -> None:
        name, arr = ev["param"], ev["tensor"]
        if side == "torch":
            if self.weight_map is None or self.weight_map.ignored_source(name):
                return
            for pname, parr, _ops in self.weight_map.convert_one(name, arr, views=True):  # compared/spilled only
                self._arrive(("backward", "param_grad", f"param:{pname}"), side, parr, dict(ev, param=pname,
                                                                                             torch_param=name))
        else:
            self._arrive(("backward", "param_grad", f"param:{name}"), side, arr, ev)

    def _arrive(self, rkey: tuple, side: str, arr: np.ndarray, ev: dict[str, Any]) -> None:
        meta = self.pending_meta.setdefault(rkey, {})
        if side == "torch":
            meta["seq"] = ev.get("seq", 0)
            meta["made_by"] = ev.get("made_by") or []
            meta["torch_param"] = ev.get("torch_param")
        other = "paddle" if side == "torch" else "torch"
        if (rkey, side) in self.store:
            self.problems.append(f"{side} sent {rkey[2]} ({rkey[1]}) twice; the second is ignored")
            return
        if (rkey, other) not in self.store:
            self.store.put((rkey, side), arr)
            return
        mine, theirs = arr, self.store.pop((rkey, other))
        t_arr, p_arr = (mine, theirs) if side == "torch" else (theirs, mine)
        self._compare(rkey, t_arr, p_arr, self.pending_meta.pop(rkey))

    # -- comparing ----------------------------------------------------------------------
    def _compare(self, rkey: tuple, t_arr: np.ndarray, p_arr: np.ndarray, meta: dict[str, Any]) -> None:
        phase, what, key = rkey
        if what == "param_grad":
            pname = key[len("param:"):]
            tname = meta.get("torch_param") or pname
            owner_t = tname.rsplit(".", 1)[0]
            pair = self.lmap.t2p.get(owner_t)
            row = Row(phase, what, key, tname, pname, pair.torch_type if pair else "",
                      pair.paddle_type if pair else "")
        else:
            tname = key[:-len(":input")] if what == "input" else key
            pair = self.lmap.t2p[tname]
            row = Row(phase, what, key, tname, pair.paddle, pair.torch_type, pair.paddle_type)
        row.seq = int(meta.get("seq", 0))
        row.made_by = list(meta.get("made_by") or [])
        tol = self.tol_for(what, row.torch_type)
        compare_row(row, t_arr, p_arr, tol, tol.floor_frac * self.phase_scale.get(phase, 0.0), self.threads)
        if np.asarray(t_arr).dtype.kind == "f" and np.isfinite(row.scale):
            self.phase_scale[phase] = max(self.phase_scale.get(phase, 0.0), row.scale)
        if self.keep is not None and self.keep(row):
            self.kept.put((rkey, "torch"), np.asarray(t_arr))
            self.kept.put((rkey, "paddle"), np.asarray(p_arr))
        self.rows.append(row)
        if not row.passed:
            cur = self.first.get(phase)
            if cur is None or row.seq < cur.seq:
                self.first[phase] = row
                self.first_tensors[phase] = (np.asarray(t_arr), np.asarray(p_arr))
            if self.stop_at_first:
                self.stopped = True
        if self.on_row:
            self.on_row(row)

    def finish(self) -> dict[str, Any]:
        """Leftovers (a tensor only one side produced) become problems; scratch space is freed."""
        leftovers: dict[str, list[str]] = {"torch": [], "paddle": []}
        for (rkey, side) in self.store.keys():
            leftovers[side].append(f"{rkey[2]} ({rkey[0]} {rkey[1]})")
        stats = {"held_peak_bytes": self.store.peak, "spilled_bytes": self.store.spilled,
                 "events": dict(self.events), "only_torch": leftovers["torch"][:50],
                 "only_paddle": leftovers["paddle"][:50], "problems": self.problems[:50]}
        self.store.close()
        self.recent = {"torch": OrderedDict(), "paddle": OrderedDict()}
        return stats

    def tensors(self, row: Row) -> tuple[np.ndarray, np.ndarray] | None:
        """The kept (torch, paddle) pair of a row, or None when it was not kept."""
        rkey = (row.phase, row.what, row.key)
        if (rkey, "torch") not in self.kept:
            first = self.first.get(row.phase)
            return self.first_tensors.get(row.phase) if first is row else None
        return self.kept.get((rkey, "torch")), self.kept.get((rkey, "paddle"))

    def close(self) -> None:
        self.kept.close()
        self.first_tensors.clear()

    def ordered(self, phase: str) -> list[Row]:
        return sorted((r for r in self.rows if r.phase == phase), key=lambda r: r.seq)
