"""reprod_log's file and report formats, written without importing reprod_log.

``import reprod_log`` imports paddle, so the framework-free coordinator writes the
format itself: ``<step>_<side>.npy`` is ``np.save`` of a dict of arrays (exactly what
``ReprodLogger.save`` writes), and ``<step>_diff.log`` follows ``ReprodDiffHelper.report``
line for line. Reading such files back goes through ``safe_npy``, never plain pickle.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from numpy.lib import format as npy_format

from .compare import TensorDiff, as_array


class _Numpy1Pickler(pickle._Pickler):
    """pickle protocol 3 (what numpy 1.x's ``np.save`` writes), naming numpy's reconstructors by
    their numpy 1.x path: numpy 2 writes ``numpy._core.multiarray``, a module numpy < 1.26 lacks,
    so reprod_log on an older stack could not open the files. ``numpy.core.multiarray._reconstruct``
    and ``.scalar`` load on every numpy (numpy 2 keeps them for old pickles, without a warning)."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        attr = name or getattr(obj, "__name__", None)
        if getattr(obj, "__module__", None) == "numpy._core.multiarray" and attr in ("_reconstruct", "scalar"):
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + attr.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def save_npy(path: Path, tensors: dict[str, object]) -> None:
    """Write a reprod_log-compatible ``.npy`` (a pickled dict of ndarrays) atomically: what
    ``np.save(dict)`` writes (a 0-d object array), loadable by numpy 1.x and 2.x alike."""
    data = {k: np.asarray(as_array(v)) for k, v in tensors.items()}
    box = np.empty((), dtype=object)
    box[()] = data
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        npy_format.write_array_header_1_0(f, npy_format.header_data_from_array_1_0(box))
        _Numpy1Pickler(f, protocol=3).dump(box)
    tmp.replace(path)


def format_report(diffs: Iterable[TensorDiff], method: str, threshold: float, now: float | None = None) -> str:
    """The text ``ReprodDiffHelper.report(diff_method, diff_threshold)`` would log.

    Unlike reprod_log, a NaN/Inf statistic or a shape mismatch reports ``check passed: False``.
    Each line names the statistic its own verdict was taken on (``d.method``, else ``method``):
    reprod_log's mean/max/min, or lockstep's ``rel`` (max|diff| / max|reference|).
    """
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now))
    prefix = f"[{stamp}] root INFO: "
    lines = []
    all_passed = True
    for d in diffs:
        lines.append(f"{prefix}{d.name}: ")
        m = d.method or method
        value = d.value if m == "rel" else {"mean": d.mean_abs, "max": d.max_abs, "min": d.min_abs}[m]
        if m in ("max", "min") and str(d.dtype).startswith(("int", "uint")) and value == value:
            value = int(value)   # numpy's max/min of an integer |diff| is an integer: "0", not "0.0"
        elif value != value and d.reason and not d.shape:
            value = f"nan ({d.reason})"   # not a tensor statistic (e.g. a check on names): say why
        ok = bool(d.passed)  # computed by compare() with this same method and threshold
        all_passed = all_passed and ok
        lines.append(f"{prefix}\t{m} diff: check passed: {ok}, value: {value}")
    lines.append(f"{prefix}diff check {'passed' if all_passed else 'failed'}")
    return "\n".join(lines) + "\n"


def write_report(path: Path, diffs: list[TensorDiff], method: str, threshold: float) -> None:
    text = format_report(diffs, method, threshold)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
