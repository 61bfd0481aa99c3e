"""Baseline weights conversion (the guide's torch2paddle script): torch npz -> paddle npz.

    python convert.py OUTDIR        (coordinator venv: numpy only, the project's bert mapping)
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from coordinator.mapping import WeightMap  # noqa: E402

out = sys.argv[1]
with np.load(os.path.join(out, "torch_weights.npz")) as z:
    source = {k: z[k] for k in z.files}
converted = WeightMap.load("bert").convert_tensors(source)
np.savez(os.path.join(out, "paddle_weights.npz"), **converted)
print(f"converted {len(source)} torch tensors into {len(converted)} paddle tensors")
