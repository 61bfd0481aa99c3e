"""Training steps undo themselves from each worker's own snapshot (weights_snapshot /
weights_restore) instead of the coordinator sending the whole model back; both real workers."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.cli import _worker_specs
from coordinator.params import resolve
from coordinator.runner import RunContext, RunOptions
from coordinator.session import Session
from coordinator.steps import backward
from coordinator.steps._training import restore_weights, setup_both
from coordinator.steps.common import ensure_converted

pytestmark = pytest.mark.frameworks


def weights(rc: RunContext) -> dict[str, dict[str, np.ndarray]]:
    return {side: {k: np.array(v) for k, v in rc.session.request(side, "get_weights", {}).items()}
            for side in ("torch", "paddle")}


@pytest.mark.timeout(300)
def test_training_is_undone_bit_for_bit_from_the_workers_snapshot(tmp_path):
    opts = RunOptions(steps=[], out=tmp_path, params=resolve({}))
    with Session(tmp_path) as session:
        for spec in _worker_specs(opts, True, lambda s: None).values():
            session.launch(spec)
        session.wait_hello()
        rc = RunContext(opts, session, lambda s: None)
        rc.cache["schedule"] = "alternate"
        ensure_converted(rc)
        before = weights(rc)
        setup_both(rc, 1e-3, "off")
        inputs, labels = backward.batch(rc)
        rc.both("train_step", {"inputs": inputs, "labels": labels, "want": []})
        trained = weights(rc)
        for side in ("torch", "paddle"):  # the control: a step really moved the weights
            moved = [k for k in before[side] if not np.array_equal(before[side][k], trained[side][k])]
            assert len(moved) > 50, (side, len(moved))
        restore_weights(rc)
        assert "weights_snapshot" not in rc.cache
        after = weights(rc)
        for side in ("torch", "paddle"):
            assert set(after[side]) == set(before[side])
            for k in before[side]:
                assert np.array_equal(before[side][k], after[side][k]), (side, k)
        with pytest.raises(Exception, match="no weight snapshot"):
            session.request("torch", "weights_restore", {})  # dropped after use: nothing stale to restore
