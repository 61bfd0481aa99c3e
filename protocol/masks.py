"""Shared dropout masks: one numpy recipe both workers use, so masks match bit for bit.

With ``--dropout shared`` each worker replaces its framework's functional dropout by a
function that asks ``keep_scale`` for the mask. The mask is drawn from a numpy
generator seeded by ``(seed, step, call, *shape)``: ``step`` counts training forwards,
``call`` counts the dropout calls (with p > 0, in training mode) within one forward.
Layer names differ between the frameworks, the call order does not (embeddings,
then per encoder layer: attention probabilities, attention output, FFN output, then
the classifier), so the order plus the shape is the key. Living in ``protocol/``
(numpy only) means both sides run byte-identical code.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np


def keep_mask(seed: int, step: int, call: int, shape: Sequence[int], p: float) -> np.ndarray:
    """Boolean keep-mask (True = keep), P(keep) = 1 - p, reproducible from the key alone."""
    key = [int(seed) & 0xFFFFFFFF, int(step), int(call), *[int(s) for s in shape]]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
    return rng.random(tuple(int(s) for s in shape)) >= float(p)


def keep_scale(seed: int, step: int, call: int, shape: Sequence[int], p: float,
               upscale: bool = True) -> tuple[np.ndarray, int]:
    """The float32 multiplier for ``x`` (keep / (1 - p) with upscale) and the mask's crc32."""
    keep = keep_mask(seed, step, call, shape, p)
    scale = keep.astype(np.float32)
    if upscale:
        scale *= np.float32(1.0 / (1.0 - float(p)))
    return scale, zlib.crc32(np.packbits(keep).tobytes())


class DropoutLog:
    """What one side's dropout did during a forward: one record per call, for cross-checking."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def add(self, call: int, shape: Sequence[int], p: float, crc: int | None) -> None:
        self.calls.append({"call": call, "shape": [int(s) for s in shape], "p": float(p),
                           "crc": -1 if crc is None else int(crc)})

    def take(self) -> list[dict[str, Any]]:
        out, self.calls = self.calls, []
        return out


MODES = ("off", "shared", "native")
