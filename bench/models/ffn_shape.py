"""Shape of the benchmark FFN stack, shared by both sides (imports neither framework)."""

from __future__ import annotations

import os

HIDDEN, INTER = 768, 3072


def shape() -> tuple[int, int, int]:
    """blocks, batch, seq: LOCKSTEP_FFN="blocks,batch,seq" (both workers inherit it)."""
    b, n, s = (int(x) for x in os.environ.get("LOCKSTEP_FFN", "12,4,128").split(","))
    return b, n, s
