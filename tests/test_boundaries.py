"""Import boundaries: protocol and coordinator import no framework; each worker imports only its own."""

import glob
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("torch", "paddle", "transformers", "paddlenlp")


def test_coordinator_and_protocol_import_no_framework():
    mods = ["protocol", "protocol.codec", "protocol.worker", "protocol.adapter", "coordinator.cli",
            "coordinator.runner", "coordinator.session", "coordinator.steps", "coordinator.envs",
            "coordinator.mapping", "coordinator.compare", "coordinator.safe_npy"]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def _imports(pkg: str) -> set[str]:
    found = set()
    for path in glob.glob(str(ROOT / pkg / "**" / "*.py"), recursive=True):
        for line in Path(path).read_text().splitlines():
            m = re.match(r"\s*(?:from|import)\s+([a-zA-Z_][\w]*)", line)
            if m:
                found.add(m.group(1))
    return found


@pytest.mark.parametrize("pkg,forbidden", [
    ("protocol", {"torch", "paddle", "transformers", "paddlenlp", "coordinator", "pickle"}),
    ("coordinator", {"torch", "paddle", "transformers", "paddlenlp", "torch_worker", "paddle_worker"}),
    ("torch_worker", {"paddle", "paddlenlp", "paddle_worker", "coordinator"}),
    ("paddle_worker", {"torch", "transformers", "torch_worker", "coordinator"}),
])
def test_static_import_boundaries(pkg, forbidden):
    assert not (_imports(pkg) & forbidden), _imports(pkg) & forbidden


def test_negative_control_the_boundary_checker_sees_imports(tmp_path):
    """The static checker must notice a forbidden import (else the test above proves nothing)."""
    assert "torch" in _imports("torch_worker") and "paddle" in _imports("paddle_worker")
