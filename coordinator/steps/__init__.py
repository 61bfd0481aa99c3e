"""Steps in the order ``--steps all`` runs them. Each is ``run(rc) -> StepResult``."""

from __future__ import annotations

from typing import Callable

from . import forward, weights

STEPS: dict[str, Callable] = {
    "weights": weights.run,
    "forward": forward.run,
}
