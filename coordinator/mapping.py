"""Weight mapping kept as data: key renames, per-tensor transforms, ignored keys.

A mapping file (TOML) converts a torch state dict into the paddle model's names and
layouts. The built-in BERT mapping (``mappings/bert.toml``) uses the same format, so a
user can copy and edit it. ``WeightMap.convert`` checks everything it can and
reports every problem at once, naming the key and both shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore

from .errors import UsageError

BUILTIN_DIR = Path(__file__).parent / "mappings"


class MappingError(UsageError):
    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        shown = "\n  ".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        super().__init__(f"weight mapping {source}: {len(problems)} problem(s):\n  {shown}{more}")


@dataclass
class Transform:
    pattern: re.Pattern
    op: str                      # transpose | reshape | split
    ndim: int | None = None
    axes: list[int] | None = None
    shape: list[int] | None = None
    axis: int = 0
    target_pattern: str = ""
    targets: list[str] = field(default_factory=list)

    def applies(self, key: str, arr: np.ndarray) -> bool:
        return bool(self.pattern.search(key)) and (self.ndim is None or arr.ndim == self.ndim)


@dataclass
class Conversion:
    """How one source tensor became one target tensor (used again for gradients)."""

    source: str
    target: str
    ops: list[str]
    source_shape: tuple
    target_shape: tuple


@dataclass
class WeightMap:
    name: str
    renames: list[tuple[re.Pattern, str]]
    transforms: list[Transform]
    ignore_source: list[re.Pattern]
    ignore_target: list[re.Pattern]
    origin: str = "<built-in>"

    # -- loading ----------------------------------------------------------------------
    @classmethod
    def load(cls, path_or_name: str | Path) -> "WeightMap":
        p = Path(path_or_name)
        if not p.exists():
            builtin = BUILTIN_DIR / f"{path_or_name}.toml"
            if not builtin.exists():
                raise UsageError(f"mapping {path_or_name!r}: no such file, and no built-in mapping of that name "
                                 f"(built-in: {', '.join(sorted(x.stem for x in BUILTIN_DIR.glob('*.toml')))})")
            p = builtin
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"mapping file {p}: not valid TOML: {exc}") from None
        return cls.from_dict(data, str(p))

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>") -> "WeightMap":
        def rx(s: Any, where: str) -> re.Pattern:
            try:
                return re.compile(str(s))
            except re.error as exc:
                raise UsageError(f"mapping {origin}: bad regular expression {s!r} in {where}: {exc}") from None

        renames = []
        for i, r in enumerate(data.get("rename", [])):
            if "pattern" not in r or "replace" not in r:
                raise UsageError(f"mapping {origin}: rename #{i + 1} needs 'pattern' and 'replace'")
            renames.append((rx(r["pattern"], f"rename #{i + 1}"), str(r["replace"])))
        transforms = []
        for i, t in enumerate(data.get("transform", [])):
            op = t.get("op")
            if op not in ("transpose", "reshape", "split"):
                raise UsageError(f"mapping {origin}: transform #{i + 1} has op {op!r}; "
                                 f"use transpose, reshape or split")
            if op == "reshape" and "shape" not in t:
                raise UsageError(f"mapping {origin}: transform #{i + 1} (reshape) needs 'shape'")
            if op == "split" and not ("targets" in t and "target_pattern" in t):
                raise UsageError(f"mapping {origin}: transform #{i + 1} (split) needs 'target_pattern' and 'targets'")
            transforms.append(Transform(rx(t.get("pattern", ".*"), f"transform #{i + 1}"), op, t.get("ndim"),
                                        t.get("axes"), t.get("shape"), int(t.get("axis", 0)),
                                        t.get("target_pattern", ""), list(t.get("targets", []))))
        ign = data.get("ignore", {})
        return cls(str(data.get("name", origin)), renames, transforms,
                   [rx(s, "ignore.torch") for s in ign.get("torch", [])],
                   [rx(s, "ignore.paddle") for s in ign.get("paddle", [])], origin)

    # -- conversion -------------------------------------------------------------------
    def target_name(self, key: str) -> str:
        for pat, rep in self.renames:
            key = pat.sub(rep, key)
        return key

    def ignored_source(self, key: str) -> bool:
        return any(p.search(key) for p in self.ignore_source)

    def ignored_target(self, key: str) -> bool:
        return any(p.search(key) for p in self.ignore_target)

    def convert_one(self, key: str, arr: np.ndarray) -> list[tuple[str, np.ndarray, list[str]]]:
        """Convert one source tensor; a split yields several (target, array, ops)."""
        target = self.target_name(key)
        out = [(target, np.asarray(arr), [])]
        for t in self.transforms:
            nxt = []
            for tkey, a, ops in out:
                if not t.applies(key, a):
                    nxt.append((tkey, a, ops))
                elif t.op == "transpose":
                    axes = t.axes or list(range(a.ndim))[::-1]
                    nxt.append((tkey, np.ascontiguousarray(np.transpose(a, axes)), ops + [f"transpose{tuple(axes)}"]))
                elif t.op == "reshape":
                    try:
                        nxt.append((tkey, a.reshape(t.shape), ops + [f"reshape{tuple(t.shape)}"]))
                    except ValueError:
                        raise MappingError([f"{key}: cannot reshape {a.shape} to {t.shape}"], self.origin) from None
                else:  # split
                    parts = np.split(a, len(t.targets), axis=t.axis)
                    for name, part in zip(t.targets, parts):
                        nxt.append((re.sub(t.target_pattern, name, tkey), np.ascontiguousarray(part),
                                    ops + [f"split(axis={t.axis})"]))
            out = nxt
        return out

    def convert(self, source: dict[str, np.ndarray], target_specs: dict[str, tuple[list[int], str]]
                ) -> tuple[dict[str, np.ndarray], list[Conversion]]:
        """Map a whole torch state dict onto the paddle model's keys; raise with every problem."""
        problems: list[str] = []
        result: dict[str, np.ndarray] = {}
        records: list[Conversion] = []
        for key, arr in source.items():
            if self.ignored_source(key):
                continue
            for tkey, tarr, ops in self.convert_one(key, arr):
                if tkey not in target_specs:
                    hint = _closest(tkey, target_specs)
                    problems.append(f"torch key {key!r} maps to {tkey!r}, which the paddle model does not have"
                                    + (f" (closest: {hint!r})" if hint else ""))
                    continue
                want = tuple(target_specs[tkey][0])
                if tuple(tarr.shape) != want:
                    problems.append(f"shape mismatch for torch {key!r} {tuple(np.shape(arr))} -> paddle {tkey!r}: "
                                    f"converted {tuple(tarr.shape)}{' after ' + ', '.join(ops) if ops else ''}, "
                                    f"paddle expects {want}")
                    continue
                if tkey in result:
                    problems.append(f"two torch keys map to paddle {tkey!r} (second: {key!r})")
                    continue
                want_dtype = target_specs[tkey][1]
                if want_dtype and str(tarr.dtype) != want_dtype and want_dtype != "bfloat16":
                    tarr = tarr.astype(want_dtype)
                    ops = ops + [f"cast({want_dtype})"]
                result[tkey] = tarr
                records.append(Conversion(key, tkey, ops, tuple(np.shape(arr)), tuple(tarr.shape)))
        for tkey in target_specs:
            if tkey not in result and not self.ignored_target(tkey):
                problems.append(f"paddle key {tkey!r} {tuple(target_specs[tkey][0])} receives no torch tensor")
        if problems:
            raise MappingError(problems, self.origin)
        return result, records


def _closest(key: str, candidates: dict[str, Any]) -> str | None:
    import difflib
    m = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return m[0] if m else None
