"""Inputs shared by the baseline stage scripts (numpy only, imported by both framework scripts)."""

import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # torch_worker / paddle_worker model builders (no transport used)

LR, WD, EPS, WARMUP, TOTAL = 3e-5, 0.01, 1e-6, 345, 1024
# The model and batch shape, from the environment so bench/overhead.py can run the BERT-base shape:
ITERS = int(os.environ.get("LSB_ITERS", "10"))      # backward iterations
SEQ = int(os.environ.get("LSB_SEQ", "64"))          # fake batch: 4 x SEQ token ids
PRESET = os.environ.get("LSB_PRESET", "minilm")     # minilm (real weights) | bert (LSB_MODEL_PATH checkpoint)
MODEL_PATH = os.environ.get("LSB_MODEL_PATH")


def load_body() -> dict:
    body = {"preset": PRESET, "seed": 0, "num_labels": 2}
    if MODEL_PATH:
        body["path"] = MODEL_PATH
    return body


def batch(vocab: int) -> tuple[dict, np.ndarray]:
    """The guide's fake data: a seeded batch of 4 x SEQ token ids and 0/1 labels."""
    rng = np.random.RandomState(1)
    ids = rng.randint(1, vocab, (4, SEQ)).astype(np.int64)
    labels = np.random.RandomState(2).randint(0, 2, (4,)).astype(np.int64)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}, labels


def no_decay(name: str) -> bool:
    """The guide's weight-decay groups: no decay for biases and LayerNorm weights."""
    return name.endswith("bias") or "norm" in name.lower()


def args() -> tuple[list[str], str, int]:
    stages, out = sys.argv[1].split(","), sys.argv[2]
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    os.makedirs(out, exist_ok=True)
    return stages, out, threads


def report(side: str, times: dict, t_import: float, t_load: float, iter_s: list | None = None) -> None:
    """One JSON line the benchmarks read: seconds per stage after the model was loaded
    (and per backward iteration)."""
    print(json.dumps({"side": side, "import_s": t_import, "load_s": t_load, "stages": times,
                      "iter_s": iter_s or []}), flush=True)


now = time.perf_counter
