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
    assert f"paddle {float(b[worst]):.9g}" in d.reason


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


@pytest.mark.parametrize("shape", [(3072, 768), (333, 200), (5, 3000), (7, 5, C.STATS_CHUNK // 3 + 1),
                                   (1, 2 * C.STATS_CHUNK + 1)])
def test_strided_views_give_the_same_numbers_as_contiguous_copies(shape) -> None:
    """Torch weights are compared in paddle's layout as transposed views (no copy): same verdict,
    statistics and worst index as comparing a contiguous transposed copy."""
    rng = np.random.RandomState(1)
    torch_w = rng.standard_normal(shape).astype(np.float32)
    view = np.transpose(torch_w)                    # what mapping.convert_one(views=True) returns
    paddle_w = np.ascontiguousarray(view) + rng.standard_normal(view.shape).astype(np.float32) * np.float32(1e-7)
    where = tuple(s - 2 if s > 1 else 0 for s in view.shape)
    paddle_w[where] += np.float32(0.25)             # the planted break must be found at its index
    strided = C.compare("w", view, paddle_w, C.Tolerance(1e-5, "max"))
    copied = C.compare("w", np.ascontiguousarray(view), paddle_w, C.Tolerance(1e-5, "max"))
    assert not view.flags.c_contiguous or min(shape) == 1
    assert not strided.passed and strided.worst_index == copied.worst_index == where
    for stat in ("max_abs", "min_abs", "max_rel"):
        assert getattr(strided, stat) == getattr(copied, stat)
    assert strided.mean_abs == pytest.approx(copied.mean_abs, rel=1e-12)
    same = C.compare("w", view, np.ascontiguousarray(view), C.Tolerance(0.0, "max"))
    assert same.passed and same.max_abs == 0.0


@pytest.mark.parametrize("shape", [(3072, 768), (333, 200), (129, 1)])
def test_row_blocks_cover_transposed_views_on_either_side_in_c_order(shape) -> None:
    """Blocks of a transposed view are tile-copied into a reused buffer: every element once, in
    C order, on whichever side the view is (control: the contiguous copies, cut flat)."""
    rng = np.random.RandomState(2)
    w = rng.standard_normal(shape).astype(np.float32)
    view, flat = w.T, np.ascontiguousarray(w.T).reshape(-1)
    other = rng.standard_normal(view.shape).astype(np.float32)
    for a, b, fa, fb in ((view, other, flat, other.reshape(-1)), (other, view, other.reshape(-1), flat)):
        pos, got_a, got_b = 0, [], []
        for start, ba, bb in C.row_blocks(a, b, 1000):
            assert start == pos and ba.ndim == bb.ndim == 1 and ba.size == bb.size
            got_a.append(ba.copy())                # the buffer is reused by the next block
            got_b.append(bb.copy())
            pos += ba.size
        assert pos == view.size
        assert np.array_equal(np.concatenate(got_a), fa) and np.array_equal(np.concatenate(got_b), fb)


def test_a_failure_within_rounding_of_large_values_says_so():
    """An absolute tolerance below float32's resolution at the tensor's size (2 ulp of 1046.6 is
    2.4e-4 > 1e-5): the failure stays a failure, with 9 significant digits that show the two
    values differ, and a hint to loosen it; control: a real difference gets no such hint."""
    from coordinator.compare import Tolerance, compare
    a = np.array([1046.61, 2.0], np.float32)
    b = a.copy()
    b[0] = np.nextafter(np.nextafter(a[0], np.float32(2e3)), np.float32(2e3))
    d = compare("energy", a, b, Tolerance(1e-5, "max"))
    assert not d.passed and "torch 1046.60999 vs paddle 1046.61023" in d.reason
    assert "2 ulp of the tensor's largest value" in d.reason and "--tolerance STEP=max:0.001" in d.reason
    c = a.copy()
    c[0] += np.float32(0.5)
    real = compare("energy", a, c, Tolerance(1e-5, "max"))
    assert not real.passed and "ulp" not in real.reason


def test_rel_judges_the_worst_difference_against_the_tensors_size():
    """rel = max|a-b| / max|a| over all chunks: a 1e-7 relative error on values near 1000 passes
    rel:1e-6 where max:1e-5 fails it; the negative control, one element 1 % off, fails rel with
    the reference's size in the reason."""
    from coordinator.compare import Tolerance, compare
    rng = np.random.RandomState(0)
    a = (rng.standard_normal(3 * C.STATS_CHUNK + 5) * 100).astype(np.float32)
    a[-1] = 1000.0                            # the largest magnitude sits in the last chunk
    b = (a.astype(np.float64) * (1 + 1e-7)).astype(np.float32)
    assert not compare("h", a, b, Tolerance(1e-5, "max")).passed
    d = compare("h", a, b, Tolerance(1e-6, "rel"))
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    assert d.passed and d.method == "rel" and d.ref_scale == 1000.0
    assert d.value == pytest.approx(diff.max() / 1000.0, rel=1e-12)
    assert d.tolerance == "max|diff|/max|ref| <= 1e-06" and d.to_json()["ref_scale"] == 1000.0
    c = a.copy()
    c[7] = a[7] * np.float32(1.01) + np.float32(0.01)
    bad = compare("h", a, c, Tolerance(1e-4, "rel"))
    assert not bad.passed and bad.worst_index == (7,)
    assert bad.reason.startswith("max|diff|/max|torch| ") and "max|torch| 1000" in bad.reason


def test_rel_on_an_all_zero_reference_falls_back_to_the_absolute_difference():
    from coordinator.compare import Tolerance, compare
    z = np.zeros((4, 3), np.float32)
    assert compare("g", z, z.copy(), Tolerance(1e-6, "rel")).passed          # identical
    noise = z.copy()
    noise[1, 2] = 1e-9
    ok = compare("g", z, noise, Tolerance(1e-6, "rel"))
    assert ok.passed and ok.value == pytest.approx(1e-9)
    noise[1, 2] = 1e-3
    bad = compare("g", z, noise, Tolerance(1e-6, "rel"))
    assert not bad.passed and "torch is all zeros" in bad.reason


def test_diff_log_lines_name_the_statistic_each_verdict_was_taken_on():
    """A step whose tensors have different methods writes each line with its own (reprod_log's
    lines for max/mean/min are unchanged; rel lines carry the relative value)."""
    from coordinator.compare import Tolerance, compare
    from coordinator.reprodlog import format_report
    a = np.array([100.0, 2.0], np.float32)
    b = np.array([100.01, 2.0], np.float32)
    diffs = [compare("loss", a, b, Tolerance(1e-1, "max")), compare("grad", a, b, Tolerance(1e-5, "rel"))]
    lines = format_report(diffs, "max", 1e-1).splitlines()
    assert lines[1].endswith(f"\tmax diff: check passed: True, value: {diffs[0].max_abs}")
    assert lines[3].endswith(f"\trel diff: check passed: False, value: {diffs[1].value}")
    assert diffs[1].value == pytest.approx(diffs[0].max_abs / 100.0)
    assert lines[-1].endswith("diff check failed")
