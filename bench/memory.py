"""Peak RSS of the coordinator during `coordinator run --steps layers` (all-layer capture).

The coordinator is started as a child; its peak resident set (VmHWM) is read from
/proc/<pid>/status while it runs (psutil is not needed) and compared with the bytes of one
side's captured activations, which the layers step reports in its summary.

    .venv/bin/python bench/memory.py                 # MiniLM-L6, steps weights,layers
    .venv/bin/python bench/memory.py --smoke         # lr step only: exercises the measuring (CI)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import COORD, ROOT  # noqa: E402


FIELDS = ("VmHWM", "RssAnon", "RssShmem")


def status_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS, all kinds), RssAnon (the process's private memory) and RssShmem (pages of
    the workers' shared-memory rings it has mapped: the workers' memory as much as its own)."""
    got: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in FIELDS:
                got[key] = int(line.split()[1])
    except OSError:
        pass
    return got


def run_measured(steps: str, out: Path, extra: list[str]) -> tuple[dict[str, int], float, dict]:
    """(peak KiB per FIELDS of the coordinator process, wall seconds, summary)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(COORD), "run", "--steps", steps, "--out", str(out), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = dict.fromkeys(FIELDS, 0)
    while proc.poll() is None:
        for k, v in status_kib(proc.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.05)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"coordinator run --steps {steps} exited {proc.returncode} (see {out})")
    return peak, time.perf_counter() - t0, json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="lr step only (CI)")
    ap.add_argument("--schedule", default="auto", choices=["auto", "alternate", "parallel"],
                    help="parallel: workers side by side, paced (--param layers_pace)")
    ap.add_argument("--model", default="minilm", choices=["minilm", "bert-base"],
                    help="bert-base: random BERT-base weights, batch 4 x 128")
    ap.add_argument("--threads", type=int, default=0, help="threads per worker (0: the launcher's choice)")
    ap.add_argument("--pace", type=int, default=None, help="--param layers_pace (parallel schedule; 0 = unpaced)")
    args = ap.parse_args()
    steps = "lr" if args.smoke else "weights,layers"
    extra = ["--schedule", args.schedule, "--threads", str(args.threads)]
    if args.pace is not None:
        extra += ["--param", f"layers_pace={args.pace}"]
    if args.model == "bert-base":
        from overhead import bert_base_checkpoint
        extra += ["--torch-model", "bert", "--paddle-model", "bert", "--model-path", str(bert_base_checkpoint()),
                  "--param", "fake_seq_len=128"]
    with tempfile.TemporaryDirectory(prefix="lsb-mem-") as d:
        peak, wall, summary = run_measured(steps, Path(d) / "run", extra)
    pace = "" if args.pace is None else f", layers_pace {args.pace}"
    print(f"steps: {steps} ({args.model}, schedule {args.schedule}, threads {args.threads or 'auto'}{pace}); "
          f"wall {wall:.1f} s")
    print(f"{'step':<10} {'seconds':>8} message")
    for s in summary["steps"]:
        print(f"{s['name']:<10} {float(s['seconds']):8.2f} {str(s.get('message', ''))[:150]}")
    print(f"{'coordinator peak RSS MiB':<26} {peak['VmHWM'] / 1024:8.1f}")
    print(f"{'  peak private (RssAnon)':<26} {peak['RssAnon'] / 1024:8.1f}")
    print(f"{'  peak ring pages mapped':<26} {peak['RssShmem'] / 1024:8.1f}")
    for step in summary["steps"]:
        for phase, info in _phases(step):
            print(f"{phase + ' one side MiB':<26} {side_bytes(info) / (1 << 20):8.1f} "
                  f"(held peak {info.get('stats', {}).get('held_peak_bytes', 0) / (1 << 20):.1f} MiB, "
                  f"spilled {info.get('stats', {}).get('spilled_bytes', 0) / (1 << 20):.1f} MiB)")


def _phases(step: dict) -> list[tuple[str, dict]]:
    details = step.get("details") or {}
    return [(ph, details[ph]) for ph in ("forward", "backward")
            if isinstance(details.get(ph), dict) and "rows" in details[ph]]


def side_bytes(info: dict) -> int:
    """One side's captured tensor bytes: every compared row's shape, float32."""
    total = 0
    for row in info.get("rows", []):
        n = 4
        for d in row.get("shape") or []:
            n *= int(d)
        total += n if row.get("shape") else 0
    return total


if __name__ == "__main__":
    main()
