"""Automatic weight mapping: pair two parameter lists by structure, order and shape.

Used when the models are not presets and no ``--mapping`` is given, and by
``coordinator map --suggest``. Each worker reports, per state-dict entry, its name,
shape, dtype, owning module path and module type (op ``param_info``), and optionally
the order in which modules with parameters are first *called* in a forward pass.

Why modules first, then tensors: a port usually renames modules but keeps each
module's tensors (weight, bias, BatchNorm statistics) together. So modules are aligned
as two sequences (a weighted longest-common-subsequence on "compatible" modules: same
kind of layer and the same tensor shapes, in paddle's layout), then tensors are paired
inside each module pair by role (``running_mean`` <-> ``_mean``) and then order + shape.
Call order beats registration order when both workers give it: a port often registers
sub-layers in another order (PaddleNLP's encoder layer registers ``norm1`` after
``linear2``) but calls them in the same order as the original.

Nothing is guessed silently: a module left over on one side, or one that could pair
with several on the other side, is reported with its full module path on both sides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

# torch-only bookkeeping that has no paddle counterpart (BatchNorm's step counter)
TORCH_IGNORE = (r"(^|\.)num_batches_tracked$",)

ROLE = {"running_mean": "mean", "_mean": "mean", "running_var": "var", "_variance": "var"}


@dataclass(frozen=True)
class Param:
    """One state-dict entry as a worker reports it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    module: str            # owning module path ("" for the root)
    module_type: str       # class name of the owning module (Linear, Conv2D, ...)
    buffer: bool = False
    alias_of: str = ""     # tied weights: the earlier name of this very tensor (torch)

    @property
    def local(self) -> str:
        return self.name[len(self.module) + 1:] if self.module else self.name

    @property
    def role(self) -> str:
        return ROLE.get(self.local, self.local)

    def describe(self) -> str:
        return f"{self.name!r} {self.shape} in {self.module or '<root>'} ({self.module_type})"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Param":
        return cls(str(d["name"]), tuple(int(x) for x in d["shape"]), str(d.get("dtype", "")),
                   str(d.get("module", "")), str(d.get("module_type", "?")), bool(d.get("buffer", False)),
                   str(d.get("alias_of") or ""))


def type_class(name: str) -> str:
    """A framework-neutral layer kind: torch ``Conv2d`` and paddle ``Conv2D`` are both ``conv2d``."""
    n = name.lower()
    if n.endswith("linear"):
        return "linear"
    m = re.fullmatch(r"conv(transpose)?([123])d(transpose)?", n)
    if m:
        return f"conv{'transpose' if m.group(1) or m.group(3) else ''}{m.group(2)}d"
    if "batchnorm" in n:
        return "batchnorm"
    m = re.fullmatch(r"(layernorm|groupnorm|embedding|instancenorm[123]d|prelu|lstm|gru|simplernn|rmsnorm)", n)
    return m.group(1) if m else "other:" + n


@dataclass
class Module:
    path: str
    type_name: str
    params: list[Param]

    @property
    def kind(self) -> str:
        return type_class(self.type_name)

    def describe(self) -> str:
        shapes = ", ".join(f"{p.local}{list(p.shape)}" for p in self.params)
        return f"{self.path or '<root>'} ({self.type_name}: {shapes})"


@dataclass
class Pair:
    torch: Param
    paddle: Param
    ops: list[str]
    note: str = ""


@dataclass
class AutoMap:
    pairs: list[Pair] = field(default_factory=list)
    ignored_torch: list[Param] = field(default_factory=list)
    ignored_paddle: list[Param] = field(default_factory=list)
    unmatched_torch: list[Module] = field(default_factory=list)
    unmatched_paddle: list[Module] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    order_notes: list[str] = field(default_factory=list)   # interchangeable modules paired by order alone
    order: str = "registration"

    @property
    def complete(self) -> bool:
        return not (self.unmatched_torch or self.unmatched_paddle or self.ambiguous)

    def problems(self) -> list[str]:
        """Every reason the mapping is incomplete, each naming module paths on both sides."""
        out = list(self.ambiguous)
        out += [f"torch module {m.describe()} has no counterpart in the paddle model" for m in self.unmatched_torch]
        out += [f"paddle module {m.describe()} has no counterpart in the torch model" for m in self.unmatched_paddle]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The mapping as WeightMap.from_dict data: exact keys, per-key transposes, ignores."""
        data: dict[str, Any] = {"name": "automatic", "keys": {p.torch.name: p.paddle.name for p in self.pairs}}
        tr = [p.torch.name for p in self.pairs if "transpose" in p.ops]
        if tr:
            data["transform"] = [{"keys": tr, "op": "transpose"}]
        data["ignore"] = {"torch": [re.escape(p.name) + "$" for p in self.ignored_torch],
                          "paddle": [re.escape(p.name) + "$" for p in self.ignored_paddle]}
        return data

    def to_weight_map(self, origin: str = "<automatic mapping>"):
        from .mapping import WeightMap
        return WeightMap.from_dict(self.to_dict(), origin)

    def to_toml(self, header: str = "") -> str:
        """A mapping file to start from: review it, then pass it with ``--mapping``."""
        q = json.dumps  # a JSON string is a valid TOML basic string
        lines = [f"# {line}" if line else "#" for line in header.splitlines()]
        n_tr = sum(1 for p in self.pairs if "transpose" in p.ops)
        lines += [f"# {len(self.pairs)} tensors paired by module structure and {self.order} order "
                  f"({n_tr} Linear weights transposed).",
                  "# Review the pairs; edit or add [[rename]] / [[transform]] / [[merge]] rules (docs/own-model.md).",
                  'name = "suggested"', "", "[keys]"]
        for p in self.pairs:
            note = f"  # {p.note}" if p.note else ""
            lines.append(f"{q(p.torch.name)} = {q(p.paddle.name)}{note}")
        tr = [p.torch.name for p in self.pairs if "transpose" in p.ops]
        if tr:
            lines += ["", "# torch Linear stores [out, in], paddle Linear [in, out]", "[[transform]]",
                      "op = \"transpose\"", "keys = ["] + [f"  {q(k)}," for k in tr] + ["]"]
        if self.order_notes:
            lines += ["", "# Paired by order alone (same kind and shapes: check these if the port computes them in "
                      "another order):"] + [f"#   {x}" for x in self.order_notes]
        lines += ["", "[ignore]",
                  "torch = [" + ", ".join(q(re.escape(p.name) + "$") for p in self.ignored_torch) + "]",
                  "paddle = [" + ", ".join(q(re.escape(p.name) + "$") for p in self.ignored_paddle) + "]"]
        if not self.complete:
            lines += ["", "# NOT MAPPED - decide these by hand:"] + [f"#   {x}" for x in self.problems()]
        return "\n".join(lines) + "\n"


# -- building blocks ------------------------------------------------------------------------
def _modules(params: Iterable[Param], call_order: list[str] | None) -> list[Module]:
    """Group tensors by owning module; order modules by first call when known, else registration."""
    mods: dict[str, Module] = {}
    for p in params:
        mods.setdefault(p.module, Module(p.module, p.module_type, [])).params.append(p)
    ordered = list(mods.values())
    if call_order:  # called modules by first call, then the never-called ones in registration order
        rank = {path: i for i, path in enumerate(call_order)}
        ordered = [m for _, m in sorted(enumerate(ordered),
                                        key=lambda im: (rank.get(im[1].path, len(rank)), im[0]))]
    return ordered


def _tensor_ops(t: Param, t_kind: str, p: Param, p_kind: str) -> list[str] | None:
    """How a torch tensor becomes the paddle one, or None if it cannot."""
    linear_w = t.role == "weight" and len(t.shape) == 2
    if linear_w and t_kind == "linear" and p_kind == "linear":
        return ["transpose"] if t.shape[::-1] == p.shape else None
    if t.shape == p.shape:
        return []
    if len(t.shape) == 2 and t.shape[::-1] == p.shape:
        return ["transpose"]
    return None


def _pair_module(tm: Module, pm: Module) -> list[Pair] | None:
    """Pair every tensor of two modules (role first, then order + shape), or None if they do not fit."""
    if len(tm.params) != len(pm.params):
        return None
    tk, pk = tm.kind, pm.kind
    if tk != pk and not (tk.startswith("other:") or pk.startswith("other:")):
        return None
    left = list(pm.params)
    pairs: list[Pair] = []
    pending = []
    for t in tm.params:
        same = [p for p in left if p.role == t.role and _tensor_ops(t, tk, p, pk) is not None]
        if same:
            left.remove(same[0])
            pairs.append(Pair(t, same[0], _tensor_ops(t, tk, same[0], pk) or []))
        else:
            pending.append(t)
    for t in pending:
        fit = [p for p in left if _tensor_ops(t, tk, p, pk) is not None]
        if not fit:
            return None
        left.remove(fit[0])
        pairs.append(Pair(t, fit[0], _tensor_ops(t, tk, fit[0], pk) or [], note="paired by order and shape"))
    return pairs


def _score(tm: Module, pm: Module) -> int:
    """0 when incompatible; otherwise prefer same layer kind and same names (tie-breakers)."""
    if _pair_module(tm, pm) is None:
        return 0
    s = 10 + (2 if tm.kind == pm.kind else 0)
    if tm.path == pm.path:
        s += 2
    elif tm.path.rsplit(".", 1)[-1] == pm.path.rsplit(".", 1)[-1]:
        s += 1
    return s


def _signature(m: Module) -> tuple:
    return (m.kind if not m.kind.startswith("other:") else "other",
            tuple(sorted(tuple(sorted(p.shape)) for p in m.params)))


def _align(tmods: list[Module], pmods: list[Module]) -> list[tuple[int, int]]:
    """Weighted longest common subsequence of compatible modules (index pairs, in order)."""
    n, m = len(tmods), len(pmods)
    sig_p = [_signature(x) for x in pmods]
    score = [[0] * m for _ in range(n)]
    for i, tm in enumerate(tmods):
        st = _signature(tm)
        for j in range(m):
            if sig_p[j] == st or "other" in (st[0], sig_p[j][0]):
                score[i][j] = _score(tm, pmods[j])
    dp = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best = max(dp[i + 1][j], dp[i][j + 1])
            if score[i][j]:
                best = max(best, dp[i + 1][j + 1] + score[i][j])
            dp[i][j] = best
    out, i, j = [], 0, 0
    while i < n and j < m:
        if score[i][j] and dp[i][j] == dp[i + 1][j + 1] + score[i][j]:
            out.append((i, j))
            i, j = i + 1, j + 1
        elif dp[i][j] == dp[i + 1][j]:
            i += 1
        else:
            j += 1
    return out


# -- the matcher ----------------------------------------------------------------------------
def automap(torch_params: list[Param], paddle_params: list[Param], torch_calls: list[str] | None = None,
            paddle_calls: list[str] | None = None) -> AutoMap:
    """Pair torch and paddle state-dict entries; see the module docstring for the method."""
    result = AutoMap(order="call" if torch_calls and paddle_calls else "registration")
    ign = [re.compile(x) for x in TORCH_IGNORE]
    tparams = []
    for p in torch_params:   # a tied weight's second name: its tensor is paired under the first
        (result.ignored_torch if p.alias_of or any(r.search(p.name) for r in ign) else tparams).append(p)
    calls_t, calls_p = (torch_calls, paddle_calls) if result.order == "call" else (None, None)
    tmods, pmods = _modules(tparams, calls_t), _modules(paddle_params, calls_p)
    pairs = {i: (j, "") for i, j in _align(tmods, pmods)}
    taken_t, taken_p = _place_leftovers(tmods, pmods, pairs, result)
    _interchangeable(tmods, pmods, pairs, result)
    for i, (j, note) in pairs.items():
        for pair in _pair_module(tmods[i], pmods[j]) or []:
            pair.note = "; ".join(x for x in (pair.note, note) if x)
            result.pairs.append(pair)
    position = {x.name: k for k, x in enumerate(tparams)}
    result.pairs.sort(key=lambda p: position[p.torch.name])
    result.unmatched_torch = [m for i, m in enumerate(tmods) if i not in pairs and i not in taken_t]
    result.unmatched_paddle = [m for j, m in enumerate(pmods)
                               if j not in {b for b, _ in pairs.values()} and j not in taken_p]
    return result


def _interchangeable(tmods: list[Module], pmods: list[Module], pairs: dict[int, tuple[int, str]],
                     result: AutoMap) -> None:
    """Note each group of interchangeable modules (same kind and shapes) that only their order
    paired: no shape can tell ``value`` from ``gate``, so a port that computes them in another
    order is paired wrongly and fails later at the code that uses them. Said, not refused: the
    order is right far more often than not (notes in the suggested TOML and on the console)."""
    groups: dict[tuple, list[int]] = {}
    for i in sorted(pairs):
        groups.setdefault(_signature(tmods[i]), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        shown = ", ".join(f"{tmods[i].path or '<root>'} -> {pmods[pairs[i][0]].path or '<root>'}" for i in members[:4])
        more = f" and {len(members) - 4} more" if len(members) > 4 else ""
        result.order_notes.append(f"{len(members)} x {tmods[members[0]].type_name} of the same shapes paired by "
                                  f"{result.order} order only: {shown}{more}")


def _place_leftovers(tmods: list[Module], pmods: list[Module], pairs: dict[int, tuple[int, str]],
                     result: AutoMap) -> tuple[set[int], set[int]]:
    """Second pass for modules the in-order alignment left over.

    A leftover torch module looks for a fitting leftover paddle module between the
    aligned neighbours around it, widening the window one anchor at a time. One candidate
    and no aligned module of the same kind inside the window: matched ("out of order").
    Otherwise the order is genuinely ambiguous (e.g. two LayerNorms registered in another
    order): the leftovers and the same-kind pairs in the window are all reported, unpaired.
    Returns the module indices named in ambiguity reports (not to be listed again as unmatched).
    """
    import bisect
    anchors = sorted((i, j) for i, (j, _) in pairs.items())
    used_p = {j for _, (j, _) in pairs.items()}
    taken_t: set[int] = set()
    taken_p: set[int] = set()
    for i in [i for i in range(len(tmods)) if i not in pairs]:
        sig = _signature(tmods[i])
        k = bisect.bisect(anchors, (i, -1))
        cands: list[int] = []
        lo, hi = k - 1, k
        for widen in range(len(anchors) + 1):
            lo, hi = k - 1 - widen, k + widen
            plo = anchors[lo][1] if lo >= 0 else -1
            phi = anchors[hi][1] if hi < len(anchors) else len(pmods)
            cands = [j for j in range(plo + 1, phi) if j not in used_p and j not in taken_p
                     and _pair_module(tmods[i], pmods[j]) is not None]
            if cands or (lo < 0 and hi >= len(anchors)):
                break
        inside = anchors[max(lo + 1, 0):min(hi, len(anchors))]
        twins = [(a, b) for a, b in inside if a in pairs and _signature(tmods[a]) == sig]
        if not cands:
            continue
        if len(cands) == 1 and not twins:
            pairs[i] = (cands[0], "matched out of order")
            used_p.add(cands[0])
            continue
        group_t = [i] + [a for a, _ in twins]
        group_p = sorted(cands + [b for _, b in twins])
        for a, _ in twins:
            del pairs[a]
        taken_t.update(group_t)
        taken_p.update(group_p)
        result.ambiguous.append(
            "ambiguous order: torch " + ", ".join(tmods[a].describe() for a in group_t)
            + " <-> paddle " + ", ".join(pmods[b].path for b in group_p)
            + ": same kind and shapes, different order; pair them in [keys] by hand"
            + ("" if result.order == "call" else " (or give the models inputs so call order can decide)"))
    return taken_t, taken_p


def params_from_reply(reply: dict[str, Any]) -> tuple[list[Param], list[str] | None]:
    """Decode a worker's ``param_info`` reply."""
    return [Param.from_json(d) for d in reply.get("params", [])], reply.get("call_order")
