"""Coordinator overhead: `coordinator run` forward + backward steps vs the frameworks alone.

Lockstep: ``coordinator run --steps weights,forward,backward``; the forward + backward step
seconds from summary.json (weights runs first so the forward step does not include the
conversion). Frameworks alone: the baseline scripts (bench/baseline_scripts/) doing the same
forward and the same AdamW iterations in each env, no coordinator, no transport; their
in-process compute seconds (after import and model load), torch + paddle (the workers take
turns on a small box, so the sum is the fair yardstick; with ``--schedule parallel`` the
coordinator may even beat it). The scripts run twice: as a user runs them (glibc defaults) and
with the malloc settings the launcher gives workers (coordinator/placement.py MALLOC_ENV), so
the second ratio is what the coordinator itself adds.

Default shape: BERT-base (12 layers, hidden 768, random weights: a checkpoint made once in
the temp dir), batch 4 x 128, 3 iterations. The backward step compares the loss and lr at
every iteration and every gradient and parameter at the first and last (``--param
backward_tensors``, default ``ends``); ``--tensors all`` measures shipping them every time.

    .venv/bin/python bench/overhead.py [--reps 2] [--model minilm] [--seq 64] [--iters 10]
    .venv/bin/python bench/overhead.py --smoke     # MiniLM, forward only (CI)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import VENV_PY, coordinator_run, env_python, stage_json, timed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from coordinator.placement import malloc_env  # noqa: E402


def plain(out: Path, steps: list[str], extra_env: dict | None = None, label: str = "alone") -> float:
    tp, pp = env_python("torch"), env_python("paddle")
    timed([tp, "torch_stage.py", "weights", str(out)])
    timed([str(VENV_PY), "convert.py", str(out)])
    t = stage_json(timed([tp, "torch_stage.py", ",".join(steps), str(out)], extra_env=extra_env)[1])
    p = stage_json(timed([pp, "paddle_stage.py", ",".join(steps), str(out)], extra_env=extra_env)[1])
    print(f"  {label}: " + ", ".join(f"{side} {s} {d['stages'][s]:.2f} s" for side, d in (("torch", t), ("paddle", p))
                                  for s in steps), flush=True)
    for side, d in (("torch", t), ("paddle", p)):
        if d["iter_s"]:
            print(f"  {label} {side} iterations: " + " ".join(f"{x:.2f}" for x in d["iter_s"]), flush=True)
    return sum(t["stages"][s] for s in steps) + sum(p["stages"][s] for s in steps)


def worker_iterations(run_dir: Path) -> None:
    """With LOCKSTEP_PROFILE=1: each worker's train_step handler/encode seconds from its log."""
    for side in ("torch", "paddle"):
        log = run_dir / f"{side}_worker.log"
        hits = re.findall(r"op train_step: handler ([0-9.]+) s.*?encode ([0-9.]+) s", log.read_text()) \
            if log.exists() else []
        if hits:
            print(f"  coordinator {side} iterations (handler+encode): "
                  + " ".join(f"{float(h):.2f}+{float(e):.2f}" for h, e in hits), flush=True)


def bert_base_checkpoint() -> Path:
    from layers_overhead import make_checkpoint
    ckpt = Path(tempfile.gettempdir()) / "lockstep-bert-base-random-12"
    make_checkpoint(ckpt, 12)
    return ckpt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="MiniLM, forward only, one rep (CI)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--model", choices=["bert-base", "minilm"], default="bert-base")
    ap.add_argument("--seq", type=int, default=None, help="fake batch 4 x SEQ (default 128; minilm 64)")
    ap.add_argument("--iters", type=int, default=3, help="AdamW iterations")
    ap.add_argument("--tensors", default="ends", help="--param backward_tensors for the coordinator")
    ap.add_argument("--schedule", default="auto", choices=["auto", "alternate", "parallel"])
    args = ap.parse_args()
    model = "minilm" if args.smoke else args.model
    seq = args.seq or (64 if model == "minilm" else 128)
    steps = ["forward"] if args.smoke else ["forward", "backward"]
    reps = 1 if args.smoke else args.reps
    env = {"LSB_SEQ": str(seq), "LSB_ITERS": str(args.iters), "LSB_PRESET": "minilm"}
    extra = ["--iters", str(args.iters), "--param", f"fake_seq_len={seq}", "--param",
             f"backward_tensors={args.tensors}", "--schedule", args.schedule]
    if model == "bert-base":
        ckpt = bert_base_checkpoint()
        env.update(LSB_PRESET="bert", LSB_MODEL_PATH=str(ckpt))
        extra += ["--torch-model", "bert", "--paddle-model", "bert", "--model-path", str(ckpt)]
    os.environ.update(env)  # the baseline scripts read the shape from here
    alone, tuned, coord, inside = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="lsb-ov-") as d:
        def run_alone(k: int) -> None:
            alone.append(plain(Path(d) / f"p{k}", steps))

        def run_tuned(k: int) -> None:  # the same scripts with the settings lockstep gives its workers
            tuned.append(plain(Path(d) / f"m{k}", steps, malloc_env(), "alone+malloc"))

        def run_coordinator(k: int) -> None:
            _, per_step, ws = coordinator_run("weights," + ",".join(steps), Path(d) / f"c{k}", extra)
            coord.append(sum(per_step[s] for s in steps))
            inside.append(sum(sum(ws[s].values()) for s in steps))
            print("  coordinator: " + ", ".join(f"{s} {per_step[s]:.2f} s (workers' handlers: " +
                                                 " + ".join(f"{w} {v:.2f}" for w, v in ws[s].items()) + ")"
                                                 for s in steps), flush=True)
            worker_iterations(Path(d) / f"c{k}")

        order = [run_alone, run_coordinator] + ([] if args.smoke else [run_tuned])
        for k in range(reps):  # rotated each rep: the machine's speed drifts over minutes
            for run in order[k % len(order):] + order[:k % len(order)]:
                run(k)
    print(f"steps: {','.join(steps)} ({model}, batch 4 x {seq}, {args.iters} iterations, tensors {args.tensors}, "
          f"schedule {args.schedule}); reps {reps}")
    print(f"{'what':<34} {'min s':>8} {'median s':>9}")
    print(f"{'frameworks alone (torch+paddle)':<34} {min(alone):8.2f} {statistics.median(alone):9.2f}")
    print(f"{'coordinator steps':<34} {min(coord):8.2f} {statistics.median(coord):9.2f}")
    print(f"{'overhead (min vs min)':<34} {min(coord) / min(alone) - 1:8.1%}")
    print(f"{'overhead (median vs median)':<34} {statistics.median(coord) / statistics.median(alone) - 1:8.1%}")
    print(f"{'same run: workers handlers':<34} {min(inside):8.2f} {statistics.median(inside):9.2f}")
    added = [c / i - 1 for c, i in zip(coord, inside)]
    print(f"{'added by the coordinator, same run':<34} {min(added):8.1%} {statistics.median(added):9.1%}")
    if tuned:
        print(f"{'alone, workers malloc settings':<34} {min(tuned):8.2f} {statistics.median(tuned):9.2f}")
        print(f"{'overhead vs those (min vs min)':<34} {min(coord) / min(tuned) - 1:8.1%}")
        print(f"{'overhead vs those (median)':<34} {statistics.median(coord) / statistics.median(tuned) - 1:8.1%}")


if __name__ == "__main__":
    main()
