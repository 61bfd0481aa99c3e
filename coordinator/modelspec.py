"""Which models a run compares, and how their weights are mapped (framework-free).

A model spec is a preset word (``minilm``, ``bert``) or a factory ``module.path:function``
that the *worker* imports in its own environment (``protocol/factory.py`` has the
contract). The coordinator only sends the spec and the directories to search first.

Weight mapping: ``--mapping`` wins; two presets use the built-in BERT mapping; anything
else is mapped automatically (``coordinator/automap.py``) and the mapping found is
written to ``<run>/automap.toml`` so the user can keep and edit it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .mapping import MappingError, WeightMap

PRESETS = ("minilm", "bert")


def is_factory(spec: str) -> bool:
    return ":" in spec


def check_specs(torch_model: str, paddle_model: str, model_path: str | None) -> None:
    """Refuse a model spec that cannot work before any worker starts (exit 2, naming it)."""
    import re

    from .errors import UsageError
    for side, spec in (("torch", torch_model), ("paddle", paddle_model)):
        if is_factory(spec):
            module, _, func = spec.partition(":")
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module) or not re.fullmatch(r"[A-Za-z_]\w*", func):
                raise UsageError(f"--{side}-model {spec!r}: a factory is module.path:function "
                                 f"(e.g. mymodel.torch_side:build)")
        elif spec not in PRESETS:
            raise UsageError(f"--{side}-model {spec!r}: not a preset ({', '.join(PRESETS)}) nor a factory "
                             f"module.path:function")
    if "bert" in (torch_model, paddle_model):
        if not model_path:
            raise UsageError("the 'bert' preset needs --model-path DIR (an HF BERT checkpoint directory)")
        if not Path(model_path).is_dir():
            raise UsageError(f"--model-path {model_path}: not a directory")


# Steps that need one of the BERT presets (a tokenizer, a text classifier), and why.
PRESET_ONLY = {
    "data": "tokenizes the demo sentences with the model's tokenizer and checks the collators",
    "train": "fine-tunes a text classifier on the demo data",
    "perf": "times training steps on token-id batches",
}


def unsupported_steps(opts: Any, steps: list[str]) -> dict[str, str]:
    """Steps of ``steps`` this run's models cannot do, each with the reason (empty for presets).

    Known from the specs alone, so a run refuses (or, for ``--steps all``, skips) them before
    any worker starts."""
    factories = [s for s in (opts.torch_model, opts.paddle_model) if is_factory(s)]
    if not factories:
        return {}
    return {s: f"it {PRESET_ONLY[s]}: BERT presets (minilm, bert) only, and this run's model is the "
               f"factory {factories[0]!r}" for s in steps if s in PRESET_ONLY}


def sys_path(opts: Any, side: str) -> list[str]:
    """Directories the worker puts first on sys.path before importing a factory: --<side>-path, then cwd."""
    dirs = list(getattr(opts, f"{side}_path", None) or [])
    return [os.path.abspath(d) for d in dirs] + [os.getcwd()]


def body_extras(opts: Any, side: str) -> dict[str, Any]:
    """What load_model needs beyond the preset body for a factory spec."""
    spec = opts.torch_model if side == "torch" else opts.paddle_model
    return {"sys_path": sys_path(opts, side)} if is_factory(spec) else {}


def uses_automap(opts: Any, tinfo: dict) -> bool:
    return not opts.mapping and not tinfo.get("default_mapping") and \
        (opts.torch_model not in PRESETS or opts.paddle_model not in PRESETS)


def probe_inputs(rc: Any) -> dict[str, Any] | None:
    """Seeded inputs for the call-order probe, or None when the models declare none."""
    from .errors import LockstepError
    from .steps.common import gen_inputs
    try:
        return gen_inputs(rc)
    except LockstepError:  # no usable inputs: fall back to registration order
        return None


def automatic_map(rc: Any, inputs: dict[str, Any] | None = None):
    """Ask both workers for their parameter lists (and call order), pair them."""
    from .automap import automap, params_from_reply
    body = {"inputs": inputs} if inputs else {}
    t, p = rc.both("param_info", body)
    tparams, tcalls = params_from_reply(t)
    pparams, pcalls = params_from_reply(p)
    return automap(tparams, pparams, tcalls, pcalls)


def choose_weight_map(rc: Any) -> WeightMap:
    """The mapping this run uses; an incomplete automatic mapping stops the run naming every module."""
    tinfo = rc.model_info["torch"]
    if not uses_automap(rc.opts, tinfo):
        return WeightMap.load(rc.opts.mapping or tinfo.get("default_mapping") or "bert")
    rc.say("  no --mapping: pairing parameters automatically (structure, call order, shapes)")
    found = automatic_map(rc, probe_inputs(rc))
    path = Path(rc.out) / "automap.toml"
    path.write_text(found.to_toml(f"automatic mapping for torch {rc.opts.torch_model} -> paddle "
                                  f"{rc.opts.paddle_model}"))
    rc.cache["automap"] = {"pairs": len(found.pairs), "order": found.order, "file": str(path),
                           "notes": {p.torch.name: p.note for p in found.pairs if p.note},
                           "order_notes": list(found.order_notes)}
    if not found.complete:
        raise MappingError(found.problems(), "automatic",
                           footer=f"(the partial mapping is in {path}: complete it and pass --mapping {path})")
    rc.say(f"  automatic mapping: {len(found.pairs)} tensors paired by {found.order} order -> {path.name}")
    for note in found.order_notes:
        rc.say(f"  note: {note} (if the port computes them in another order, pair them in [keys])")
    return found.to_weight_map(f"automatic ({path})")
