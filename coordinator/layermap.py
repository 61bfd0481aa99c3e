"""Which torch module corresponds to which paddle layer, derived from the weight mapping.

Rules, in order (each pair is 1:1):

1. ``weights``: a module holding parameters maps to the paddle layer that owns the renamed
   parameters, ``WeightMap.target_name(M + ".weight")`` minus ``.weight``
   (``bert.encoder.layer.3.attention.output.LayerNorm`` -> ``bert.encoder.layers.3.norm1``).
2. ``params``: a container (no direct parameters) maps to the paddle container holding
   exactly the renamed set of its parameters; chains of containers with the same set
   (``encoder`` > ``layer`` list) pair outermost first.
3. ``position``: parameterless modules (dropout, activations) of the same kind pair by
   position among the children of two mapped parents, when both have as many of that kind;
   when both sides hold the same types of that kind (GELU and Tanh on each side), each type
   pairs with its own type first, by position among its type (registration order may differ).
4. ``unique``: otherwise a parameterless module pairs when it is the only one of its kind
   under the nearest mapped ancestor on both sides (HF's ``intermediate.intermediate_act_fn``
   <-> PaddleNLP's ``layers.N.activation`` function).
5. ``override``: a user TOML file with ``[[layer]] torch = "..." paddle = "..."`` entries
   (and ``[ignore] torch = [regex...] paddle = [regex...]``) wins over all of the above.

Everything left is listed as unmapped with the reason, never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore

from .errors import UsageError

ACTIVATIONS = {"gelu", "geluactivation", "newgeluactivation", "fastgeluactivation", "quickgeluactivation",
               "gelupytorchtanh", "relu", "relu6", "leakyrelu", "tanh", "sigmoid", "silu", "swish", "mish",
               "hardtanh", "softmax", "elu", "selu"}
LISTS = {"modulelist", "layerlist", "sequential", "moduledict", "layerdict"}


def kind(type_name: str) -> str:
    """Coarse family used to pair parameterless modules: dropout, activation or the type itself."""
    t = type_name.lower()
    if "dropout" in t:
        return "dropout"
    if t.startswith("function:") or t in ACTIVATIONS or t.endswith("activation"):
        return "activation"
    return t


@dataclass
class LayerPair:
    torch: str
    paddle: str
    torch_type: str
    paddle_type: str
    how: str                     # weights | params | position | unique | override

    def to_json(self) -> dict[str, str]:
        return {"torch": self.torch, "paddle": self.paddle, "torch_type": self.torch_type,
                "paddle_type": self.paddle_type, "how": self.how}


@dataclass
class Unmapped:
    side: str
    name: str
    type: str
    reason: str


@dataclass
class LayerMap:
    pairs: list[LayerPair]
    unmapped: list[Unmapped]
    torch_modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    paddle_modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    override: str | None = None

    def __post_init__(self) -> None:
        self.t2p = {p.torch: p for p in self.pairs}
        self.p2t = {p.paddle: p for p in self.pairs}

    def mapped_ancestors(self, torch_name: str) -> list[LayerPair]:
        """Mapped pairs enclosing a torch module, innermost first (the module itself excluded)."""
        out = []
        parts = torch_name.split(".") if torch_name else []
        for i in range(len(parts) - 1, -1, -1):
            anc = ".".join(parts[:i])
            if anc in self.t2p:
                out.append(self.t2p[anc])
        return out

    def unmapped_summary(self) -> list[dict[str, Any]]:
        """Unmapped modules grouped by name pattern (layer indices as *), with counts and reasons."""
        groups: dict[tuple, dict[str, Any]] = {}
        for u in self.unmapped:
            pat = re.sub(r"\.\d+(?=\.|$)", ".*", u.name)
            k = (u.side, pat, u.type, u.reason)
            g = groups.setdefault(k, {"side": u.side, "name": pat, "type": u.type, "reason": u.reason, "count": 0})
            g["count"] += 1
        return list(groups.values())

    def to_json(self) -> dict[str, Any]:
        return {"pairs": [p.to_json() for p in self.pairs], "unmapped": self.unmapped_summary(),
                "override": self.override, "n_pairs": len(self.pairs),
                "n_unmapped": {"torch": sum(1 for u in self.unmapped if u.side == "torch"),
                               "paddle": sum(1 for u in self.unmapped if u.side == "paddle")}}


def _index(tree: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    mods = {m["name"]: dict(m) for m in tree}
    for m in mods.values():
        m["full"] = set()
    for name, m in mods.items():
        for p in m.get("params", []):
            full = f"{name}.{p}" if name else p
            for anc in _ancestors_and_self(name, mods):
                mods[anc]["full"].add(full)
    return mods


def _ancestors_and_self(name: str, mods: dict[str, Any]) -> list[str]:
    parts = name.split(".") if name else []
    return [a for a in (".".join(parts[:i]) for i in range(len(parts), -1, -1)) if a in mods]


def _parent(name: str, mods: dict[str, Any]) -> str | None:
    anc = _ancestors_and_self(name, mods)
    return anc[1] if len(anc) > 1 else None


def load_override(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"layer map file {p}: no such file")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"layer map file {p}: not valid TOML: {exc}") from None
    pairs = []
    for i, e in enumerate(data.get("layer", [])):
        if not isinstance(e, dict) or "torch" not in e or "paddle" not in e:
            raise UsageError(f"layer map file {p}: [[layer]] #{i + 1} needs 'torch' and 'paddle'")
        pairs.append((str(e["torch"]), str(e["paddle"])))
    ign = data.get("ignore", {})
    try:
        ignore = {side: [re.compile(str(x)) for x in ign.get(side, [])] for side in ("torch", "paddle")}
    except re.error as exc:
        raise UsageError(f"layer map file {p}: bad regular expression in [ignore]: {exc}") from None
    return {"pairs": pairs, "ignore": ignore, "origin": str(p)}


def build(torch_tree: list[dict[str, Any]], paddle_tree: list[dict[str, Any]], weight_map: Any,
          override: dict[str, Any] | None = None) -> LayerMap:
    """Pair the two module trees (see the module docstring for the rules)."""
    tm, pm = _index(torch_tree), _index(paddle_tree)
    ign = (override or {}).get("ignore", {"torch": [], "paddle": []})
    t_ignored = {n for n in tm if any(r.search(n) for r in ign.get("torch", []))}
    p_ignored = {n for n in pm if any(r.search(n) for r in ign.get("paddle", []))}
    pairs: dict[str, LayerPair] = {}
    taken: set[str] = set()

    def add(t: str, p: str, how: str) -> None:
        if t in pairs or p in taken or t in t_ignored or p in p_ignored:
            return
        pairs[t] = LayerPair(t, p, tm[t]["type"], pm[p]["type"], how)
        taken.add(p)

    for t, p in (override or {}).get("pairs", []):
        problems = [f"torch module {t!r} does not exist" for _ in [0] if t not in tm] + \
                   [f"paddle layer {p!r} does not exist" for _ in [0] if p not in pm]
        if problems:
            raise UsageError(f"layer map file {override['origin']}: [[layer]] torch={t!r} paddle={p!r}: "
                             + "; ".join(problems))
        add(t, p, "override")

    reasons: dict[str, str] = {}     # torch module -> why it has no pair
    p_reasons: dict[str, str] = {}   # paddle layer -> why (one dict each: the names overlap)

    def mapped_set(t: str) -> frozenset:
        return frozenset(y for x in tm[t]["full"] if not weight_map.ignored_source(x)
                         for y in weight_map.target_names(x))
    p_by_full: dict[frozenset, list[str]] = {}
    for p, m in pm.items():
        if m["full"]:
            p_by_full.setdefault(frozenset(m["full"]), []).append(p)
    # 1. modules holding parameters -> the paddle owner of the renamed parameters; one whose own
    #    parameters land in several paddle layers (torch's packed q/k/v split into q_proj, k_proj,
    #    v_proj) -> the paddle layer holding exactly its renamed parameters, children included
    for t, m in tm.items():
        if not m.get("params"):
            continue
        targets = {x for q in m["params"] if not weight_map.ignored_source(f"{t}.{q}" if t else q)
                   for x in weight_map.target_names(f"{t}.{q}" if t else q)}
        owners = {x.rsplit(".", 1)[0] if "." in x else "" for x in targets}
        if len(owners) == 1 and next(iter(owners)) in pm:
            add(t, next(iter(owners)), "weights")
        elif targets:
            same = [p for p in sorted(p_by_full.get(mapped_set(t), []), key=_depth) if p not in taken]
            if same:
                add(t, same[0], "params")
            else:
                reasons[t] = f"its parameters map to {sorted(owners)}, not one paddle layer"
    # 2. containers: identical renamed parameter sets, chains outermost first
    t_chains: dict[frozenset, list[str]] = {}
    for t, m in tm.items():
        if not m.get("params") and m["full"]:
            t_chains.setdefault(mapped_set(t), []).append(t)
    p_chains: dict[frozenset, list[str]] = {}
    for p, m in pm.items():
        if not m.get("params") and m["full"]:
            p_chains.setdefault(frozenset(m["full"]), []).append(p)
    for key, tl in t_chains.items():
        pl = p_chains.get(key, [])
        tl, pl = sorted(tl, key=_depth), sorted(pl, key=_depth)
        for t, p in zip(tl, pl):
            add(t, p, "params")
        for t in tl[len(pl):]:
            reasons.setdefault(t, "no paddle layer holds exactly its parameters"
                               + (f" ({len(key)} tensors)" if key else ""))
    for key, pl in p_chains.items():
        for p in sorted(pl, key=_depth)[len(t_chains.get(key, [])):]:
            p_reasons.setdefault(p, f"no torch module holds exactly its parameters ({len(key)} tensors)")
    # 3. parameterless children of mapped parents, by position within each kind
    def paramless(mods: dict[str, Any], n: str) -> bool:
        return not mods[n]["full"] and kind(mods[n]["type"]) not in LISTS
    for t, pair in list(pairs.items()):
        tc = [f"{t}.{c}" if t else c for c in tm[t].get("children", [])]
        pc = [f"{pair.paddle}.{c}" if pair.paddle else c for c in pm[pair.paddle].get("children", [])]
        tc = [c for c in tc if c in tm and paramless(tm, c)]
        pc = [c for c in pc if c in pm and paramless(pm, c)]
        for k in {kind(tm[c]["type"]) for c in tc}:
            tk = [c for c in tc if kind(tm[c]["type"]) == k]
            pk = [c for c in pc if kind(pm[c]["type"]) == k]
            if len(tk) != len(pk):
                continue
            t_types, p_types = [tm[c]["type"].lower() for c in tk], [pm[c]["type"].lower() for c in pk]
            if len(set(t_types)) > 1 and sorted(t_types) == sorted(p_types):   # GELU and Tanh on both sides
                for ty in dict.fromkeys(t_types):
                    for a, b in zip([c for c, x in zip(tk, t_types) if x == ty], [c for c, x in zip(pk, p_types) if x == ty]):
                        add(a, b, "position")
            else:
                for a, b in zip(tk, pk):
                    add(a, b, "position")
    # 4. the only one of its kind under the nearest mapped ancestor
    by_paddle = {p.paddle: t for t, p in pairs.items()}

    def owner(mods: dict[str, Any], n: str, mapped: dict[str, Any]) -> str | None:
        for a in _ancestors_and_self(n, mods)[1:]:
            if a in mapped:
                return a
        return None
    groups: dict[tuple, tuple[list[str], list[str]]] = {}
    for t in tm:
        if paramless(tm, t) and t not in pairs and t not in t_ignored:
            o = owner(tm, t, pairs)
            if o is not None:
                groups.setdefault((o, kind(tm[t]["type"])), ([], []))[0].append(t)
    for p in pm:
        if paramless(pm, p) and p not in taken and p not in p_ignored:
            o = owner(pm, p, by_paddle)
            if o is not None:
                groups.setdefault((by_paddle[o], kind(pm[p]["type"])), ([], []))[1].append(p)
    for (o, k), (tl, pl) in groups.items():
        if len(tl) == 1 and len(pl) == 1:
            add(tl[0], pl[0], "unique")
        else:
            where = f"inside the mapped {pairs[o].torch_type} <-> {pairs[o].paddle_type}"
            why = (f"{len(tl)} torch vs {len(pl)} paddle {k} modules {where}; cannot tell which is which"
                   if tl and pl else f"no {k} module on the {'paddle' if tl else 'torch'} side {where}")
            for t in tl:
                reasons.setdefault(t, why)
            for p in pl:
                p_reasons.setdefault(p, why)

    unmapped = []
    for t, m in tm.items():
        if t not in pairs and kind(m["type"]) not in LISTS:
            why = "ignored by the layer map file" if t in t_ignored else \
                reasons.get(t, "no paddle counterpart found")
            unmapped.append(Unmapped("torch", t, m["type"], why))
    for p, m in pm.items():
        if p not in taken and kind(m["type"]) not in LISTS:
            why = "ignored by the layer map file" if p in p_ignored else \
                p_reasons.get(p, "no torch counterpart found")
            unmapped.append(Unmapped("paddle", p, m["type"], why))
    order = {n: i for i, n in enumerate(tm)}
    ordered = sorted(pairs.values(), key=lambda x: order[x.torch])
    return LayerMap(ordered, unmapped, tm, pm, (override or {}).get("origin"))


def _depth(name: str) -> int:
    return name.count(".") + 1 if name else 0
