"""Helpers for tests that need the real torch and paddle environments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def env_python(name: str) -> Path:
    from coordinator import envs
    spec = envs.env_spec(name)
    if not spec.ready():
        # `./lockstep test` builds them before pytest starts; building here would eat a test's timeout.
        pytest.fail(f"the {name} environment is not built: run `coordinator envs create` first "
                    f"(./lockstep test does it)")
    return spec.python


def run_in_env(name: str, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    from coordinator import envs
    py = env_python(name)
    site = envs.worker_site(Path("/tmp") / f"lockstep-test-site-{name}", envs.WORKERS[name][0])
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "GLOG_minloglevel": "2", "PYTHONWARNINGS": "ignore"})


def real_run(args: list[str], out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env_python("torch"), env_python("paddle")
    cmd = [sys.executable, "-m", "coordinator.cli", "run", "--out", str(out), "--no-create", *args]
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSTEP_WORKER_ARGV")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
