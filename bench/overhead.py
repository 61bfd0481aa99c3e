"""Coordinator overhead: `coordinator run` forward + backward steps vs the frameworks alone.

Lockstep: ``coordinator run --steps weights,forward,backward`` on MiniLM-L6 (BERT-base is too slow
for this 2-core box); the forward + backward step seconds from summary.json (weights is run
first so the forward step does not include the conversion). Frameworks alone: the baseline
scripts (bench/baseline_scripts/) doing forward + 10 AdamW iterations in each env, no
coordinator, no transport; their in-process compute seconds (after import and model load),
torch + paddle (the workers take turns on this box, so the sum is the fair yardstick).
Note the backward step does more than the plain loop: it returns and compares every gradient
and parameter after every iteration.

    .venv/bin/python bench/overhead.py [--reps 2]
    .venv/bin/python bench/overhead.py --smoke     # forward only (CI)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import VENV_PY, coordinator_run, env_python, stage_json, timed  # noqa: E402


def plain(out: Path, steps: list[str]) -> float:
    tp, pp = env_python("torch"), env_python("paddle")
    timed([tp, "torch_stage.py", "weights", str(out)])
    timed([str(VENV_PY), "convert.py", str(out)])
    t = stage_json(timed([tp, "torch_stage.py", ",".join(steps), str(out)])[1])["stages"]
    p = stage_json(timed([pp, "paddle_stage.py", ",".join(steps), str(out)])[1])["stages"]
    print("  alone: " + ", ".join(f"{side} {s} {d[s]:.2f} s" for side, d in (("torch", t), ("paddle", p))
                                  for s in steps), flush=True)
    return sum(t[s] for s in steps) + sum(p[s] for s in steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="forward only, one rep (CI)")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    steps = ["forward"] if args.smoke else ["forward", "backward"]
    reps = 1 if args.smoke else args.reps
    alone, coord = [], []
    with tempfile.TemporaryDirectory(prefix="lsb-ov-") as d:
        for k in range(reps):
            alone.append(plain(Path(d) / f"p{k}", steps))
            _, per_step = coordinator_run("weights," + ",".join(steps), Path(d) / f"c{k}")
            coord.append(sum(per_step[s] for s in steps))
            print("  coordinator: " + ", ".join(f"{s} {per_step[s]:.2f} s" for s in steps), flush=True)
    print(f"steps: {','.join(steps)} (MiniLM-L6, batch 4 x 64); reps {reps}")
    print(f"{'what':<34} {'min s':>8} {'median s':>9}")
    print(f"{'frameworks alone (torch+paddle)':<34} {min(alone):8.2f} {statistics.median(alone):9.2f}")
    print(f"{'coordinator steps':<34} {min(coord):8.2f} {statistics.median(coord):9.2f}")
    print(f"{'overhead (min vs min)':<34} {min(coord) / min(alone) - 1:8.1%}")


if __name__ == "__main__":
    main()
