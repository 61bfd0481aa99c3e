"""The short advisor: usual causes of a layer's own error, kept as data in ``advice.toml``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore

ADVICE_FILE = Path(__file__).parent / "advice.toml"


@lru_cache(maxsize=1)
def _table() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(exact name -> entry, lower-cased name -> entry); the first entry to claim a lower-cased
    name keeps it, so ``Conv1D`` (HF's Linear) and ``Conv1d`` (a convolution) stay apart."""
    data = tomllib.loads(ADVICE_FILE.read_text())
    exact: dict[str, dict[str, Any]] = {}
    lower: dict[str, dict[str, Any]] = {}
    for key, entry in data.items():
        item = {"kind": key, "causes": list(entry.get("causes", []))}
        for name in [key, *entry.get("aliases", [])]:
            exact.setdefault(name, item)
            lower.setdefault(name.lower(), item)
    return exact, lower


def advice_for(*type_names: str) -> dict[str, Any] | None:
    """The first entry matching any of the given layer types (torch's class first): an exact
    type name before a case-insensitive one; None when none matches."""
    exact, lower = _table()
    for name in type_names:
        if name and name in exact:
            return exact[name]
    for name in type_names:
        if name and name.lower() in lower:
            return lower[name.lower()]
    return None
