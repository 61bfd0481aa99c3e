"""Remote workers over TCP with CURVE: the keys command, key files, and who gets in (no framework needed).

The coordinator runs as ``coordinator run --listen tcp://127.0.0.1:<port>`` in a real
subprocess; the numpy fake workers connect to it as remote workers would, either
directly (``fake_worker.py --connect ... --curve-keys FILE``, the same arguments the
real workers take) or through ``coordinator worker`` (with LOCKSTEP_WORKER_ARGV_* set
to the fake). Every intruder variant has the legitimate run as its control.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAKE, ROOT, coordinator, fake_env, load_summary
from coordinator.errors import ExitCode
from coordinator.security import KeyFileError, read_key_file

MAPPING = str(ROOT / "tests/data/fake_mlp.toml")
pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def procs():
    """Background processes started by a test; all stopped (TERM, then KILL) at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in started:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    for p in started:
        assert p.returncode is not None


@pytest.fixture
def keys(tmp_path) -> Path:
    d = tmp_path / "keys"
    proc = coordinator(["keys", str(d)])
    assert proc.returncode == 0, proc.stderr
    return d


def spawn(procs, argv: list[str], log: Path, env: dict | None = None, stdin_text: str | None = None
          ) -> subprocess.Popen:
    p = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=str(ROOT),
                         stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                         env=env or fake_env(), start_new_session=True)
    procs.append(p)
    if stdin_text is not None:
        p.stdin.write(stdin_text.encode())
        p.stdin.close()
    return p


def start_coordinator(procs, tmp_path: Path, endpoint: str, *extra: str, steps: str = "weights,forward",
                      hello_timeout: float = 20, stdin_text: str | None = None
                      ) -> tuple[subprocess.Popen, Path, Path]:
    out, log = tmp_path / "run", tmp_path / "coordinator.out"
    argv = [sys.executable, "-m", "coordinator.cli", "run", "--listen", endpoint, "--steps", steps,
            "--mapping", MAPPING, "--out", str(out), "--hello-timeout", str(hello_timeout), *extra]
    return spawn(procs, argv, log, stdin_text=stdin_text), out, log


def fake_worker(procs, tmp_path: Path, flavor: str, endpoint: str, keyfile: Path | None, **faults: str
                ) -> subprocess.Popen:
    argv = [sys.executable, FAKE, flavor, "--connect", endpoint]
    argv += ["--curve-keys", str(keyfile)] if keyfile is not None else ["--insecure"]
    return spawn(procs, argv, tmp_path / f"{flavor}-{len(procs)}.out", env=fake_env(**faults))


def finish(p: subprocess.Popen, log: Path, timeout: float = 60) -> tuple[int, str]:
    code = p.wait(timeout)
    return code, log.read_text()


def key_file(path: Path, **fields: str) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in fields.items()))
    path.chmod(0o600)
    return path


def fields(path: Path) -> dict[str, str]:
    return {k: v.decode() for k, v in read_key_file(str(path), []).items()}


# -- the keys command and key files -----------------------------------------------------------
def test_keys_command_writes_private_files_each_with_what_its_owner_needs(tmp_path):
    d = tmp_path / "k"
    proc = coordinator(["keys", str(d)])
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("server.key", "torch.key", "paddle.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    server, torch_, paddle_ = fields(d / "server.key"), fields(d / "torch.key"), fields(d / "paddle.key")
    assert set(server) == {"public", "secret", "torch", "paddle"}
    assert set(torch_) == set(paddle_) == {"public", "secret", "server"}
    assert torch_["server"] == paddle_["server"] == server["public"]
    assert server["torch"] == torch_["public"] and server["paddle"] == paddle_["public"]
    assert len({server["secret"], torch_["secret"], paddle_["secret"]}) == 3
    for secret in (server["secret"], torch_["secret"], paddle_["secret"]):  # never echoed
        assert secret not in proc.stdout + proc.stderr
    # negative control: existing keys are not overwritten by accident
    again = coordinator(["keys", str(d)])
    assert again.returncode == ExitCode.USAGE and "--force" in again.stderr
    assert fields(d / "torch.key") == torch_


def test_world_readable_key_file_is_refused_everywhere(keys, tmp_path):
    assert read_key_file(str(keys / "torch.key"), ["public", "secret", "server"])  # control: 0600 is fine
    for name in ("torch.key", "server.key"):
        (keys / name).chmod(0o644)
    with pytest.raises(KeyFileError, match=r"torch.key is readable by group/others \(mode 644\).*chmod 600"):
        read_key_file(str(keys / "torch.key"), ["public"])
    port = free_port()
    w = coordinator(["worker", "torch", "--connect", f"tcp://127.0.0.1:{port}", "--curve-keys",
                     str(keys / "torch.key")], env=fake_env(), timeout=30)
    assert w.returncode == ExitCode.USAGE and "chmod 600" in w.stderr, w.stderr
    r = coordinator(["run", "--listen", f"tcp://127.0.0.1:{port}", "--curve-keys", str(keys / "server.key"),
                     "--steps", "weights", "--out", str(tmp_path / "r")], env=fake_env(), timeout=30)
    assert r.returncode == ExitCode.USAGE and "server.key is readable by group/others" in r.stdout, r.stdout
    # the worker entry point itself (protocol.adapter) refuses it too
    direct = subprocess.run([sys.executable, FAKE, "torch", "--connect", f"tcp://127.0.0.1:{port}",
                             "--curve-keys", str(keys / "torch.key")], capture_output=True, text=True, timeout=30,
                            env=fake_env())
    assert direct.returncode != 0 and "chmod 600" in direct.stderr


def test_key_file_errors_name_the_field_never_the_value(tmp_path):
    bad = key_file(tmp_path / "bad.key", public="short", secret="x" * 40, server="y" * 40)
    with pytest.raises(KeyFileError) as exc:
        read_key_file(str(bad), ["public", "secret", "server"])
    assert "public is not a 40-character z85 CURVE key" in str(exc.value) and "short" not in str(exc.value)
    with pytest.raises(KeyFileError, match="lacks server"):
        read_key_file(str(key_file(tmp_path / "b2.key", public="a")), ["public", "server"])


def test_a_key_file_whose_public_and_secret_do_not_belong_together_is_refused(keys, tmp_path):
    """A secret edited or pasted from another file made only a vague handshake failure later; now
    the file is refused when read (the control: the file `coordinator keys` wrote is accepted)."""
    import zmq
    good = fields(keys / "torch.key")
    assert read_key_file(str(keys / "torch.key"), ["public", "secret", "server"])
    _, other_secret = zmq.curve_keypair()
    mixed = key_file(tmp_path / "mixed.key", public=good["public"], secret=other_secret.decode(), server=good["server"])
    with pytest.raises(KeyFileError, match="its public key is not the one of its secret key") as exc:
        read_key_file(str(mixed), ["public", "secret", "server"])
    assert other_secret.decode() not in str(exc.value) and good["public"] not in str(exc.value)


# -- a full remote run -------------------------------------------------------------------------
def test_remote_workers_with_keys_run_weights_and_forward(keys, tmp_path, procs):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord, out, log = start_coordinator(procs, tmp_path, endpoint, "--curve-keys", str(keys / "server.key"))
    # torch through `coordinator worker` (key file), paddle as a bare worker reading its keys from stdin
    tw = spawn(procs, [sys.executable, "-m", "coordinator.cli", "worker", "torch", "--connect", endpoint,
                       "--curve-keys", str(keys / "torch.key")], tmp_path / "torch.out")
    pw = spawn(procs, [sys.executable, FAKE, "paddle", "--connect", endpoint, "--curve-keys", "-"],
               tmp_path / "paddle.out", stdin_text=(keys / "paddle.key").read_text())
    code, text = finish(coord, log)
    assert code == ExitCode.ALIGNED, text
    assert tw.wait(15) == 0 and pw.wait(15) == 0  # both were told to shut down
    s = load_summary(out)
    assert [x["status"] for x in s["steps"]] == ["passed", "passed"]
    assert s["security"]["curve"] is True and s["security"]["refusals"] == {}
    assert sorted(a["worker"] for a in s["security"]["attempts"]) == ["paddle", "torch"]
    assert s["options"]["listen"] == endpoint
    secrets = [fields(keys / f)["secret"] for f in ("server.key", "torch.key", "paddle.key")]
    everything = text + (out / "summary.json").read_text() + (out / "events.jsonl").read_text() + \
        (tmp_path / "torch.out").read_text()
    assert not any(sec in everything for sec in secrets)


def test_remote_run_still_flags_a_divergent_migration(keys, tmp_path, procs):
    """Negative control for the remote path: the paddle worker computes with a wrong bias."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord, out, log = start_coordinator(procs, tmp_path, endpoint, "--curve-keys", "-",  # server keys on stdin
                                        stdin_text=(keys / "server.key").read_text())
    fake_worker(procs, tmp_path, "torch", endpoint, keys / "torch.key")
    fake_worker(procs, tmp_path, "paddle", endpoint, keys / "paddle.key", paddle="bug@forward")
    code, text = finish(coord, log)
    assert code == ExitCode.DIVERGED, text
    fwd = load_summary(out)["steps"][1]
    assert fwd["name"] == "forward" and not fwd["passed"] and "logits" in fwd["message"]


def test_loopback_without_keys_needs_insecure_on_both_ends(tmp_path, procs):
    """Any local user can reach (or bind first) a loopback port: plaintext TCP is opt-in there too,
    for the coordinator and for each worker; with --insecure on both the run aligns (the control),
    and the worker commands it prints carry --insecure and a loopback address that works."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    refused = coordinator(["run", "--listen", endpoint, "--steps", "weights", "--out", str(tmp_path / "no")],
                          env=fake_env(), timeout=30)
    assert refused.returncode == ExitCode.USAGE, refused.stdout
    assert "without --curve-keys: any local user could connect to it" in " ".join(refused.stdout.split())
    bare = subprocess.run([sys.executable, FAKE, "torch", "--connect", endpoint], capture_output=True, text=True,
                          env=fake_env(), timeout=30)
    assert bare.returncode == 2 and "whoever listens on that port could command this worker" in bare.stderr
    worker = coordinator(["worker", "torch", "--connect", endpoint], env=fake_env(), timeout=30)
    assert worker.returncode == ExitCode.USAGE and "any local user who binds that port first" in worker.stderr
    coord, out, log = start_coordinator(procs, tmp_path, endpoint, "--insecure")
    fake_worker(procs, tmp_path, "torch", endpoint, None)
    fake_worker(procs, tmp_path, "paddle", endpoint, None)
    code, text = finish(coord, log)
    assert code == ExitCode.ALIGNED, text
    assert load_summary(out)["security"]["curve"] is False
    assert f"coordinator worker torch --connect {endpoint} --insecure" in text


def test_printed_worker_commands_for_an_ephemeral_loopback_port_and_for_ipc(tmp_path):
    """tcp://127.0.0.1:0 reports itself as [::ffff:127.0.0.1]:PORT: still loopback, printed as
    127.0.0.1; an ipc listener prints its own ipc:// path, not a tcp:// one."""
    proc = coordinator(["run", "--listen", "tcp://127.0.0.1:0", "--insecure", "--steps", "weights",
                        "--out", str(tmp_path / "t"), "--hello-timeout", "1"], env=fake_env(), timeout=30)
    assert proc.returncode == ExitCode.ENVIRONMENT, proc.stdout
    line = proc.stdout.split("coordinator worker torch --connect ", 1)[1].splitlines()[0]
    assert line.startswith("tcp://127.0.0.1:") and line.endswith(" --insecure") and ":0 " not in line
    sock = tmp_path / "c.sock"
    proc = coordinator(["run", "--listen", f"ipc://{sock}", "--steps", "weights", "--out", str(tmp_path / "i"),
                        "--hello-timeout", "1"], env=fake_env(), timeout=30)
    assert proc.returncode == ExitCode.ENVIRONMENT, proc.stdout
    assert f"coordinator worker torch --connect ipc://{sock}\n" in proc.stdout
    assert not sock.exists()   # the socket file its bind created is removed with the session


# -- who does not get in ------------------------------------------------------------------------
def _intruder_keys(keys: Path, tmp_path: Path, kind: str) -> Path | None:
    import zmq
    paddle = fields(keys / "paddle.key")
    if kind == "no key":
        return None
    if kind == "wrong server key":
        other_server, _ = zmq.curve_keypair()
        return key_file(tmp_path / "wrong-server.key", public=paddle["public"], secret=paddle["secret"],
                        server=other_server.decode())
    if kind == "unknown client key":
        pub, sec = zmq.curve_keypair()
        return key_file(tmp_path / "unknown.key", public=pub.decode(), secret=sec.decode(), server=paddle["server"])
    if kind == "torch's key as paddle":
        return keys / "torch.key"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,why", [
    ("no key", "without CURVE keys"),  # libzmq names the mismatch, or (under load) gives no detail
    ("wrong server key", "used the wrong server public key"),
    ("unknown client key", "unknown client key was refused"),
    ("torch's key as paddle", "authenticated as 'torch' claimed to be the paddle worker"),
])
def test_intruder_gets_no_message_through_and_the_coordinator_says_why(keys, tmp_path, procs, kind, why):
    """Refused at the door, named by the coordinator; the refused worker itself says why and exits 2
    instead of retrying (or sitting deaf) forever."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord, out, log = start_coordinator(procs, tmp_path, endpoint, "--curve-keys", str(keys / "server.key"),
                                        hello_timeout=4)
    fake_worker(procs, tmp_path, "torch", endpoint, keys / "torch.key")          # the control: it gets in
    intruder = fake_worker(procs, tmp_path, "paddle", endpoint, _intruder_keys(keys, tmp_path, kind))
    said = tmp_path / f"paddle-{len(procs) - 1}.out"
    if kind != "torch's key as paddle":   # a valid key gets through the handshake; its messages are dropped
        assert intruder.wait(30) == ExitCode.USAGE
        assert "refused the connection" in said.read_text() or "handshake with" in said.read_text(), said.read_text()
    code, text = finish(coord, log)
    if kind == "torch's key as paddle":   # ... and it is told so when the run ends, instead of exiting 0
        assert intruder.wait(30) == ExitCode.USAGE
        assert "the coordinator refused this worker: no HELLO was accepted from a paddle worker" in said.read_text()
    assert code == ExitCode.ENVIRONMENT, text
    assert "no HELLO from paddle worker within 4s" in text
    assert why in text, text
    assert "admitted keys: torch" in text  # the legitimate worker was let in
    s = load_summary(out)
    assert s["status"] == "error" and any(why in k for k in s["security"]["refusals"]), s["security"]
    assert "paddle" not in s.get("workers", {})
    assert all(a["worker"] != "paddle" for a in s["security"]["attempts"])


# -- transport policy ----------------------------------------------------------------------------
@pytest.mark.parametrize("addr", ["0.0.0.0", "*", "192.0.2.7"])
def test_listen_off_loopback_without_keys_is_refused(tmp_path, addr):
    proc = coordinator(["run", "--listen", f"tcp://{addr}:{free_port()}", "--steps", "weights",
                        "--out", str(tmp_path / "r")], env=fake_env(), timeout=30)
    assert proc.returncode == ExitCode.USAGE, proc.stdout
    assert "no --curve-keys" in proc.stdout and "--insecure" in proc.stdout


def test_insecure_flag_allows_it_with_a_warning(tmp_path):
    """Control for the refusal above: --insecure gets past the check (then times out: no workers)."""
    proc = coordinator(["run", "--listen", f"tcp://0.0.0.0:{free_port()}", "--insecure", "--steps", "weights",
                        "--out", str(tmp_path / "r"), "--hello-timeout", "1"], env=fake_env(), timeout=30)
    assert proc.returncode == ExitCode.ENVIRONMENT, proc.stdout
    assert "WARNING" in proc.stdout and "unencrypted" in proc.stdout
    assert "no HELLO from" in proc.stdout
    assert "coordinator worker torch --connect tcp://<this host>:" in proc.stdout and " --insecure" in \
        proc.stdout.split("coordinator worker torch", 1)[1].splitlines()[0]   # the command it prints works


def test_worker_command_refuses_plaintext_to_another_host():
    proc = coordinator(["worker", "paddle", "--connect", "tcp://192.0.2.7:5555"], env=fake_env(), timeout=30)
    assert proc.returncode == ExitCode.USAGE and "--insecure" in proc.stderr, proc.stderr


def test_worker_command_says_when_its_worker_process_was_killed(tmp_path):
    """`coordinator worker` exits 128+N for a worker killed by signal N, and says so (it was silent)."""
    proc = coordinator(["worker", "torch", "--connect", f"ipc://{tmp_path}/none"], env=fake_env(torch="kill@hello"),
                       timeout=60)
    assert proc.returncode == 128 + 9, proc.stderr
    assert "was killed by SIGKILL; exit 137" in proc.stderr


def test_a_worker_with_no_coordinator_says_it_is_still_waiting_and_stops_quietly_on_ctrl_c(tmp_path):
    """A wrong port looked like a hang: the worker now says so after a while (10 s, here 0.3 s),
    and Ctrl-C in its terminal ends it with exit 130 and one line, not a traceback."""
    import signal
    import time
    env = dict(fake_env(), LOCKSTEP_WORKER_WAIT_NOTE_S="0.3")
    p = subprocess.Popen([sys.executable, FAKE, "torch", "--connect", f"tcp://127.0.0.1:{free_port()}", "--insecure"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(2.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "no connection to a coordinator at tcp://127.0.0.1:" in err and "still trying" in err
    assert "interrupted (Ctrl-C); exiting" in err and "Traceback" not in err


def test_a_device_flag_that_remote_workers_would_ignore_is_refused(tmp_path):
    proc = coordinator(["run", "--listen", "ipc://" + str(tmp_path / "s"), "--torch-device", "cuda:0",
                        "--steps", "weights", "--out", str(tmp_path / "r")], env=fake_env(), timeout=30)
    assert proc.returncode == ExitCode.USAGE, proc.stdout
    assert "each remote worker picks its own: coordinator worker torch --device cuda:N" in " ".join(proc.stdout.split())


def test_curve_keys_without_listen_is_a_usage_error(keys, tmp_path):
    proc = coordinator(["run", "--curve-keys", str(keys / "server.key"), "--steps", "weights",
                        "--out", str(tmp_path / "r")], env=fake_env(), timeout=30)
    assert proc.returncode == ExitCode.USAGE and "only apply with --listen" in proc.stdout


# -- losing the connection ------------------------------------------------------------------------
def _wait_for(path: Path, timeout: float = 30) -> None:
    import time
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def _stamped_worker(procs, tmp_path: Path, flavor: str, endpoint: str, keyfile: Path | None, **faults: str):
    env = dict(fake_env(**faults), LOCKSTEP_FAKE_STAMP_DIR=str(tmp_path))
    argv = [sys.executable, FAKE, flavor, "--connect", endpoint] + (["--curve-keys", str(keyfile)] if keyfile
                                                                     else ["--insecure"])
    return spawn(procs, argv, tmp_path / f"{flavor}.out", env=env)


def test_a_remote_worker_killed_mid_op_is_a_death_named_within_seconds(keys, tmp_path, procs):
    """No process to poll on this host: its connection is probed instead (exit 4 within seconds, not
    a hang at the op's deadline). The control: the same run without the kill aligns (tests above)."""
    import time
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord, out, log = start_coordinator(procs, tmp_path, endpoint, "--curve-keys", str(keys / "server.key"))
    _stamped_worker(procs, tmp_path, "torch", endpoint, keys / "torch.key")
    paddle = _stamped_worker(procs, tmp_path, "paddle", endpoint, keys / "paddle.key", paddle="slow=60@forward")
    _wait_for(tmp_path / "paddle.slow@forward")
    t0 = time.monotonic()
    os.killpg(paddle.pid, signal.SIGKILL)
    code, text = finish(coord, log, timeout=30)
    assert code == ExitCode.WORKER_DIED, text
    assert time.monotonic() - t0 < 10
    assert "paddle worker (remote, on" in text and "lost its connection during forward" in text


def test_remote_workers_exit_when_their_coordinator_is_killed(keys, tmp_path, procs):
    """A remote worker serves one run: without its coordinator it exits 3 (an idle one at once, a busy
    one after its op) instead of waiting forever and answering the next run's coordinator as a stale
    worker. A third worker under a name already connected gets nothing (the name is taken) and goes
    with this coordinator too, so it cannot take the name in the next run."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord, out, log = start_coordinator(procs, tmp_path, endpoint, "--curve-keys", str(keys / "server.key"))
    torch = _stamped_worker(procs, tmp_path, "torch", endpoint, keys / "torch.key")
    paddle = _stamped_worker(procs, tmp_path, "paddle", endpoint, keys / "paddle.key", paddle="slow=8@forward")
    _wait_for(tmp_path / "paddle.slow@forward")
    (tmp_path / "extra").mkdir()
    extra = spawn(procs, [sys.executable, FAKE, "torch", "--connect", endpoint, "--curve-keys",
                          str(keys / "torch.key")], tmp_path / "extra.out",
                  env=dict(fake_env(), LOCKSTEP_FAKE_STAMP_DIR=str(tmp_path / "extra")))
    _wait_for(tmp_path / "extra" / "torch.pid")   # started, imports done, about to connect
    import time
    time.sleep(1)                                 # connected (loopback) and refused the name
    os.killpg(coord.pid, signal.SIGKILL)
    assert extra.wait(30) == torch.wait(30) == paddle.wait(30) == ExitCode.ENVIRONMENT
    for name in ("torch", "paddle", "extra"):
        assert "lost the connection to the coordinator" in (tmp_path / f"{name}.out").read_text()
    assert "op forward" not in (tmp_path / "extra.out").read_text()   # it was never sent anything


def test_ipv6_loopback_listens(tmp_path, procs):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    endpoint = f"tcp://[::1]:{port}"
    coord, out, log = start_coordinator(procs, tmp_path, endpoint, "--insecure")
    fake_worker(procs, tmp_path, "torch", endpoint, None)
    fake_worker(procs, tmp_path, "paddle", endpoint, None)
    code, text = finish(coord, log)
    assert code == ExitCode.ALIGNED, text
