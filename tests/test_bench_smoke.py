"""The benchmarks in bench/ still run (--smoke, tiny sizes) and print their columns.

No timing is asserted: the numbers belong in bench/RESULTS.md, not in CI verdicts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def smoke(script: str, *args: str, timeout: float = 220) -> str:
    """``timeout``: under the test's own, so a stuck script fails with its stderr, not pytest's dump."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"bench/{script} --smoke exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.timeout(60)
def test_transport_smoke() -> None:
    out = smoke("transport.py", timeout=50)
    assert "memcpy GB/s" in out and "med GB/s" in out and "ratio best" in out
    assert "4 KiB" in out and "1 MiB" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("4 KiB", "1 MiB"))]
    assert {r[2] for r in rows} >= {"frames", "ring", "ring*"}  # both paths measured


@pytest.mark.frameworks
@pytest.mark.timeout(240)
def test_overhead_smoke() -> None:
    out = smoke("overhead.py")
    assert "frameworks alone (torch+paddle)" in out and "coordinator steps" in out and "overhead" in out


@pytest.mark.frameworks
@pytest.mark.timeout(240)
def test_workflow_smoke() -> None:
    out = smoke("workflow.py")
    assert "separate scripts" in out and "coordinator run" in out and "speedup" in out


@pytest.mark.frameworks
@pytest.mark.timeout(240)
def test_memory_smoke() -> None:
    out = smoke("memory.py")
    assert "coordinator peak RSS MiB" in out and "lr" in out


@pytest.mark.frameworks
@pytest.mark.timeout(240)
def test_layers_overhead_smoke() -> None:
    import json
    out = smoke("layers_overhead.py")
    summary = json.loads(out[out.index("{"):])
    assert summary["live"]["failed_rows"] == [0, 0]       # forward and backward compared, all aligned
    assert summary["live"]["rows_fwd"] > 0 and summary["torch"]["events_fwd"] > 0
    assert "fwd_vs_plain_pct_paired_median" in summary["live"]


@pytest.mark.frameworks
@pytest.mark.timeout(240)
def test_layers_overhead_factory_smoke() -> None:
    """The attention-free stack of bench/models (what runs where paddlenlp cannot be installed),
    with the threading knobs given (smoke tensors are too small to be split: the unit tests in
    test_layers_unit / test_shm cover the split itself)."""
    import json
    out = smoke("layers_overhead.py", "--factory", "--diff-threads", "2", "--copy-threads", "2")
    summary = json.loads(out[out.index("{"):])
    assert summary["config"]["model"].startswith("ffn") and summary["config"]["diff_threads"] == 2
    assert summary["live"]["failed_rows"] == [0, 0] and summary["live"]["rows_fwd"] > 0
    assert "fwd_vs_both_plain_pct_paired_median" in summary["live"]
