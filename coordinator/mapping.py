"""Weight mapping kept as data: key renames, per-tensor transforms, ignored keys.

A mapping file (TOML) converts a torch state dict into the paddle model's names and
layouts. The built-in BERT mapping (``mappings/bert.toml``) uses the same format, so a
user can copy and edit it. ``WeightMap.convert`` checks everything it can and
reports every problem at once, naming the key and both shapes.

Tables, applied in this order (docs/own-model.md has the reference):
  [ignore]      torch/paddle key regexes that are not weights to move
  [[merge]]     several torch tensors concatenated into one (e.g. q, k, v -> fused qkv)
  [keys]        exact torch key -> paddle key (``coordinator map --suggest`` writes these)
  [[rename]]    regex substitutions for keys not in [keys]
  [[transform]] transpose | reshape | split, matched on the torch key (regex or exact ``keys``)
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
    def __init__(self, problems: list[str], source: str, footer: str = ""):
        self.problems = problems
        shown = "\n  ".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        super().__init__(f"weight mapping {source}: {len(problems)} problem(s):\n  {shown}{more}"
                         + (f"\n  {footer}" if footer else ""))


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
    keys: frozenset[str] | None = None   # exact torch keys instead of ``pattern``
    index: int = 0                       # 1-based position in the file, for messages

    def applies(self, key: str, arr: np.ndarray) -> bool:
        hit = key in self.keys if self.keys is not None else bool(self.pattern.search(key))
        return hit and (self.ndim is None or arr.ndim == self.ndim)


@dataclass
class Merge:
    """Concatenate several torch tensors into one (the reverse of ``split``).

    ``pattern``'s first group names the part; every torch key it matches is one part of
    the merged key obtained by replacing that group with ``into``. Parts are joined in
    ``parts`` order along ``axis``; the merged tensor then goes through [keys], renames and
    transforms under its merged (virtual) torch key.
    """

    pattern: re.Pattern
    parts: list[str]
    into: str
    axis: int = 0
    index: int = 0

    def group_key(self, key: str) -> tuple[str, str] | None:
        """(merged key, part name) for a torch key that takes part in this merge, else None."""
        m = self.pattern.search(key)
        if not m or m.lastindex is None or m.group(1) not in self.parts:
            return None
        return key[:m.start(1)] + self.into + key[m.end(1):], m.group(1)


@dataclass
class Conversion:
    """How one source tensor became one target tensor (used again for gradients)."""

    source: str
    target: str
    ops: list[str]
    source_shape: tuple
    target_shape: tuple


# The mapping file's schema: every table and key it may hold. Anything else is a typo that
# would otherwise be ignored ([[renames]]) or misread (a string where a list belongs).
SCHEMA: dict[str, tuple[str, set[str]]] = {
    "rename": ("array", {"pattern", "replace"}),
    "transform": ("array", {"pattern", "keys", "ndim", "op", "axes", "shape", "axis", "target_pattern", "targets"}),
    "merge": ("array", {"pattern", "parts", "into", "axis"}),
    "ignore": ("table", {"torch", "paddle"}),
    "keys": ("table", set()),      # any torch key
    "name": ("value", set()),
}
LIST_FIELDS = {"keys", "axes", "shape", "targets", "parts", "torch", "paddle"}


def _check_schema(data: dict[str, Any], origin: str) -> None:
    """Refuse unknown tables and keys by name (with the closest known one), a single ``[rename]``
    where ``[[rename]]`` is meant, and a string where a list belongs."""
    import difflib

    def unknown(what: str, key: str, known: set[str]) -> UsageError:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return UsageError(f"mapping {origin}: unknown {what} {key!r}{hint} (known: {', '.join(sorted(known))})")

    for top, value in data.items():
        if top not in SCHEMA:
            raise unknown("table or key", top, set(SCHEMA))
        kind, fields = SCHEMA[top]
        if kind == "array":
            if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
                raise UsageError(f"mapping {origin}: {top!r} must be a list of tables: write [[{top}]] (double "
                                 f"brackets) before each one")
            entries = [(f"{top} #{i + 1}", x) for i, x in enumerate(value)]
        elif kind == "table":
            if not isinstance(value, dict):
                raise UsageError(f"mapping {origin}: {top!r} must be a table: [{top}]")
            entries = [(f"[{top}]", value)] if fields else []
        else:
            entries = []
        for where, entry in entries:
            for key, v in entry.items():
                if key not in fields:
                    raise unknown(f"key in {where}", key, fields)
                if key in LIST_FIELDS and not isinstance(v, list):
                    raise UsageError(f"mapping {origin}: {where}: {key!r} must be a list, e.g. {key} = "
                                     f"[{v!r}], not {type(v).__name__} {v!r:.60}")


@dataclass
class WeightMap:
    name: str
    renames: list[tuple[re.Pattern, str]]
    transforms: list[Transform]
    ignore_source: list[re.Pattern]
    ignore_target: list[re.Pattern]
    origin: str = "<built-in>"
    exact: dict[str, str] = field(default_factory=dict)   # [keys]: torch key -> paddle key
    merges: list[Merge] = field(default_factory=list)

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
        _check_schema(data, origin)

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
            if "keys" in t and not isinstance(t["keys"], list):
                raise UsageError(f"mapping {origin}: transform #{i + 1}: 'keys' must be a list of torch keys")
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
                                        t.get("target_pattern", ""), list(t.get("targets", [])),
                                        frozenset(map(str, t["keys"])) if "keys" in t else None, i + 1))
        merges = []
        for i, m in enumerate(data.get("merge", [])):
            if not ("pattern" in m and "parts" in m and "into" in m):
                raise UsageError(f"mapping {origin}: merge #{i + 1} needs 'pattern' (group 1 = the part), "
                                 f"'parts' (their order) and 'into' (the merged part name)")
            pat = rx(m["pattern"], f"merge #{i + 1}")
            if pat.groups < 1:
                raise UsageError(f"mapping {origin}: merge #{i + 1}: pattern {m['pattern']!r} needs a group "
                                 f"that captures the part name")
            merges.append(Merge(pat, [str(x) for x in m["parts"]], str(m["into"]), int(m.get("axis", 0)), i + 1))
        exact = data.get("keys", {})
        if not isinstance(exact, dict) or not all(isinstance(v, str) for v in exact.values()):
            raise UsageError(f"mapping {origin}: [keys] must map torch key strings to paddle key strings")
        ign = data.get("ignore", {})
        return cls(str(data.get("name", origin)), renames, transforms,
                   [rx(s, "ignore.torch") for s in ign.get("torch", [])],
                   [rx(s, "ignore.paddle") for s in ign.get("paddle", [])], origin, dict(exact), merges)

    # -- conversion -------------------------------------------------------------------
    def target_name(self, key: str) -> str:
        if key in self.exact:
            return self.exact[key]
        for pat, rep in self.renames:
            key = pat.sub(rep, key)
        return key

    def target_names(self, key: str, ndim: int | None = None) -> list[str]:
        """The paddle names a torch key becomes, without its tensor: [keys] and renames, then every
        part of a split (a transform restricted to an ``ndim`` counts when ``ndim`` is unknown);
        a [[merge]] part becomes its merged key's names. Layer pairing and the weight-decay
        groups use this, so a port whose q/k/v come from one packed torch tensor still pairs."""
        part = self.merge_part(key)
        if part:
            key = part[1]
        names = [self.target_name(key)]
        for t in self.transforms:
            if t.op != "split":
                continue
            hit = key in t.keys if t.keys is not None else bool(t.pattern.search(key))
            if hit and (ndim is None or t.ndim is None or t.ndim == ndim):
                names = [re.sub(t.target_pattern, n, x) for x in names for n in t.targets]
        return names

    def ignored_source(self, key: str) -> bool:
        return any(p.search(key) for p in self.ignore_source)

    def ignored_target(self, key: str) -> bool:
        return any(p.search(key) for p in self.ignore_target)

    def merge_part(self, key: str) -> tuple[Merge, str, str] | None:
        """(merge, merged key, part) when ``key`` is one part of a [[merge]], else None."""
        for m in self.merges:
            hit = m.group_key(key)
            if hit:
                return m, hit[0], hit[1]
        return None

    def convert_one(self, key: str, arr: np.ndarray, views: bool = False) -> list[tuple[str, np.ndarray, list[str]]]:
        """Convert one source tensor; a split yields several (target, array, ops).

        ``views=True``: transposes and splits return numpy views instead of contiguous copies
        (for comparing: coordinator.compare walks strided arrays blockwise; a BERT-base
        gradient set is 340 MB of transposed weights, ~1 s of copying per iteration).

        A key that is only one part of a [[merge]] has no paddle tensor of its own: use
        ``convert_tensors`` on a dict holding all parts.
        """
        part = self.merge_part(key)
        if part:
            raise MappingError([f"torch key {key!r} is part {part[2]!r} of merge #{part[0].index} into {part[1]!r}: "
                                f"convert it together with the other parts (convert_tensors)"], self.origin)
        return self._transform(key, np.asarray(arr), views)

    def _transform(self, key: str, arr: np.ndarray, views: bool = False) -> list[tuple[str, np.ndarray, list[str]]]:
        out = [(self.target_name(key), arr, [])]
        for t in self.transforms:
            nxt = []
            for tkey, a, ops in out:
                if not t.applies(key, a):
                    nxt.append((tkey, a, ops))
                else:
                    nxt.extend(self._apply(t, key, tkey, a, ops, views))
            out = nxt
        return out

    def _apply(self, t: Transform, key: str, tkey: str, a: np.ndarray, ops: list[str], views: bool = False
               ) -> list[tuple[str, np.ndarray, list[str]]]:
        own = (lambda x: x) if views else np.ascontiguousarray
        where = f"transform #{t.index} ({t.op}) on torch {key!r} {tuple(a.shape)} -> paddle {tkey!r}"
        if t.op == "transpose":
            if a.ndim < 2 and not t.axes:
                raise MappingError([f"{where}: a {a.ndim}-D tensor has nothing to transpose; restrict the "
                                    f"transform (ndim = 2, or a narrower pattern)"], self.origin)
            axes = t.axes or list(range(a.ndim))[::-1]
            if sorted(axes) != list(range(a.ndim)):
                raise MappingError([f"{where}: axes {list(axes)} do not fit a {a.ndim}-D tensor"], self.origin)
            return [(tkey, own(np.transpose(a, axes)), ops + [f"transpose{tuple(axes)}"])]
        if t.op == "reshape":
            try:
                return [(tkey, a.reshape(t.shape), ops + [f"reshape{tuple(t.shape)}"])]
            except ValueError:
                raise MappingError([f"{where}: cannot reshape {tuple(a.shape)} ({a.size} values) to "
                                    f"{tuple(t.shape)}"], self.origin) from None
        if not -a.ndim <= t.axis < a.ndim or a.shape[t.axis] % len(t.targets):
            raise MappingError([f"{where}: cannot split axis {t.axis} into {len(t.targets)} equal parts"],
                               self.origin)
        parts = np.split(a, len(t.targets), axis=t.axis)
        return [(re.sub(t.target_pattern, name, tkey), own(part), ops + [f"split(axis={t.axis})"])
                for name, part in zip(t.targets, parts)]

    def _merged(self, source: dict[str, np.ndarray], problems: list[str]
                ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        """Replace the parts of every [[merge]] by their concatenation, at the first part's place."""
        if not self.merges:
            return source, {}
        groups: dict[str, tuple[Merge, dict[str, str]]] = {}
        for key in source:
            hit = self.merge_part(key)
            if hit:
                groups.setdefault(hit[1], (hit[0], {}))[1][hit[2]] = key
        out: dict[str, np.ndarray] = {}
        origins: dict[str, list[str]] = {}
        for key, arr in source.items():
            hit = self.merge_part(key)
            if not hit:
                out[key] = arr
                continue
            m, merged, _ = hit
            if merged in out or merged in origins:
                continue
            have = groups[merged][1]
            keys = [have.get(p) for p in m.parts]
            origins[merged] = [k for k in keys if k]
            if None in keys:
                missing = [p for p, k in zip(m.parts, keys) if k is None]
                problems.append(f"merge #{m.index} into torch {merged!r}: part(s) {missing} missing; have "
                                + ", ".join(f"{k!r} {tuple(np.shape(source[k]))}" for k in origins[merged]))
                continue
            try:
                out[merged] = np.concatenate([np.asarray(source[k]) for k in keys], axis=m.axis)
            except ValueError:  # numpy's AxisError is a ValueError
                problems.append(f"merge #{m.index} into torch {merged!r}: cannot concatenate on axis {m.axis}: "
                                + ", ".join(f"{k!r} {tuple(np.shape(source[k]))}" for k in keys))
        return out, origins

    def convert_tensors(self, source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Convert torch-layout tensors (e.g. gradients) to paddle names and layouts, merges included."""
        problems: list[str] = []
        merged, _ = self._merged({k: v for k, v in source.items() if not self.ignored_source(k)}, problems)
        out = {}
        for key, arr in merged.items():
            try:
                out.update({tkey: tarr for tkey, tarr, _ in self._transform(key, np.asarray(arr))})
            except MappingError as exc:
                problems.extend(exc.problems)
        if problems:
            raise MappingError(problems, self.origin)
        return out

    def convert(self, source: dict[str, np.ndarray], target_specs: dict[str, tuple[list[int], str]]
                ) -> tuple[dict[str, np.ndarray], list[Conversion]]:
        """Map a whole torch state dict onto the paddle model's keys; raise with every problem."""
        problems: list[str] = []
        result: dict[str, np.ndarray] = {}
        records: list[Conversion] = []
        known = set(source)
        source, origins = self._merged({k: v for k, v in source.items() if not self.ignored_source(k)}, problems)
        known |= set(source)          # merged (virtual) torch keys too
        # exact names that match no torch key are typos: name them (a regex may match nothing on purpose)
        for k in self.exact:
            if k not in known:
                hint = _closest(k, known)
                problems.append(f"[keys] entry {k!r} matches no torch key" + (f" (closest: {hint!r})" if hint else ""))
        for t in self.transforms:
            for k in t.keys or ():
                if k not in known:
                    hint = _closest(k, known)
                    problems.append(f"transform #{t.index} ({t.op}) lists {k!r}, which matches no torch key"
                                    + (f" (closest: {hint!r})" if hint else ""))
        reported: set[str] = set()   # paddle keys already named in a problem
        for key, arr in source.items():
            try:
                converted = self._transform(key, np.asarray(arr))
            except MappingError as exc:
                tkey = self.target_name(key)
                reported.add(tkey)
                want = f"paddle {tkey!r} expects {tuple(target_specs[tkey][0])}" if tkey in target_specs \
                    else f"paddle model has no {tkey!r}"
                problems.extend(f"{p} ({want})" for p in exc.problems)
                continue
            if key in origins:
                key = " + ".join(origins[key])
            for tkey, tarr, ops in converted:
                if tkey not in target_specs:
                    hint = _closest(tkey, target_specs)
                    problems.append(f"torch key {key!r} {tuple(np.shape(arr))} maps to {tkey!r}, which the paddle "
                                    f"model does not have"
                                    + (f" (closest: {hint!r} {tuple(target_specs[hint][0])})" if hint else ""))
                    continue
                want = tuple(target_specs[tkey][0])
                reported.add(tkey)
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
            if tkey not in result and tkey not in reported and not self.ignored_target(tkey):
                hint = _closest(tkey, {self.target_name(k): k for k in source})
                near = f" (closest converted name: {hint!r})" if hint and hint not in result else ""
                problems.append(f"paddle key {tkey!r} {tuple(target_specs[tkey][0])} receives no torch tensor{near}")
        if problems:
            raise MappingError(problems, self.origin)
        return result, records


def _closest(key: str, candidates: dict[str, Any]) -> str | None:
    import difflib
    m = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return m[0] if m else None
