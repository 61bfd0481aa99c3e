import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE = str(ROOT / "tests" / "fake_worker.py")


def fake_env(**faults: str) -> dict[str, str]:
    """Environment that makes `coordinator run` start the numpy fake workers instead of real ones."""
    env = dict(os.environ)
    env["LOCKSTEP_WORKER_ARGV_TORCH"] = json.dumps([sys.executable, FAKE, "torch"])
    env["LOCKSTEP_WORKER_ARGV_PADDLE"] = json.dumps([sys.executable, FAKE, "paddle"])
    for side, f in faults.items():
        env[f"LOCKSTEP_FAKE_FAULT_{side.upper()}"] = f
    return env


def coordinator(args: list[str], env: dict[str, str] | None = None, timeout: float = 120,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI as a subprocess (so signals, exit codes and process cleanup are real)."""
    cmd = [sys.executable, "-m", "coordinator.cli", *args]
    return subprocess.run(cmd, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout,
                          cwd=str(cwd or ROOT))


@pytest.fixture
def fake_run(tmp_path):
    """`fake_run(*args, torch=..., paddle=...)` runs against fakes; returns (proc, out_dir)."""
    def go(*args: str, timeout: float = 120, **faults: str):
        out = tmp_path / "run"
        base = ["run", "--out", str(out), "--mapping", str(ROOT / "tests/data/fake_mlp.toml")]
        proc = coordinator(base + list(args), env=fake_env(**faults), timeout=timeout)
        return proc, out
    return go


def load_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())
