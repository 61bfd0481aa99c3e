"""``coordinator worker torch|paddle --connect tcp://HOST:PORT``: a worker for a coordinator elsewhere.

Run on the host that has the framework (and the GPU); the coordinator was started
with ``coordinator run --listen tcp://ADDR:PORT --curve-keys server.key``. The worker
runs from its managed environment exactly as a local launch does (the env's own
interpreter, ``python -m torch_worker``, a private PYTHONPATH holding only
``protocol`` and the worker package), as a child of this command: if this command
dies, the worker notices (``--parent-pid``) and exits. Keys go to the child on its
stdin, never on a command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

DEVICE_PREFIX = {"torch": "cuda", "paddle": "gpu"}


@click.command("worker")
@click.argument("framework", type=click.Choice(["torch", "paddle"]))
@click.option("--connect", required=True, metavar="tcp://HOST:PORT", help="the coordinator's --listen address")
@click.option("--curve-keys", default=None, metavar="FILE|-",
              help="this worker's key file from `coordinator keys` (0600), or '-' for stdin")
@click.option("--insecure", is_flag=True, help="allow a non-loopback address without keys (unencrypted)")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda:N (torch) / gpu:N (paddle)")
@click.option("--env-set", type=click.Choice(["cpu", "gpu"]), default=None, help="default: gpu if --device is a GPU")
@click.option("--threads", default=0, help="threads (default: all cores of this host)")
@click.option("--no-create", is_flag=True, help="fail instead of building a missing environment")
def command(framework: str, connect: str, curve_keys: str | None, insecure: bool, device: str,
            env_set: str | None, threads: int, no_create: bool) -> None:
    """Start a torch or paddle worker that connects to a coordinator on another host."""
    from ..errors import LockstepError
    try:
        sys.exit(_run_worker(framework, connect, curve_keys, insecure, device, env_set, threads, no_create))
    except LockstepError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


def _run_worker(framework: str, connect: str, curve_keys: str | None, insecure: bool, device: str,
                env_set: str | None, threads: int, no_create: bool) -> int:
    from ..placement import nvidia_driver_present, worker_env
    from ..security import WORKER_FIELDS, check_transport, read_key_file
    _check_device(framework, device)
    if device != "cpu" and not nvidia_driver_present():   # before a GPU environment (GBs) is built for nothing
        from ..errors import EnvironmentProblem
        raise EnvironmentProblem(f"--device {device}: this host has no NVIDIA GPU driver (no "
                                 f"/proc/driver/nvidia/version, no nvidia-smi); use --device cpu here")
    warning = check_transport(connect, bool(curve_keys), insecure, "--connect")
    if warning:
        click.echo(warning, err=True)
    keys = read_key_file(curve_keys, WORKER_FIELDS) if curve_keys else None
    env_set = env_set or ("cpu" if device == "cpu" else "gpu")
    env = dict(os.environ, **worker_env(framework, device, threads or (os.cpu_count() or 1)), PYTHONUNBUFFERED="1")
    tmp = Path(tempfile.mkdtemp(prefix="lockstep-worker-"))
    try:
        argv = _worker_argv(framework, env_set, env, tmp, no_create)
        argv += ["--connect", connect, "--name", framework, "--parent-pid", str(os.getpid())]
        if keys:
            argv += ["--curve-keys", "-"]
        elif connect.startswith("tcp://"):
            argv += ["--insecure"]   # checked above, with the user's own flag
        click.echo(f"[{framework}] {argv[0]} on {device} (env set {env_set}, {env['LOCKSTEP_THREADS']} threads) -> "
                   f"{connect} ({'CURVE' if keys else 'no encryption'})", err=True)
        return _supervise(argv, env, keys)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_device(framework: str, device: str) -> None:
    from ..errors import UsageError
    prefix = DEVICE_PREFIX[framework]
    kind, _, idx = device.partition(":")
    if device != "cpu" and (kind != prefix or (idx and not idx.isdigit())):
        raise UsageError(f"--device {device!r} for the {framework} worker: use cpu or {prefix}:N")


def _worker_argv(framework: str, env_set: str, env: dict[str, str], tmp: Path, no_create: bool) -> list[str]:
    """The managed environment's interpreter (built on first use), or LOCKSTEP_WORKER_ARGV_<NAME> (tests)."""
    from .. import envs as E
    override = os.environ.get(f"LOCKSTEP_WORKER_ARGV_{framework.upper()}")
    if override:
        return list(json.loads(override))
    spec = E.env_spec(framework, env_set)
    if not spec.ready():
        if no_create:
            E.require_ready(spec)
        E.create(spec, progress=lambda s: click.echo(s, err=True))
    env["PYTHONPATH"] = str(E.worker_site(tmp, spec.worker_package))
    return [str(spec.python), "-m", spec.worker_package]


def _supervise(argv: list[str], env: dict[str, str], keys: dict[str, bytes] | None) -> int:
    """Run the worker in the foreground; pass SIGTERM on; return its exit status (128+N for signal N)."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE if keys else subprocess.DEVNULL)
    if keys:
        assert proc.stdin is not None
        try:
            proc.stdin.write("".join(f"{k}={v.decode('ascii')}\n" for k, v in keys.items()).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; its exit status says why

    def forward(signum: int, frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # the terminal sent SIGINT to the worker too; give it time to go
                try:
                    code = proc.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    proc.kill()
    finally:
        signal.signal(signal.SIGTERM, old)
    if code < 0:
        try:
            what = signal.Signals(-code).name
        except ValueError:
            what = f"signal {-code}"
        click.echo(f"the worker process ({argv[0]}) was killed by {what}; exit {128 - code}", err=True)
    return 128 - code if code < 0 else code
