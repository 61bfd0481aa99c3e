"""Helpers every step uses: load + convert models once, generate inputs, write reprod_log files."""

from __future__ import annotations

import dataclasses

from typing import Any

import numpy as np

from ..compare import TensorDiff, Tolerance, compare
from .. import modelspec
from ..errors import UsageError
from ..reprodlog import save_npy, write_report
from ..runner import RunContext, StepResult


def model_body(rc: RunContext, side: str) -> dict[str, Any]:
    o = rc.opts
    body: dict[str, Any] = {"preset": o.torch_model if side == "torch" else o.paddle_model, "seed": o.seed,
                            "num_labels": 2}
    if o.model_path:
        body["path"] = o.model_path
    body["inject"] = list(o.paddle_inject if side == "paddle" else o.torch_inject)
    body.update(modelspec.body_extras(o, side))  # factory specs: sys.path dirs (--torch-path/--paddle-path)
    return body


def ensure_loaded(rc: RunContext) -> None:
    """Load the torch model, then build the paddle twin from torch's config."""
    if rc.model_info:
        return
    rc.say("  loading models ...")
    tinfo = _load(rc, "torch", model_body(rc, "torch"))
    pbody = model_body(rc, "paddle")
    pbody["config"] = tinfo.get("config")
    pinfo = _load(rc, "paddle", pbody)
    rc.model_info = {"torch": tinfo, "paddle": pinfo}


def _load(rc: RunContext, side: str, body: dict[str, Any]) -> dict[str, Any]:
    """load_model; an inject name the worker does not know is the command line's fault (exit 2):
    each worker module registers the injects it applies, so only the worker can tell."""
    from ..errors import WorkerFailed
    try:
        return rc.session.request(side, "load_model", body)
    except WorkerFailed as exc:
        msg = str(getattr(exc.remote, "message", ""))
        if exc.remote.etype == "InjectError":   # protocol.shared: a bug this worker cannot apply here
            raise UsageError(f"--{side}-inject: {msg}") from None
        if exc.remote.etype == "FactorySpecError":   # protocol.factory: the spec names nothing to call
            raise UsageError(f"--{side}-model: {msg}") from None
        raise


def ensure_converted(rc: RunContext) -> dict[str, np.ndarray]:
    """Convert torch weights into paddle's layout and push them; returns the converted dict."""
    if "converted" in rc.cache:
        return rc.cache["converted"]
    ensure_loaded(rc)
    rc.weight_map = modelspec.choose_weight_map(rc)  # --mapping, built-in bert, or automatic
    torch_sd = rc.session.request("torch", "get_weights", {})
    worker = rc.session.workers.get("torch")
    if worker is not None and worker.ring is not None:
        # Kept for the whole run, so copied out of torch's shared-memory ring (its pages are for
        # tensors in flight: BERT-base's 418 MiB would otherwise hold 40 % of it until the end).
        torch_sd = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in torch_sd.items()}
    specs = rc.session.request("paddle", "weight_specs", {})
    converted, records = rc.weight_map.convert(torch_sd, {k: (v[0], v[1]) for k, v in specs.items()})
    rc.session.request("paddle", "set_weights", converted)
    rc.conversions = records
    rc.cache["converted"] = converted
    rc.cache["torch_weights"] = torch_sd
    return converted


def gen_inputs(rc: RunContext, seed_offset: int = 0) -> dict[str, np.ndarray]:
    """Inputs generated once from the seed by the coordinator and sent byte-identical to both sides."""
    tinfo = rc.model_info["torch"]
    specs = tinfo.get("inputs") or rc.model_info.get("paddle", {}).get("inputs")
    if not specs and tinfo.get("kind") == "factory":
        raise UsageError(f"factory {tinfo.get('factory')!r} declares no inputs: return {{'model': m, 'inputs': "
                         f"[{{'name': 'x', 'shape': [2, 3], 'dtype': 'float32'}}]}} (docs/own-model.md)")
    rng = np.random.RandomState(rc.opts.seed + seed_offset)
    out = {}
    for spec in specs or default_bert_inputs(tinfo, int(rc.param("fake_seq_len"))):
        shape, dtype = tuple(spec.get("shape", ())), np.dtype(spec.get("dtype", "float32"))
        if spec.get("value") is not None:  # example arrays from a factory: sent as they are
            out[spec["name"]] = np.ascontiguousarray(spec["value"])
        elif spec.get("fill") is not None:
            out[spec["name"]] = np.full(shape, spec["fill"], dtype)
        elif dtype.kind in "iu":
            out[spec["name"]] = rng.randint(spec.get("low", 0), spec.get("high", 2), shape).astype(dtype)
        else:
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return out


def training_labels(rc: RunContext, inputs: dict[str, np.ndarray], seed_offset: int) -> np.ndarray:
    """Labels for a loss: the model's own ``labels`` input when it declares one (a factory's
    inputs: any dtype or shape its loss expects), else seeded class ids below the model's
    ``num_labels`` (2 when the model has no config: a factory without labels gets
    cross-entropy on its single output)."""
    if "labels" in inputs:
        return inputs["labels"]
    n = next(iter(inputs.values())).shape[0]
    config = (rc.model_info.get("torch") or {}).get("config") or {}
    k = int(config.get("num_labels", 2) or 2)
    return np.random.RandomState(rc.opts.seed + seed_offset).randint(0, k, (n,)).astype(np.int64)


def check_seq_len(tinfo: dict, name: str, seq: int) -> None:
    """A sequence length the model has positions for (BERT: max_position_embeddings, 512): longer
    would fail deep inside both frameworks; refused as the command line's fault (exit 2)."""
    limit = int((tinfo.get("config") or {}).get("max_position_embeddings", 512))
    if not 1 <= seq <= limit:
        raise UsageError(f"--param {name}={seq}: must be 1..{limit} (the model's max_position_embeddings)")


def default_bert_inputs(tinfo: dict, seq: int = 64) -> list[dict]:
    """The guide's fake batch for BERT-like presets: 4 x ``seq`` (``--param fake_seq_len``)."""
    config = tinfo.get("config") or {}
    vocab = int(config.get("vocab_size", 30522))
    check_seq_len(tinfo, "fake_seq_len", seq)
    return [{"name": "input_ids", "shape": [4, seq], "dtype": "int64", "low": 1, "high": vocab},
            {"name": "token_type_ids", "shape": [4, seq], "dtype": "int64", "fill": 0},
            {"name": "attention_mask", "shape": [4, seq], "dtype": "int64", "fill": 1}]


def diff_dicts(torch_d: dict[str, Any], paddle_d: dict[str, Any], tol: Tolerance) -> list[TensorDiff]:
    diffs = []
    for key in torch_d:
        if key not in paddle_d:
            diffs.append(TensorDiff(key, False, reason=f"{key!r} missing on the paddle side"))
        else:
            diffs.append(compare(key, torch_d[key], paddle_d[key], tol))
    for key in paddle_d:
        if key not in torch_d:
            diffs.append(TensorDiff(key, False, reason=f"{key!r} missing on the torch side"))
    return diffs


def finish(rc: RunContext, step: str, torch_d: dict[str, Any], paddle_d: dict[str, Any],
           diffs: list[TensorDiff], tol: Tolerance, details: dict[str, Any] | None = None,
           extra_fail: str = "", npy: bool = True) -> StepResult:
    """Write <step>_torch.npy, <step>_paddle.npy (``npy``), <step>_diff.log and build the result.

    ``<step>_diff.log`` holds the diffs of the keys in the ``.npy`` files, so that reprod_log run
    on those files writes the same report; checks on data not in them (the backward step's
    gradients and parameters) go to ``<step>_tensors_diff.log`` in the same format. The verdict
    is on all of them."""
    if npy:
        save_npy(rc.out / f"{step}_torch.npy", torch_d)
        save_npy(rc.out / f"{step}_paddle.npy", paddle_d)
    order = {k: i for i, k in enumerate(list(torch_d) + [k for k in paddle_d if k not in torch_d])}
    in_npy = sorted((d for d in diffs if d.name in order), key=lambda d: order[d.name])  # reprod_log's order
    write_report(rc.out / f"{step}_diff.log", in_npy, tol.method, tol.threshold)
    others = [d for d in diffs if d.name not in torch_d and d.name not in paddle_d]
    if others:   # a per-iteration summary line names its parameter (the first failing, else the worst)
        named = [dataclasses.replace(d, name=f"{d.name} [{d.extra['param']}]") if d.extra.get("param") else d
                 for d in others]
        write_report(rc.out / f"{step}_tensors_diff.log", named, tol.method, tol.threshold)
    passed = all(d.passed for d in diffs) and not extra_fail
    finite = [d.value for d in diffs if d.value == d.value]
    worst = max(finite) if finite else None
    failing = [d for d in diffs if not d.passed]
    msg = extra_fail or (f"{len(failing)}/{len(diffs)} tensors exceed {tol.describe()}; first: "
                         f"{failing[0].name}: {failing[0].reason}" if failing else f"{len(diffs)} tensors within {tol.describe()}")
    return StepResult(step, passed, worst, tol.describe(), msg, diffs, details or {})
