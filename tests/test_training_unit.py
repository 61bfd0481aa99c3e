"""Framework-free checks of the training steps' building blocks: shared dropout masks,
per-parameter comparison, dropout call matching, the perf verdict."""

import numpy as np
import pytest

from coordinator.compare import Tolerance
from coordinator.steps._training import compare_dropout_calls, compare_named
from coordinator.steps.perf import verdict
from protocol.masks import DropoutLog, keep_mask, keep_scale


def test_masks_are_reproducible_from_the_key_alone():
    a, crc_a = keep_scale(0, 3, 5, (4, 12, 16, 16), 0.1)
    b, crc_b = keep_scale(0, 3, 5, (4, 12, 16, 16), 0.1)
    assert a.dtype == np.float32 and np.array_equal(a, b) and crc_a == crc_b
    kept = a != 0
    assert abs(kept.mean() - 0.9) < 0.01                     # P(keep) = 1 - p
    assert np.allclose(a[kept], np.float32(1 / 0.9))        # upscale_in_train
    unscaled, _ = keep_scale(0, 3, 5, (4, 12, 16, 16), 0.1, upscale=False)
    assert set(np.unique(unscaled)) == {0.0, 1.0}


@pytest.mark.parametrize("other", [(1, 3, 5, (8, 16)), (0, 4, 5, (8, 16)), (0, 3, 6, (8, 16)), (0, 3, 5, (16, 8))])
def test_every_part_of_the_key_changes_the_mask(other):
    """Negative control: a different seed, step, call index or shape must not reuse a mask."""
    base = keep_mask(0, 3, 5, (8, 16), 0.5)
    seed, step, call, shape = other
    changed = keep_mask(seed, step, call, shape, 0.5)
    assert not np.array_equal(changed.ravel(), base.ravel())   # a transposed shape must not reuse the bits


def test_per_parameter_comparison_names_the_first_failing_parameter():
    ref = {"a.weight": np.zeros((3, 3), np.float32), "b.bias": np.zeros(3, np.float32),
           "c.weight": np.zeros(2, np.float32)}
    same, per = compare_named("grad", 0, ref, {k: v.copy() for k, v in ref.items()}, Tolerance(1e-6, "max"))
    assert same.passed and same.name == "grad_0" and same.extra["of"] == 3 and len(per) == 3
    got = {k: v.copy() for k, v in ref.items()}
    got["b.bias"][1] = 1e-3
    got["c.weight"][0] = 1e-2
    bad, _ = compare_named("param", 4, ref, got, Tolerance(1e-6, "max"))
    assert not bad.passed and bad.name == "param_4"
    assert bad.extra["param"] == "b.bias" and bad.extra["failing"] == 2    # first in model order
    assert bad.extra["worst_param"] == "c.weight"                            # largest difference
    assert "2/3 params exceed" in bad.reason and "b.bias" in bad.reason


def test_relative_gradient_tolerance_holds_a_large_weight_and_a_small_bias_to_one_threshold():
    """rel: a weight gradient of size ~100 off by 1e-4 (1e-6 of its size) passes, a bias gradient
    of size 1e-3 off by 1e-4 (10 %) fails, although max:1e-5 would judge them the other way
    round; the summary line carries the relative value and the diff.log names it rel."""
    from coordinator.reprodlog import format_report
    ref = {"w": np.full((4, 4), 100.0, np.float32), "b": np.full(4, 1e-3, np.float32)}
    got = {"w": ref["w"] + np.float32(1e-4), "b": ref["b"] + np.float32(1e-4)}
    by_abs, _ = compare_named("grad", 0, ref, got, Tolerance(1e-5, "max"))
    assert not by_abs.passed and by_abs.extra["param"] == "w"
    res, per = compare_named("grad", 0, ref, got, Tolerance(1e-5, "rel"))
    assert [d.passed for d in per] == [True, False] and res.extra["param"] == "b"
    assert res.method == "rel" and res.value == pytest.approx(0.1, rel=1e-3)
    assert f"rel diff: check passed: False, value: {res.value}" in format_report([res], "max", 1e-5)


def test_missing_gradient_is_a_failure_named_with_its_side():
    ref = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    res, _ = compare_named("grad", 1, ref, {"a": np.zeros(2, np.float32)}, Tolerance(1e-6, "max"))
    assert not res.passed and "'b' missing on the paddle side" in res.reason


def _calls(*shapes, crc=7):
    log = DropoutLog()
    for i, s in enumerate(shapes):
        log.add(i, s, 0.1, crc)
    return log.take()


def test_dropout_calls_must_match_in_order_shape_and_mask():
    t = _calls((4, 8, 32), (4, 12, 8, 8))
    assert compare_dropout_calls(t, _calls((4, 8, 32), (4, 12, 8, 8)), "shared") == ""
    msg = compare_dropout_calls(t, _calls((4, 12, 8, 8), (4, 8, 32)), "shared")
    assert "call #0" in msg and "[4, 8, 32]" in msg and "[4, 12, 8, 8]" in msg
    msg = compare_dropout_calls(t, _calls((4, 8, 32), (4, 12, 8, 8), crc=None), "shared")
    assert "call #0" in msg and "paddle used native dropout" in msg
    assert "2 dropout calls per forward, paddle 1" in compare_dropout_calls(t, t[:1], "shared")


def test_perf_verdict_is_the_ports_throughput_over_the_references():
    assert verdict(10.0, 8.0, 0.5) == (True, 0.8, "torch")
    assert verdict(10.0, 4.0, 0.5) == (False, 0.4, "torch")      # negative control: the port too slow
    assert verdict(2.0, 8.0, 0.5) == (True, 4.0, "paddle")       # a faster port is no migration error
    assert verdict(0.0, 8.0, 0.0)[0] is False


def test_perf_judge_never_passes_a_port_slow_on_most_steps():
    from coordinator.steps.perf import judge
    quiet = {"torch": np.array([0.10, 0.11, 0.10]), "paddle": np.array([0.15, 0.16, 0.15])}
    j = judge(quiet, {"torch": 4, "paddle": 4}, 0.5)
    assert j["passed"] and not j["noisy"] and abs(j["ratio"] - 0.10 / 0.15) < 1e-12
    # torch hit by load: paddle/torch rises, so load on the reference cannot fail the port
    busy = {"torch": np.array([0.10, 0.75, 7.0, 0.9, 0.8]), "paddle": np.array([0.15, 0.2, 0.16, 0.15, 0.4])}
    j = judge(busy, {"torch": 4, "paddle": 4}, 0.5)
    assert j["passed"] and j["noisy"] and j["spread"]["torch"] == 70.0
    # negative controls: one fast step among slow ones, and a port that slows down step after step
    for paddle in ([0.1] + [0.45] * 9, [0.1 * 1.25 ** i for i in range(10)]):
        j = judge({"torch": np.full(10, 0.1), "paddle": np.array(paddle)}, {"torch": 4, "paddle": 4}, 0.5)
        assert not j["passed"] and j["noisy"], (paddle, j)


def test_backward_tensor_iterations_setting():
    from coordinator.errors import UsageError
    from coordinator.steps.backward import tensor_iterations
    assert tensor_iterations("ends", 10) == {0, 9}
    assert tensor_iterations("ends", 1) == {0}
    assert tensor_iterations("all", 3) == {0, 1, 2}
    assert tensor_iterations("0, 4,9", 10) == {0, 4, 9}
    for bad in ("10", "-1", "some", ""):
        with pytest.raises(UsageError, match="backward_tensors"):
            tensor_iterations(bad, 10)


def test_the_default_parameter_tolerance_follows_an_adam_lr_above_the_guides():
    """A correct port at lr 5e-4 moves parameters 2e-5 apart (Adam's ~lr steps on near-zero
    gradients): the default 5e-6 grows with lr for Adam-type optimizers only, never below 5e-6,
    and a tolerance the user gave is kept as given."""
    from types import SimpleNamespace
    from coordinator.steps.backward import DEFAULTS, tolerances

    def tol(optim, given=None):
        rc = SimpleNamespace(opts=SimpleNamespace(tolerances=given or {}))
        rc.tol = lambda key, default: rc.opts.tolerances.get(key, default)
        return tolerances(rc, optim)["param"].threshold
    assert tol({"type": "adamw", "lr": 3e-5}) == DEFAULTS["param"].threshold == 5e-6
    assert tol({"type": "adamw", "lr": 1e-6}) == 5e-6
    assert tol({"type": "adamw", "lr": 5e-4}) == pytest.approx(5e-6 * 5e-4 / 3e-5)
    assert tol({"type": "adam", "lr": 6e-5}) == pytest.approx(1e-5)
    assert tol({"type": "sgd", "lr": 1e-2}) == 5e-6                      # SGD's step is lr x gradient
    assert tol({"type": "adamw", "lr": 5e-4}, {"backward.param": Tolerance(1e-6, "max")}) == 1e-6
    assert tol({"type": "adamw", "lr": 5e-4}, {"backward": Tolerance(2e-6, "max")}) == 2e-6


class _Rc:
    """Just enough of a RunContext for run_then_restore: converted weights, a snapshot to restore."""

    def __init__(self, restore_fails: bool = False):
        self.cache = {"converted": {}, "weights_snapshot": True}
        self.said: list[str] = []
        self.restored = 0
        self.restore_fails = restore_fails

    def both(self, op, body, at_once=False):
        assert op == "weights_restore"
        self.restored += 1
        if self.restore_fails:
            from coordinator.errors import WorkerDied
            raise WorkerDied("torch worker killed by signal SIGTERM during weights_restore")

    def say(self, text):
        self.said.append(text)


@pytest.mark.parametrize("error", ["WorkerDied", "WorkerHung", "Interrupted"])
def test_a_training_step_that_loses_a_worker_reports_that_not_the_restore(error):
    """The original error (which worker died, in which op) reaches the report; no restore is sent
    to a dead worker (it used to fail too and replace the real error by its own)."""
    from coordinator import errors
    from coordinator.steps._training import run_then_restore
    rc = _Rc(restore_fails=True)
    exc = getattr(errors, error)("paddle worker killed by signal SIGKILL during train_step")

    def body(_rc):
        raise exc
    with pytest.raises(getattr(errors, error)) as got:
        run_then_restore(rc, body)
    assert got.value is exc and rc.restored == 0


def test_a_training_step_whose_op_failed_still_restores_the_weights_and_keeps_its_error():
    from types import SimpleNamespace
    from coordinator.errors import WorkerFailed
    from coordinator.steps._training import run_then_restore

    def body(_rc):
        raise WorkerFailed(SimpleNamespace(worker="paddle", op="train_step", etype="ValueError", message="bad"))
    rc = _Rc()
    with pytest.raises(WorkerFailed, match="failed in op 'train_step'"):
        run_then_restore(rc, body)
    assert rc.restored == 1                                    # the workers live: later steps get the weights
    failing = _Rc(restore_fails=True)
    with pytest.raises(WorkerFailed, match="failed in op 'train_step'"):  # a failing restore does not hide it
        run_then_restore(failing, body)
    assert any("restoring the pristine weights failed too" in s for s in failing.said)
    ok = _Rc()
    assert run_then_restore(ok, lambda _rc: "result") == "result" and ok.restored == 1
