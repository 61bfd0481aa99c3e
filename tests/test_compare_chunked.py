"""compare() computes its statistics in cache-sized chunks: same numbers as one float64 pass."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator import compare as C


@pytest.mark.parametrize("n", [1, 7, C.STATS_CHUNK, C.STATS_CHUNK + 1, 3 * C.STATS_CHUNK + 5])
def test_chunked_stats_match_one_pass(n: int) -> None:
    rng = np.random.RandomState(n)
    a = rng.standard_normal(n).astype(np.float32)
    b = a + rng.standard_normal(n).astype(np.float32) * np.float32(1e-7)
    worst = n - 1  # the deliberate break sits in the last chunk
    b[worst] += np.float32(0.5)
    d = C.compare("t", a, b, C.Tolerance(1e-5, "max"))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    assert not d.passed and d.worst_index == (worst,)
    assert d.max_abs == diff.max() and d.min_abs == diff.min()
    assert d.mean_abs == pytest.approx(diff.mean(), rel=1e-12)
    assert d.max_rel == pytest.approx((diff / np.maximum(np.abs(a64), 1e-12)).max(), rel=1e-12)
    assert f"paddle {b64[worst]:.6g}" in d.reason


def test_first_of_equal_maxima_is_reported() -> None:
    a = np.zeros(2 * C.STATS_CHUNK + 3, np.float32)
    b = a.copy()
    b[[5, C.STATS_CHUNK + 1]] = 1.0  # equal maxima in two chunks: the first wins, as np.argmax does
    d = C.compare("t", a.reshape(-1, 1), b.reshape(-1, 1), C.Tolerance(1e-5, "max"))
    assert d.worst_index == (5, 0) and not d.passed


def test_close_tensors_pass() -> None:
    a = np.linspace(-1, 1, C.STATS_CHUNK + 10, dtype=np.float32)
    d = C.compare("t", a, a + np.float32(1e-7), C.Tolerance(1e-5, "max"))
    assert d.passed and 0 < d.max_abs < 1e-6
