"""Inputs shared by the baseline stage scripts (numpy only, imported by both framework scripts)."""

import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # torch_worker / paddle_worker model builders (no transport used)

LR, WD, EPS, WARMUP, TOTAL, ITERS = 3e-5, 0.01, 1e-6, 345, 1024, 10


def batch(vocab: int) -> tuple[dict, np.ndarray]:
    """The guide's fake data: a seeded batch of 4 x 64 token ids and 0/1 labels."""
    rng = np.random.RandomState(1)
    ids = rng.randint(1, vocab, (4, 64)).astype(np.int64)
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


def report(side: str, times: dict, t_import: float, t_load: float) -> None:
    """One JSON line the benchmarks read: seconds per stage after the model was loaded."""
    print(json.dumps({"side": side, "import_s": t_import, "load_s": t_load, "stages": times}), flush=True)


now = time.perf_counter
