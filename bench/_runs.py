"""Helpers shared by the end-to-end benchmarks: framework interpreters, timed subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "bench" / "baseline_scripts"
VENV_PY = ROOT / ".venv" / "bin" / "python"
COORD = ROOT / ".venv" / "bin" / "coordinator"


def env_python(side: str) -> str:
    """The built framework env's interpreter (~/.cache/lockstep/envs/<side>-cpu-*/bin/python)."""
    found = sorted((Path.home() / ".cache" / "lockstep" / "envs").glob(f"{side}-cpu-*/bin/python"))
    if not found:
        raise SystemExit(f"no {side} environment under ~/.cache/lockstep/envs (run `coordinator envs create`)")
    return str(found[-1])


def timed(cmd: list[str], cwd: Path = SCRIPTS, extra_env: dict | None = None) -> tuple[float, str]:
    """Run ``cmd``; return (wall seconds, stdout); raise naming the command on failure."""
    t0 = time.perf_counter()
    threads = str(os.cpu_count() or 1)  # what the coordinator's launcher gives a worker taking turns
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **(extra_env or {}))
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    took = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-2000:]}")
    return took, r.stdout


def stage_json(stdout: str) -> dict:
    """The JSON line a baseline stage script prints last."""
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])


def coordinator_run(steps: str, out: Path, extra: list[str] | None = None) -> tuple[float, dict, dict]:
    """`coordinator run --steps STEPS`: (wall seconds, {step: seconds}, {step: {worker: handler
    seconds}}), the last two from summary.json (the handlers' seconds: the frameworks' own compute)."""
    took, _ = timed([str(COORD), "run", "--steps", steps, "--out", str(out), *(extra or [])], cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    return (took, {s["name"]: float(s["seconds"]) for s in summary["steps"]},
            {s["name"]: s.get("worker_seconds", {}) for s in summary["steps"]})
