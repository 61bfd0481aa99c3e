"""Lockstep pacing (Session.request_many(pace=W)): two workers streaming partials side by side,
the fast one never more than W ahead of the slow one, so the coordinator holds at most W
tensors waiting for their counterparts. Fake workers, no framework."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import FAKE
from coordinator.session import Session, WorkerSpec

N = 30


def lead_over_run(tmp_path, pace: int) -> tuple[int, dict]:
    order: list[str] = []
    with Session(tmp_path / f"run{pace}") as s:
        for side in ("torch", "paddle"):
            s.launch(WorkerSpec(side, [sys.executable, FAKE, side], framework=side))
        s.wait_hello(timeout=30)
        calls = {"torch": ("tensors", {"sizes": [20_000] * N, "stream": True}),
                 "paddle": ("tensors", {"sizes": [20_000] * N, "stream": True, "delay": 0.02})}
        replies = s.request_many(calls, on_partial=lambda name, body: order.append(name), pace=pace)
        assert s.request("torch", "ping", {})["requests"] == 2  # late credits were ignored, still serving
    lead, counts = 0, {"torch": 0, "paddle": 0}
    for name in order:
        counts[name] += 1
        lead = max(lead, counts["torch"] - counts["paddle"])
    assert counts == {"torch": N, "paddle": N}
    return lead, replies


@pytest.mark.timeout(60)
def test_a_fast_worker_is_held_to_the_slow_ones_pace(tmp_path):
    lead, replies = lead_over_run(tmp_path, pace=3)
    assert lead <= 3, lead
    for side in ("torch", "paddle"):  # nothing lost or reordered by the waiting
        for i in range(N):
            np.testing.assert_array_equal(replies[side][f"t{i}"], np.arange(20_000, dtype=np.float32) * 0.5 + i)


@pytest.mark.timeout(60)
def test_unpaced_the_fast_worker_runs_ahead(tmp_path):
    """The control: without pacing torch streams everything while paddle is still at the start."""
    lead, _ = lead_over_run(tmp_path, pace=0)
    assert lead > 10, lead
