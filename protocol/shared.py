"""Framework-free helpers both worker adapters use (installed with ``protocol`` into every env)."""

from __future__ import annotations

from typing import Any


def inject_value(inject: list[str], name: str) -> str | None:
    """The value of ``name:<value>`` (or ``""`` for a bare flag) in the inject list, else None."""
    for item in inject:
        head, _, rest = item.partition(":")
        if head == name:
            return rest
    return None


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
