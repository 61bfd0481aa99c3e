"""The model-factory contract: how a user's own model enters a worker.

``--torch-model pkg.mod:build`` / ``--paddle-model pkg.mod:build`` name a function that
each *worker* imports inside its own environment (the coordinator never imports user
code or a framework). The directories given with ``--torch-path`` / ``--paddle-path``
(and the coordinator's working directory) are put on that worker's ``sys.path`` first.

A factory takes no required argument (an optional ``seed: int`` keyword receives the
run's seed; the framework's global seed is also set before the call) and returns either

* the model itself (``torch.nn.Module`` / ``paddle.nn.Layer``), or
* a dict (or any object with these attributes) — see ``FactoryResult``:

  - ``model``      the model (required)
  - ``inputs``     example inputs: ``{name: array}`` (numpy or framework tensors; sent
                   byte-identical to both sides), or a list of ``InputSpec`` dicts that the
                   coordinator turns into seeded random arrays once and sends to both sides.
                   The torch side's inputs win; the paddle side's are used when torch has none.
  - ``loss``       ``loss(outputs, batch) -> scalar tensor``: ``outputs`` is the dict of named
                   outputs described below, ``batch`` the dict of input tensors
  - ``optimizer``  a recipe, plain data, that the backward step builds on *both* sides:
                   ``{"type": "adamw" | "adam" | "sgd", "lr": 1e-3, "weight_decay": 0.01,
                   "eps": 1e-8, "betas": [0.9, 0.999], "momentum": 0.9 (sgd only),
                   "no_decay": ["bias"]}`` (every key optional; without ``no_decay`` every
                   parameter is decayed; ``--param lr/weight_decay/adam_eps`` given on the
                   command line win). The torch side's recipe is used, the paddle side's when
                   torch gives none. A callable ``optimizer(model)`` is accepted but cannot be
                   built identically on both sides: the run says so and uses the guide's AdamW.

The forward op calls ``model(**inputs)`` in eval mode and names the outputs with
``name_outputs``: a tensor -> ``{"output": t}``; a tuple/list -> ``output_0, output_1, ...``;
a dict or ``ModelOutput`` -> its tensor fields (nested tuples get ``_<i>`` suffixes).

This module is framework-free: both workers use it with their own ``is_tensor`` test.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, TypedDict

import numpy as np


class InputSpec(TypedDict, total=False):
    """One generated input. Integers are drawn uniformly from [low, high); floats standard normal."""

    name: str            # keyword the model's forward takes
    shape: list[int]
    dtype: str           # numpy name: float32, int64, ...
    low: int             # integer inputs only (default 0)
    high: int            # integer inputs only, exclusive (default 2)
    fill: float          # a constant instead of random values (e.g. an all-ones attention mask)


class FactoryResult(TypedDict, total=False):
    """What a factory may return instead of the bare model."""

    model: Any                                        # torch.nn.Module / paddle.nn.Layer (required)
    inputs: "dict[str, Any] | list[InputSpec]"
    loss: Callable[[dict[str, Any], dict[str, Any]], Any]
    optimizer: "dict[str, Any] | Callable[[Any], Any]"


Factory = Callable[..., Any]  # () -> model | FactoryResult ; may accept seed: int


@dataclass
class Loaded:
    """A factory's result, normalised."""

    model: Any
    inputs: list[dict[str, Any]] | None = None
    loss: Callable[..., Any] | None = None
    optimizer: Any = None


def is_factory_spec(spec: str) -> bool:
    """``module.path:function`` (presets are plain words such as ``minilm``)."""
    return ":" in spec


class FactorySpecError(ImportError):
    """The ``--*-model`` spec names nothing importable and callable (a typo, a wrong directory):
    the command line's fault, which the coordinator reports as a usage error (exit 2). An import
    error *inside* the user's module (a missing dependency) stays what it is."""


def import_factory(spec: str, sys_path: list[str] | None = None) -> Factory:
    """Import ``module:function`` after putting ``sys_path`` first on ``sys.path``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise FactorySpecError(f"model spec {spec!r}: use module.path:function")
    for d in reversed(sys_path or []):
        if d not in sys.path:
            sys.path.insert(0, d)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise FactorySpecError(f"factory {spec!r}: no module {exc.name!r} on this worker's sys.path "
                                   f"(searched first: {sys_path or []}; pass its directory with "
                                   f"--torch-path/--paddle-path)", name=exc.name) from exc
        raise
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactorySpecError(f"factory {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                                   f"has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactorySpecError(f"factory {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def call_factory(fn: Factory, seed: int) -> Any:
    """Call with ``seed=`` when the factory declares it (or takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn()
    if "seed" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(seed=seed)
    return fn()


def normalize(spec: str, result: Any, is_model: Callable[[Any], bool], model_kind: str,
              to_numpy: Callable[[Any], np.ndarray]) -> Loaded:
    """Check a factory's return value; raise TypeError naming the factory and what it returned."""
    if is_model(result):
        return Loaded(result)
    if isinstance(result, Mapping):
        get = result.get
    elif hasattr(result, "model"):
        def get(name: str, default: Any = None) -> Any:
            return getattr(result, name, default)
    else:
        raise TypeError(f"factory {spec!r} returned a {type(result).__module__}.{type(result).__name__}; expected a "
                        f"{model_kind} or a dict with 'model' (and optional 'inputs', 'loss', 'optimizer')")
    model = get("model")
    if not is_model(model):
        raise TypeError(f"factory {spec!r}: 'model' is a {type(model).__module__}.{type(model).__name__}, "
                        f"not a {model_kind}")
    loss = get("loss")
    if loss is not None and not callable(loss):
        raise TypeError(f"factory {spec!r}: 'loss' must be callable(outputs, batch), got {type(loss).__name__}")
    opt = get("optimizer")
    if opt is not None and not (callable(opt) or isinstance(opt, Mapping)):
        raise TypeError(f"factory {spec!r}: 'optimizer' must be a dict recipe or callable(model), "
                        f"got {type(opt).__name__}")
    return Loaded(model, input_list(spec, get("inputs"), to_numpy), loss, dict(opt) if isinstance(opt, Mapping) else opt)


def input_list(spec: str, inputs: Any, to_numpy: Callable[[Any], np.ndarray]) -> list[dict[str, Any]] | None:
    """Example arrays become ``{"name", "value"}`` entries; specs are checked and passed on."""
    if inputs is None:
        return None
    if isinstance(inputs, Mapping):
        return [{"name": str(k), "value": np.ascontiguousarray(to_numpy(v))} for k, v in inputs.items()]
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"factory {spec!r}: 'inputs' must be a dict name -> array or a list of input specs, "
                        f"got {type(inputs).__name__}")
    out = []
    for i, s in enumerate(inputs):
        if not isinstance(s, Mapping) or "name" not in s or "shape" not in s:
            raise TypeError(f"factory {spec!r}: inputs[{i}] must be a dict with 'name' and 'shape' "
                            f"(and optional dtype, low, high, fill), got {s!r:.120}")
        try:
            dtype = str(np.dtype(s.get("dtype", "float32")))
        except TypeError:
            raise TypeError(f"factory {spec!r}: inputs[{i}] ({s['name']!r}) has unknown dtype {s.get('dtype')!r}") \
                from None
        entry = {"name": str(s["name"]), "shape": [int(d) for d in s["shape"]], "dtype": dtype}
        for k in ("low", "high", "fill"):
            if s.get(k) is not None:
                entry[k] = s[k]
        out.append(entry)
    return out


def name_outputs(out: Any, is_tensor: Callable[[Any], bool], prefix: str = "output") -> dict[str, Any]:
    """Named tensors of a forward's result (see the module docstring)."""
    named: dict[str, Any] = {}

    def walk(name: str, x: Any) -> None:
        if is_tensor(x):
            named[name] = x
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(str(k) if name == prefix and x is out else f"{name}_{k}", v)
        elif isinstance(x, (tuple, list)):
            for i, v in enumerate(x):
                walk(f"{name}_{i}", v)

    walk(prefix, out)
    if not named:
        raise TypeError(f"the model's forward returned {type(out).__name__} with no tensors in it")
    return named


# What a factory model supports (model_info['supports']; the coordinator decides the same from
# the model specs before starting, coordinator.modelspec.unsupported_steps). "data", "train" and
# "perf" need a tokenizer and a text classifier (the BERT presets); metric and lr need no model.
# "loss" and "backward" use the factory's loss, or cross-entropy on a single output.
SUPPORTS = {"weights": True, "forward": True, "layers": True, "loss": True, "backward": True,
            "data": False, "train": False, "perf": False}


def model_info(spec: str, loaded: Loaded, n_params: int) -> dict[str, Any]:
    """The load_model reply for a factory model: plain data only."""
    opt = loaded.optimizer
    if isinstance(opt, Mapping):
        recipe: Any = {str(k): (list(v) if isinstance(v, tuple) else v) for k, v in opt.items()
                       if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    else:
        recipe = "callable" if opt is not None else None
    model = loaded.model
    return {"kind": "factory", "factory": spec, "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "inputs": loaded.inputs, "config": None, "n_params": int(n_params),
            "loss": loaded.loss is not None, "optimizer": recipe,
            "supports": dict(SUPPORTS)}
