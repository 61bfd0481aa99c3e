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
    "lr_cosine": "matched",     # paddle cosine call: matched (= HF's curve) | guide (the guide's, a full wave)
    "weight_decay": 0.01,
    "adam_eps": 1e-6,
    "iters": 10,                # backward iterations
    "fake_seq_len": 64,         # forward/loss/backward/layers on BERT presets: the fake batch is 4 x this
    "backward_tensors": "ends",  # backward: iterations whose gradients + parameters are compared:
                                 # ends (first and last) | all | a list like 0,3,9 (loss and lr: every one)
    "epochs": 1,                # train
    "train_lr": 5e-5,
    "train_max_steps": 0,       # train: stop each side after this many steps (0 = all epochs; for quick checks)
    "train_log_every": 10,      # train: print the running loss every N steps
    "dev_data": None,           # train: TSV to evaluate on (default: demo dev, or --data itself)
    "acc_threshold": 0.0025,    # train: max |acc_torch - acc_paddle| (guide: 0.25%)
    "perf_steps": 5,
    "perf_warmup": 2,
    "perf_seq_len": 32,         # timed batch length: the demo's sentences (7-13 words) pad to ~16-32 tokens
    "perf_ratio": 0.5,          # perf passes when paddle's throughput / torch's >= this
    "dropout": "off",           # off | shared (| native: each side's own RNG, a negative control)
    "metric_batches": 4,
    "metric_batch": 64,
    "weights_npy": True,        # weights: write weights_torch/paddle.npy (reprod_log's files: twice the model's
                                # size, 180 MB for MiniLM); false: the diff log and model_state.pdparams only
    "layers_backward": True,    # layers: also one backward pass (activation + parameter gradients)
    "layers_isolate": "first",  # layers: replay the first divergence (first) or every divergent row after it
                                # too, reporting each layer that is wrong by itself (all: a second bug)
    "layer_map": None,          # layers: TOML overriding the automatic layer pairing ([[layer]] torch/paddle)
    "layers_hold_mib": 1024.0,  # layers: torch tensors held waiting for paddle's; beyond this, spilled to disk
                                # (1024: BERT-base's backward, 717 MiB, stays in the worker's ring)
    "layers_diff_threads": 0,   # layers: threads comparing one large tensor on the coordinator (0: auto,
                                # 1 on hosts of up to 4 cores, where the frameworks need every core)
    "layers_pace": 8,           # layers, parallel schedule: a worker streams at most this many tensors ahead
                                # of the other (0: unpaced); in turns (small CPU boxes) it does not apply
}


# Counts and sizes a step cannot do without: 0 would make it compare nothing and still pass.
MINIMUM: dict[str, float] = {
    "batch_size": 1, "max_length": 2, "total_steps": 1, "iters": 1, "fake_seq_len": 1, "epochs": 1,
    "train_log_every": 1, "perf_steps": 1, "perf_seq_len": 2, "metric_batches": 1, "metric_batch": 1,
}
POSITIVE = ("lr", "train_lr")   # a learning rate of 0 trains nothing: every update would trivially agree
CHOICES: dict[str, tuple[str, ...]] = {"dropout": ("off", "shared", "native"), "lr_cosine": ("matched", "guide"),
                                       "layers_isolate": ("first", "all")}
SCHEDULES = ("linear", "cosine", "polynomial")


def check(key: str, value: Any) -> Any:
    """A parameter's value in its usable range, whether it came from ``--param`` or its own flag
    (``--lr``, ``--iters``, ...); UsageError naming it otherwise (before any worker starts)."""
    if value is None:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value >= 0 or value == float("inf"):   # NaN fails >= as well
            raise UsageError(f"parameter {key}={value!r}: expected a finite number >= 0")
        if key in MINIMUM and value < MINIMUM[key]:
            raise UsageError(f"parameter {key}={value!r}: must be at least {MINIMUM[key]:g} (with less the step "
                             f"would compare nothing)")
        if key in POSITIVE and value <= 0:
            raise UsageError(f"parameter {key}={value!r}: must be > 0 (a zero learning rate trains nothing)")
    if key in CHOICES and value not in CHOICES[key]:
        raise UsageError(f"parameter {key}={value!r}: expected one of {', '.join(CHOICES[key])}")
    if key == "schedules":
        names = [s.strip() for s in str(value).split(",") if s.strip()]
        bad = [s for s in names if s not in SCHEDULES]
        if bad or not names:
            raise UsageError(f"parameter schedules={value!r}: a comma list of {', '.join(SCHEDULES)}")
    if key == "backward_tensors" and value not in ("ends", "all"):
        parts = [p.strip() for p in str(value).split(",")]
        if not all(p.isdigit() for p in parts):
            raise UsageError(f"parameter backward_tensors={value!r}: ends, all, or iteration numbers like 0,3,9")
    return value


def coerce(key: str, value: str) -> Any:
    if key not in DEFAULTS:
        raise UsageError(f"unknown parameter {key!r} (known: {', '.join(sorted(DEFAULTS))})")
    default = DEFAULTS[key]
    try:
        if isinstance(default, bool):   # a typo must not silently switch a check off
            word = value.strip().lower()
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off"):
                return False
            raise UsageError(f"parameter {key}={value!r}: expected true or false (also 1/0, yes/no, on/off)")
        if isinstance(default, (int, float)):
            number = int(value) if isinstance(default, int) else float(value)
            if not number >= 0 or number == float("inf"):   # every numeric parameter is a size, count or rate
                raise UsageError(f"parameter {key}={value!r}: expected a finite number >= 0")
            return check(key, number)
    except ValueError:
        kind = {"int": "an integer", "float": "a number"}.get(type(default).__name__, type(default).__name__)
        raise UsageError(f"parameter {key}={value!r}: expected {kind}") from None
    return check(key, value)


def resolve(overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out
