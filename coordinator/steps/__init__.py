"""Steps in the order ``--steps all`` runs them. Each module ``<name>.py`` defines ``run(rc) -> StepResult``.

The order follows the migration guide's dependencies: data and metric need no model,
weights before anything that runs the model, training last.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

ORDER = ["data", "metric", "weights", "forward", "layers", "loss", "lr", "backward", "train", "perf"]


def _load() -> dict[str, Callable]:
    steps = {}
    for name in ORDER:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            steps[name] = importlib.import_module(f"{__name__}.{name}").run
    return steps


STEPS: dict[str, Callable] = _load()
