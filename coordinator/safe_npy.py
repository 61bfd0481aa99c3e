"""Read reprod_log ``.npy`` files without trusting them.

reprod_log saves ``np.save(path, dict)``: a pickle. Loading it with
``np.load`` with pickles allowed runs whatever the file says. This loader parses the
``.npy`` header itself, then reads the payload with an unpickler that can build
exactly three things — numpy arrays, numpy dtypes and numpy scalars — and nothing
else (no functions, no other classes, no persistent ids). The result must be a
dict of str -> numeric ndarray; anything else is refused.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .errors import UsageError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}
_NUMERIC_KINDS = "biuf"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_reprod_npy(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        except ValueError as exc:
            raise UsageError(f"{path}: not an .npy file ({exc})") from None
        if dtype.kind in _NUMERIC_KINDS:
            raise UsageError(f"{path}: holds a bare {dtype} array of shape {shape}, not a reprod_log dict "
                             f"(save it with ReprodLogger or np.save(path, {{'key': array}}))")
        if dtype != np.dtype("O") or shape != ():
            raise UsageError(f"{path}: holds a {dtype} array of shape {shape}, not a reprod_log dict")
        payload = f.read()
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    except Exception as exc:
        raise UsageError(f"{path}: refused: {exc}") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: refused: the payload is a {type(obj).__name__}, not a dict of arrays")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise UsageError(f"{path}: refused: key {k!r} is not a string")
        if isinstance(v, np.generic):
            v = np.asarray(v)
        if not isinstance(v, np.ndarray) or v.dtype.kind not in _NUMERIC_KINDS:
            raise UsageError(f"{path}: refused: key {k!r} holds {type(v).__name__}"
                             f"{'/' + str(v.dtype) if isinstance(v, np.ndarray) else ''}, not a numeric array")
        out[k] = v
    return out
