"""Helpers the model-free stage steps (data, metric, loss, lr) share.

A leading underscore keeps this module out of the step registry (only names in ORDER load).
"""

from __future__ import annotations

from ..runner import RunContext


def side_inject(rc: RunContext, side: str) -> list[str]:
    """The run's deliberate bugs for one side.

    ``self.inject`` in a worker is only set by ``load_model``; ops that run without a model
    (tokenize, metric, lr) get the list in their request body instead.
    """
    return list(rc.opts.paddle_inject if side == "paddle" else rc.opts.torch_inject)


def bodies(rc: RunContext, body: dict) -> tuple[dict, dict]:
    """The same request for both sides, each with its own inject list."""
    return dict(body, inject=side_inject(rc, "torch")), dict(body, inject=side_inject(rc, "paddle"))
