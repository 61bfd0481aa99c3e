"""Environment management: idempotent create, check, and clear errors for missing/broken envs."""

import os
import time

import pytest

from conftest import coordinator
from coordinator import envs as E
from coordinator.errors import ExitCode


def test_missing_environment_names_env_and_fix(tmp_path):
    env = dict(os.environ, LOCKSTEP_ENV_DIR=str(tmp_path / "empty"))
    env = {k: v for k, v in env.items() if not k.startswith("LOCKSTEP_WORKER_ARGV")}
    proc = coordinator(["run", "--steps", "weights", "--out", str(tmp_path / "r"), "--no-create"], env=env)
    assert proc.returncode == ExitCode.ENVIRONMENT
    assert "torch environment (cpu) is not built" in proc.stdout
    assert "coordinator envs create torch" in proc.stdout


def test_env_key_is_the_requirement_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCKSTEP_ENV_DIR", str(tmp_path))
    a = E.env_spec("torch")
    assert a.path.parent == tmp_path and a.path.name.startswith("torch-cpu-")
    assert E.env_spec("torch").path == a.path          # stable: two checkouts share it
    assert E.env_spec("paddle").path != a.path
    assert E.env_spec("torch", "gpu").path != a.path   # another requirement file, another env


def test_broken_environment_is_reported_with_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCKSTEP_ENV_DIR", str(tmp_path))
    spec = E.env_spec("paddle")
    (spec.path / "bin").mkdir(parents=True)
    (spec.path / "bin" / "python").symlink_to("/bin/false")
    (spec.path / "lockstep-env.json").write_text("{}")
    with pytest.raises(E.EnvironmentProblem, match="(?s)paddle environment .* is broken.*envs create paddle --force"):
        E.check(spec)


@pytest.mark.frameworks
def test_create_is_idempotent_and_check_reports_versions():
    t0 = time.monotonic()
    proc = coordinator(["envs", "create"], timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t1 = time.monotonic()
    again = coordinator(["envs", "create"], timeout=60)
    assert again.returncode == 0 and "already built" in again.stdout
    assert time.monotonic() - t1 < 10, "a second create must not rebuild"
    check = coordinator(["envs", "check"], timeout=180)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "torch: 2.13.0" in check.stdout and "paddle: 3.3.1" in check.stdout
    assert "paddlenlp: 2.8.1" in check.stdout and "devices: ['cpu']" in check.stdout
    del t0


def test_a_run_removes_its_workers_import_links_and_never_their_targets(tmp_path):
    """<run>/.site/<worker>/ holds symlinks to the project's packages while workers run; closing
    the session removes the links and their directories, the packages stay, and a file that is
    not lockstep's keeps .site in place."""
    from conftest import ROOT
    from coordinator.session import Session
    site = E.worker_site(tmp_path, "torch_worker")
    E.worker_site(tmp_path, "paddle_worker")
    assert (site / "protocol").is_symlink() and (site / "torch_worker" / "ops_layers.py").exists()
    Session(tmp_path).close()
    assert not (tmp_path / ".site").exists()
    assert (ROOT / "protocol" / "codec.py").exists() and (ROOT / "torch_worker" / "ops_layers.py").exists()
    E.worker_site(tmp_path, "torch_worker")
    (tmp_path / ".site" / "notes.txt").write_text("mine")
    E.remove_worker_site(tmp_path)
    assert not (tmp_path / ".site" / "torch_worker").exists() and (tmp_path / ".site" / "notes.txt").exists()
