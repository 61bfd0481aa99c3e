"""Step hyper-parameters: the migration guide's values are the defaults.

Every value used lands in ``summary.json`` under ``options.params``. Steps read them
with ``rc.param(name)``; the CLI sets them with dedicated flags or ``--param KEY=VALUE``.
"""

from __future__ import annotations

from typing import Any

from .errors import UsageError

DEFAULTS: dict[str, Any] = {
    # data
    "data": None,               # TSV path; None = the shipped demo set
    "batch_size": 4,
    "max_length": 128,
    # optimisation (guide: AdamW lr 3e-5, wd 0.01 except bias/LayerNorm, eps 1e-6; warmup 345 of 1024)
    "lr": 3e-5,
    "warmup": 345,
    "total_steps": 1024,
    "schedules": "linear,cosine,polynomial",
    "weight_decay": 0.01,
    "adam_eps": 1e-6,
    "iters": 10,                # backward iterations
    "epochs": 1,                # train
    "train_lr": 5e-5,
    "acc_threshold": 0.0025,    # train: max |acc_torch - acc_paddle| (guide: 0.25%)
    "perf_steps": 5,
    "perf_warmup": 2,
    "perf_ratio": 0.5,          # perf passes when slower/faster throughput >= this
    "dropout": "off",           # off | shared
    "metric_batches": 4,
    "metric_batch": 64,
}


def coerce(key: str, value: str) -> Any:
    if key not in DEFAULTS:
        raise UsageError(f"unknown parameter {key!r} (known: {', '.join(sorted(DEFAULTS))})")
    default = DEFAULTS[key]
    try:
        if isinstance(default, bool):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise UsageError(f"parameter {key}={value!r}: expected a {type(default).__name__}") from None
    return value


def resolve(overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out
