"""Today's workflow (separate stage scripts + .npy files + a compare script) vs one coordinator run.

Baseline (bench/baseline_scripts/): for each of the guide's stages (weights conversion, forward,
loss, lr, backward) a torch script and a paddle script, each a fresh process loading its
framework and MiniLM-L6 and writing .npy files; convert.py maps the weights; compare.py diffs.
Lockstep: one ``coordinator run --steps weights,forward,loss,lr,backward``. End-to-end wall
seconds, min and median over ``--reps`` (the machine is shared).

    .venv/bin/python bench/workflow.py [--reps 2]
    .venv/bin/python bench/workflow.py --smoke      # lr stage only (CI)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import VENV_PY, coordinator_run, env_python, timed  # noqa: E402

STAGES = ["weights", "forward", "loss", "lr", "backward"]


def baseline(out: Path, stages: list[str]) -> float:
    tp, pp = env_python("torch"), env_python("paddle")
    total = 0.0
    # Weights first: the paddle scripts need the converted weights (config + npz) in every stage.
    total += timed([tp, "torch_stage.py", "weights", str(out)])[0]
    total += timed([str(VENV_PY), "convert.py", str(out)])[0]
    for stage in stages:
        if stage != "weights":
            total += timed([tp, "torch_stage.py", stage, str(out)])[0]
        total += timed([pp, "paddle_stage.py", stage, str(out)])[0]
    compared = [s for s in stages if s != "weights"]
    if compared:
        total += timed([str(VENV_PY), "compare.py", str(out), ",".join(compared)])[0]
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="lr stage only, one rep (CI)")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    stages = ["lr"] if args.smoke else STAGES
    reps = 1 if args.smoke else args.reps
    base, coord = [], []
    with tempfile.TemporaryDirectory(prefix="lsb-wf-") as d:
        for k in range(reps):
            base.append(baseline(Path(d) / f"b{k}", stages))
            coord.append(coordinator_run(",".join(["weights"] + [s for s in stages if s != "weights"]),
                                         Path(d) / f"c{k}")[0])
    print(f"stages: {','.join(stages)}; reps {reps}")
    print(f"{'workflow':<28} {'min s':>8} {'median s':>9}")
    print(f"{'separate scripts':<28} {min(base):8.1f} {statistics.median(base):9.1f}")
    print(f"{'coordinator run':<28} {min(coord):8.1f} {statistics.median(coord):9.1f}")
    print(f"{'speedup (min)':<28} {min(base) / min(coord):8.2f}x")


if __name__ == "__main__":
    main()
