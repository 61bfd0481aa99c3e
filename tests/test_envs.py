"""Environment management: idempotent create, check, and clear errors for missing/broken envs."""

import os
import time
from pathlib import Path

import pytest

from conftest import coordinator
from coordinator import envs as E
from coordinator.errors import ExitCode


def test_missing_environment_names_env_and_fix(tmp_path):
    env = dict(os.environ, LOCKSTEP_ENV_DIR=str(tmp_path / "empty"))
    env = {k: v for k, v in env.items() if not k.startswith("LOCKSTEP_WORKER_ARGV")}
    proc = coordinator(["run", "--steps", "weights", "--out", str(tmp_path / "r"), "--no-create"], env=env)
    assert proc.returncode == ExitCode.ENVIRONMENT
    text = " ".join(proc.stdout.split())
    assert "the torch and paddle environments are not built" in text   # both named at once
    assert "coordinator envs create torch; coordinator envs create paddle" in text


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
@pytest.mark.timeout(1300)   # above the build's own 1200 s, so a slow first build fails by its own message
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


def _fake_build(monkeypatch, tmp_path, fail_in_pip=None):
    """E.create with _run replaced: 'venv' makes bin/python, 'pip' may fail, the import check passes."""
    monkeypatch.setenv("LOCKSTEP_ENV_DIR", str(tmp_path))

    def run(argv, spec, progress):
        if argv[1:3] == ["-m", "venv"]:
            (Path(argv[3]) / "bin").mkdir(parents=True)
            (Path(argv[3]) / "bin" / "python").write_text(f"#!/bin/sh\n# built in {argv[3]}\n")
            (Path(argv[3]) / "pyvenv.cfg").write_text(f"command = python -m venv {argv[3]}\n")
        elif "pip" in argv and fail_in_pip is not None:
            fail_in_pip()
    monkeypatch.setattr(E, "_run", run)
    return E.env_spec("torch")


def test_a_build_stopped_by_sigterm_leaves_no_half_built_directory(tmp_path, monkeypatch):
    """kill/timeout during `envs create` (SIGTERM) cleans up like Ctrl-C: no .tmp-* of GBs left;
    the control: a build that is not interrupted is ready, its scripts point at the final path."""
    import signal
    spec = _fake_build(monkeypatch, tmp_path, fail_in_pip=lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        E.create(spec, progress=lambda s: None)
    assert not list(tmp_path.glob("*.tmp-*")) and not spec.ready()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is put back
    spec = _fake_build(monkeypatch, tmp_path)
    E.create(spec, progress=lambda s: None)
    assert spec.ready() and f"built in {spec.path}\n" in (spec.path / "bin" / "python").read_text()


def test_force_rebuild_interrupted_keeps_the_old_environment_whole(tmp_path, monkeypatch):
    """--force used to delete the old env before the new one was in place: an interrupt could
    leave a half-deleted env that still looked built. The old one now stays until the swap."""
    spec = _fake_build(monkeypatch, tmp_path)
    E.create(spec, progress=lambda s: None)
    (spec.path / "marker").write_text("old")

    def boom():
        raise KeyboardInterrupt
    spec = _fake_build(monkeypatch, tmp_path, fail_in_pip=boom)
    with pytest.raises(KeyboardInterrupt):
        E.create(spec, force=True, progress=lambda s: None)
    assert spec.ready() and (spec.path / "marker").read_text() == "old"
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old-*"))
    spec = _fake_build(monkeypatch, tmp_path)
    E.create(spec, force=True, progress=lambda s: None)          # the control: a completed --force replaces it
    assert spec.ready() and not (spec.path / "marker").exists() and not list(tmp_path.glob("*.old-*"))
