"""Baseline comparison script: diff the .npy files the stage scripts wrote (like reprod_log's check)."""
import os
import sys

import numpy as np

out = sys.argv[1]
stages = sys.argv[2].split(",") if len(sys.argv) > 2 else ["forward", "loss", "lr", "backward"]
ok = True
for stage in stages:
    t = np.load(os.path.join(out, f"torch_{stage}.npy"))
    p = np.load(os.path.join(out, f"paddle_{stage}.npy"))
    diff = float(np.max(np.abs(t.astype(np.float64) - p.astype(np.float64)))) if t.shape == p.shape else float("inf")
    passed = diff <= 1e-5
    ok &= passed
    print(f"{stage}: max abs diff {diff:.3g} {'passed' if passed else 'FAILED'}")
sys.exit(0 if ok else 1)
