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
def _table() -> dict[str, dict[str, Any]]:
    data = tomllib.loads(ADVICE_FILE.read_text())
    table: dict[str, dict[str, Any]] = {}
    for key, entry in data.items():
        item = {"kind": key, "causes": list(entry.get("causes", []))}
        for name in [key, *entry.get("aliases", [])]:
            table[name.lower()] = item
    return table


def advice_for(*type_names: str) -> dict[str, Any] | None:
    """The first entry matching any of the given layer types (torch's class first), or None."""
    table = _table()
    for name in type_names:
        if name and name.lower() in table:
            return table[name.lower()]
    return None
