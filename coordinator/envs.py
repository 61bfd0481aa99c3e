"""Worker environments: one virtualenv per framework, built from ``envs/*.txt``.

Environments live in a cache outside the repository (``$LOCKSTEP_ENV_DIR`` or
``~/.cache/lockstep/envs``), keyed by the hash of the requirement file and the
Python version, so a second ``create`` is instant and two checkouts share them.
Creation happens in a temporary directory renamed into place only when the
framework imports, under a file lock, so a half-built environment is never used.
The project's own packages are not installed there: each worker is started with a
private ``PYTHONPATH`` holding only ``protocol`` and its own worker package.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import EnvironmentProblem, UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
ENVS_SRC = REPO_ROOT / "envs"

# env name -> (worker package, requirement file per env set, import check)
WORKERS = {
    "torch": ("torch_worker", {"cpu": "torch-cpu.txt", "gpu": "torch-cuda.txt"},
              "import torch, transformers, zmq, msgpack; print(torch.__version__)"),
    "paddle": ("paddle_worker", {"cpu": "paddle-cpu.txt", "gpu": "paddle-gpu.txt"},
               "import paddle, paddlenlp, zmq, msgpack; print(paddle.__version__)"),
}

CHECK_SCRIPTS = {
    "torch": "import json, sys, torch, transformers, numpy; print(json.dumps({'python': sys.version.split()[0], "
             "'torch': torch.__version__, 'transformers': transformers.__version__, 'numpy': numpy.__version__, "
             "'devices': ['cpu'] + [f'cuda:{i} ' + torch.cuda.get_device_name(i) "
             "for i in range(torch.cuda.device_count())]}))",
    "paddle": "import json, sys, os, logging; logging.disable(logging.WARNING); import paddle, paddlenlp, numpy; "
              "n = paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0; "
              "print(json.dumps({'python': sys.version.split()[0], 'paddle': paddle.__version__, "
              "'paddlenlp': paddlenlp.__version__, 'numpy': numpy.__version__, "
              "'devices': ['cpu'] + [f'gpu:{i}' for i in range(n)]}))",
}


def cache_root() -> Path:
    return Path(os.environ.get("LOCKSTEP_ENV_DIR") or Path.home() / ".cache" / "lockstep" / "envs")


@dataclass
class EnvSpec:
    name: str           # "torch" | "paddle"
    env_set: str        # "cpu" | "gpu"
    requirements: Path
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def worker_package(self) -> str:
        return WORKERS[self.name][0]

    def ready(self) -> bool:
        return (self.path / "lockstep-env.json").exists() and self.python.exists()

    def fix_command(self) -> str:
        return f"coordinator envs create {self.name}{' --env-set gpu' if self.env_set == 'gpu' else ''}"


def env_spec(name: str, env_set: str = "cpu") -> EnvSpec:
    if name not in WORKERS:
        raise UsageError(f"unknown environment {name!r} (known: {', '.join(WORKERS)})")
    req = ENVS_SRC / WORKERS[name][1][env_set]
    if not req.exists():
        raise EnvironmentProblem(f"requirement file {req} is missing")
    digest = hashlib.sha256(req.read_bytes() + f"py{sys.version_info[0]}.{sys.version_info[1]}".encode())
    return EnvSpec(name, env_set, req, cache_root() / f"{name}-{env_set}-{digest.hexdigest()[:12]}")


def require_ready(spec: EnvSpec) -> None:
    if not spec.ready():
        raise EnvironmentProblem(f"the {spec.name} environment ({spec.env_set}) is not built at {spec.path}; "
                                 f"run: {spec.fix_command()}")


def create(spec: EnvSpec, force: bool = False, progress: Callable[[str], None] = print) -> float:
    """Build the environment if missing; return seconds spent (0 when it already existed)."""
    if spec.ready() and not force:
        return 0.0
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(str(spec.path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent create waits, then finds it ready
        if spec.ready() and not force:
            return 0.0
        tmp = Path(f"{spec.path}.tmp-{os.getpid()}")
        for pattern in (".tmp-*", ".old-*"):   # a build that died, a replaced env not yet removed (we hold the lock)
            for stale in spec.path.parent.glob(f"{spec.path.name}{pattern}"):
                shutil.rmtree(stale, ignore_errors=True)
        old_term = _term_as_interrupt()   # kill/timeout during a build: the cleanup below still runs
        try:
            progress(f"[{spec.name}] creating virtualenv {spec.path.name}")
            _run([sys.executable, "-m", "venv", str(tmp)], spec, progress)
            progress(f"[{spec.name}] installing {spec.requirements.name} (takes a few minutes)")
            _run([str(tmp / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                  "-r", str(spec.requirements)], spec, progress)
            progress(f"[{spec.name}] checking that the framework imports")
            _run([str(tmp / "bin" / "python"), "-c", WORKERS[spec.name][2]], spec, progress)
            _fix_venv_paths(tmp, spec.path, rewrite_only=True)
            (tmp / "lockstep-env.json").write_text(json.dumps({
                "name": spec.name, "env_set": spec.env_set, "requirements": spec.requirements.read_text(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.version.split()[0]}, indent=1))
            # --force: the old env is moved aside, not deleted first, so an interrupt never leaves a
            # half-deleted env that still looks built
            old = Path(f"{spec.path}.old-{os.getpid()}")
            if spec.path.exists():
                spec.path.rename(old)
            tmp.rename(spec.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)   # a failed build leaves no GBs behind
            moved = Path(f"{spec.path}.old-{os.getpid()}")
            if moved.exists() and not spec.path.exists():
                moved.rename(spec.path)              # interrupted between the two renames: the old env stays
            raise
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(old, ignore_errors=True)
    took = time.monotonic() - start
    progress(f"[{spec.name}] ready in {took:.0f}s: {spec.python}")
    return took


def _term_as_interrupt() -> Any:
    """Make SIGTERM raise KeyboardInterrupt for the duration of a build (main thread only);
    returns the previous handler to put back, or None when it could not be set."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum} during the environment build")
    return signal.signal(signal.SIGTERM, interrupt)


def _fix_venv_paths(old: Path, new: Path, rewrite_only: bool = False) -> None:
    """A venv records its own path in scripts and pyvenv.cfg; point them at the final location
    (``rewrite_only``: the files are still under ``old``, the env is about to move to ``new``)."""
    where = old if rewrite_only else new
    for f in list((where / "bin").iterdir()) + [where / "pyvenv.cfg"]:
        if f.is_file() and not f.is_symlink():
            try:
                text = f.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            if str(old) in text:
                f.write_text(text.replace(str(old), str(new)))


def _run(argv: list[str], spec: EnvSpec, progress: Callable[[str], None]) -> None:
    log = Path(str(spec.path) + ".create.log")
    with open(log, "a") as logf:
        logf.write(f"$ {' '.join(argv)}\n")
        logf.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        last = time.monotonic()
        for line in proc.stdout:
            logf.write(line)
            line = line.strip()
            if line.startswith(("Collecting", "Installing", "Successfully", "ERROR")) or time.monotonic() - last > 15:
                progress(f"[{spec.name}]   {line[:110]}")
                last = time.monotonic()
        code = proc.wait()
    if code != 0:
        raise EnvironmentProblem(f"building the {spec.name} environment failed ({' '.join(argv[:4])}... exited "
                                 f"{code}); full log: {log}")


def check(spec: EnvSpec, timeout: float = 180) -> dict:
    """Interpreter, framework versions and devices, as the environment itself reports them."""
    require_ready(spec)
    try:
        out = subprocess.run([str(spec.python), "-c", CHECK_SCRIPTS[spec.name]], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"the {spec.name} environment did not answer within {timeout:.0f}s") from None
    if out.returncode != 0:
        raise EnvironmentProblem(f"the {spec.name} environment at {spec.path} is broken (framework import failed):\n"
                                 f"{out.stderr[-2000:]}\nfix: {spec.fix_command()} --force")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["interpreter"] = str(spec.python)
    return info


def worker_site(run_dir: Path, package: str) -> Path:
    """A directory holding only ``protocol`` and one worker package, for the worker's PYTHONPATH."""
    import importlib.util
    site = run_dir / ".site" / package
    site.mkdir(parents=True, exist_ok=True)
    for pkg in ("protocol", package):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise EnvironmentProblem(f"cannot locate the project's {pkg} package")
        src = Path(list(spec.submodule_search_locations)[0])
        link = site / pkg
        if not link.exists():
            link.symlink_to(src, target_is_directory=True)
    return site


def remove_worker_site(run_dir: Path) -> None:
    """Remove ``<run_dir>/.site`` once its workers are gone: the links themselves, never what they
    point to (the project's packages); anything else found there is left alone."""
    site = Path(run_dir) / ".site"
    if not site.is_dir() or site.is_symlink():
        return
    for pkg_dir in site.iterdir():
        if pkg_dir.is_symlink() or not pkg_dir.is_dir():
            continue
        for link in pkg_dir.iterdir():
            if link.is_symlink():
                link.unlink()
        try:
            pkg_dir.rmdir()
        except OSError:
            pass
    try:
        site.rmdir()
    except OSError:
        pass
