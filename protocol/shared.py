"""Framework-free helpers both worker adapters use (installed with ``protocol`` into every env)."""

from __future__ import annotations

from typing import Any


class InjectError(ValueError):
    """An ``--*-inject`` bug this worker cannot apply to this model: the command line's fault,
    reported by the coordinator as a usage error (exit 2), matched by this type's name."""


def inject_value(inject: list[str], name: str) -> str | None:
    """The value of ``name:<value>`` (or ``""`` for a bare flag) in the inject list, else None."""
    for item in inject:
        head, _, rest = item.partition(":")
        if head == name:
            return rest
    return None


NUMBER_INJECTS = {"adamw_eps": "adamw_eps:1e-8", "grad_scale": "grad_scale:1.01"}   # name -> an example


def check_number_injects(inject: list[str]) -> None:
    """Injects that carry a number (``adamw_eps:<eps>``, ``grad_scale:<factor>``) must carry a positive,
    finite one: a bare ``grad_scale`` would otherwise be a silent no-op negative control, and
    ``grad_scale:abc`` a worker error in the middle of a step. Called when the model loads."""
    for item in inject:
        head, _, rest = item.partition(":")
        if head not in NUMBER_INJECTS:
            continue
        try:
            value = float(rest)
        except ValueError:
            value = float("nan")
        if not (0 < value < float("inf")):
            raise InjectError(f"inject {item!r} needs a positive number (e.g. {NUMBER_INJECTS[head]})")


class NoHooks:
    """``hooks: false`` in layer capture: the very same pass without any hook (the benchmark's baseline)."""

    seq, seconds = 0, 0.0

    def __enter__(self) -> "NoHooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def hook_params(self) -> None:
        pass

    def _next(self) -> int:
        return 0


class WeightSnapshotOps:
    """Ops ``weights_snapshot`` / ``weights_restore`` for a worker's ``TrainOps``: training steps
    undo themselves without the coordinator sending the whole model back (BERT-base: 418 MiB
    per side). The worker supplies ``_copy_state()`` (a detached copy of every weight) and
    ``_load_state(snapshot)``."""

    _snapshot: dict | None = None

    def op_weights_snapshot(self, body: dict, ctx: Any) -> dict:
        self._snapshot = self._copy_state()
        return {"tensors": len(self._snapshot)}

    def op_weights_restore(self, body: dict, ctx: Any) -> dict:
        """Put the snapshot back and drop it (it is a whole second model in memory)."""
        snap = self._snapshot
        if snap is None:
            raise RuntimeError("no weight snapshot to restore: send weights_snapshot first")
        self._load_state(snap)
        self._snapshot = None
        return {"tensors": len(snap)}
