"""Schedule, thread split, GPU pinning and the shared-GPU / determinism checks (no framework, no GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import ROOT, coordinator, fake_env, load_summary
from coordinator.errors import EnvironmentProblem, ExitCode, UsageError
from coordinator import placement
from coordinator.placement import (check_device_flags, check_hello_devices, check_hello_gpus, check_local_gpus,
                                   determinism_report, device_env, malloc_env, physical_gpu, same_host, worker_env)
from coordinator.runner import choose_schedule, worker_threads
from coordinator.security import is_loopback


# -- schedule and threads -------------------------------------------------------------------------
@pytest.mark.parametrize("req,td,pd,cores,host,want", [
    ("auto", "cpu", "cpu", 2, True, "alternate"),
    ("auto", "cpu", "cpu", 16, True, "parallel"),
    ("auto", "cuda:0", "gpu:1", 2, True, "parallel"),
    ("auto", "cuda:0", "cpu", 2, True, "alternate"),       # one CPU worker still competes for 2 cores
    ("auto", "cpu", "cpu", 2, False, "parallel"),          # remote workers on different hosts
    ("parallel", "cpu", "cpu", 2, True, "parallel"),
    ("alternate", "cuda:0", "gpu:1", 64, False, "alternate"),
])
def test_choose_schedule(req, td, pd, cores, host, want):
    mode, why = choose_schedule(req, td, pd, cores, same_host=host)
    assert mode == want and why


@pytest.mark.parametrize("schedule,cores,requested,want", [
    ("alternate", 2, 0, {"torch": 2, "paddle": 2}),
    ("alternate", 16, 0, {"torch": 16, "paddle": 16}),
    ("parallel", 16, 0, {"torch": 8, "paddle": 8}),
    ("parallel", 7, 0, {"torch": 4, "paddle": 3}),
    ("parallel", 2, 0, {"torch": 1, "paddle": 1}),
    ("parallel", 1, 0, {"torch": 1, "paddle": 1}),
    ("parallel", 16, 3, {"torch": 3, "paddle": 3}),         # --threads wins
])
def test_worker_threads(schedule, cores, requested, want):
    got = worker_threads(schedule, cores, requested)
    assert got == want
    if schedule == "parallel" and not requested and cores > 1:
        assert sum(got.values()) <= cores  # negative control for oversubscription


def _run_threads(out, *args):
    proc = coordinator(["run", "--steps", "weights", "--out", str(out), "--mapping",
                        str(ROOT / "tests/data/fake_mlp.toml"), *args], env=fake_env())
    assert proc.returncode == ExitCode.ALIGNED, proc.stdout + proc.stderr
    s = load_summary(out)
    return s["schedule"], {n: w["threads"] for n, w in s["workers"].items()}


def test_threads_reach_the_workers_split_when_parallel(tmp_path):
    cores = os.cpu_count() or 1
    sched, threads = _run_threads(tmp_path / "p", "--schedule", "parallel")
    assert sched["mode"] == "parallel" and threads == worker_threads("parallel", cores)
    assert sched["threads"] == threads
    sched, threads = _run_threads(tmp_path / "a", "--schedule", "alternate")  # control: all cores each
    assert sched["mode"] == "alternate" and threads == {"torch": cores, "paddle": cores}


# -- worker memory ------------------------------------------------------------------------------
REFAULTS = """
import resource, numpy as np
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
sizes = [24 << 20, 8 << 20, 2 << 20] * 10          # what a training iteration frees and re-allocates
a = [np.ones(n // 4, np.float32) for n in sizes]; del a
f0 = faults()
for _ in range(5):
    a = [np.ones(n // 4, np.float32) for n in sizes]; del a
print((faults() - f0) * 4096 / 5 / sum(sizes))
"""


def _refaulted_share(extra: dict, prefix: str = "") -> float:
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", prefix + REFAULTS], env={**env, **extra, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="glibc/Linux page-fault counters")
def test_worker_malloc_settings_keep_freed_memory_for_the_next_iteration():
    env = worker_env("torch", "cpu", 1)
    assert {k: env[k] for k in malloc_env({})} == malloc_env({})  # the launcher applies them
    kept = _refaulted_share(malloc_env({}))
    default = _refaulted_share({})  # control: glibc's defaults hand memory back and fault it in again
    assert kept < 0.01 < 0.05 < default, (kept, default)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="glibc/Linux page-fault counters")
def test_the_coordinator_tunes_its_own_malloc_at_run_time():
    tuned = _refaulted_share({}, "from coordinator.placement import tune_own_malloc\nprint(tune_own_malloc())\n")
    assert tuned < 0.01 < 0.05 < _refaulted_share({}), tuned  # control: the same process untuned


def test_users_own_malloc_tuning_wins():
    assert malloc_env({}) and malloc_env({"PATH": "/bin"})
    assert malloc_env({"MALLOC_ARENA_MAX": "2"}) == {}
    assert malloc_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == {}
    assert malloc_env({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"})


REST = """
import sys, time
import paddle
from paddle_worker.adapter import omp_rester
x, w = paddle.randn([256, 768]), paddle.randn([768, 3072])

def idle_cpu(after):
    for _ in range(20):
        paddle.matmul(x, w)
    after()
    c = time.process_time()
    time.sleep(0.5)
    return time.process_time() - c
rest = omp_rester(sys.argv[1])
print(rest is not None, idle_cpu(rest or (lambda: None)), idle_cpu(lambda: None), idle_cpu(rest or (lambda: None)))
"""


@pytest.mark.frameworks
@pytest.mark.timeout(180)
def test_paddle_threads_sleep_after_each_op_unless_the_user_says_otherwise():
    """In turns, paddle's idle OpenMP threads must not spin on the cores torch has just been handed
    (Intel OpenMP spins 200 ms after each parallel region by default: the control)."""
    import subprocess
    from real_envs import env_python
    from coordinator import envs
    py = env_python("paddle")
    site = envs.worker_site(Path("/tmp") / "lockstep-test-site-paddle", "paddle_worker")
    base = {"PATH": "/usr/bin:/bin", "GLOG_minloglevel": "2", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2",
            "PYTHONPATH": str(site)}

    def run(device: str, **extra: str) -> list[str]:
        out = subprocess.run([str(py), "-c", REST, device], env={**base, **extra}, capture_output=True, text=True,
                             timeout=120, cwd="/")
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()
    found, rested, spun, rested_again = run("cpu")
    assert found == "True" and float(rested) < 0.05 < 0.1 < float(spun), (rested, spun)
    assert float(rested_again) < 0.05          # the blocktime was set back, and resting works every time
    assert run("cpu", KMP_BLOCKTIME="200")[0] == "False"    # the user's setting wins
    assert run("gpu:0")[0] == "False"                       # only CPU workers


# -- devices ------------------------------------------------------------------------------------
def test_device_env_pins_one_gpu_with_determinism_switches():
    env = device_env("torch", "cuda:1", inherited="")
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["LOCKSTEP_DEVICE"] == "cuda:0"
    assert env["NVIDIA_TF32_OVERRIDE"] == "0" and env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    env = device_env("paddle", "gpu:0", inherited="")
    assert env["LOCKSTEP_DEVICE"] == "gpu:0" and env["FLAGS_cudnn_deterministic"] == "1"
    assert device_env("paddle", "cpu")["CUDA_VISIBLE_DEVICES"] == ""


def test_users_cuda_visible_devices_is_honoured():
    assert physical_gpu("cuda:1", inherited="2,3") == "3"
    assert physical_gpu("gpu", inherited="5") == "5"
    with pytest.raises(UsageError, match="has only 2 GPU"):
        physical_gpu("cuda:2", inherited="2,3")


def test_same_gpu_by_index_is_refused_unless_allowed():
    check_device_flags("cuda:0", "gpu:1", False)
    check_device_flags("cpu", "cpu", False)
    for td, pd in (("cuda:0", "gpu:0"), ("cuda", "gpu:0"), ("cuda:1", "gpu:1")):
        with pytest.raises(UsageError, match="both workers would use GPU"):
            check_device_flags(td, pd, False)
        check_device_flags(td, pd, True)  # --allow-shared-gpu
    with pytest.raises(UsageError, match="--torch-device 'gpu:0'"):
        check_device_flags("gpu:0", "cpu", False)
    with pytest.raises(UsageError, match="must be a number"):
        check_device_flags("cuda:x", "cpu", False)


def test_same_gpu_on_the_cli_exits_2(fake_run):
    proc, _ = fake_run("--steps", "weights", "--torch-device", "cuda:0", "--paddle-device", "gpu:0")
    assert proc.returncode == ExitCode.USAGE and "--allow-shared-gpu" in proc.stdout


def test_a_local_gpu_device_without_a_driver_stops_before_anything_is_built(monkeypatch):
    monkeypatch.setattr(placement, "nvidia_driver_present", lambda: False)
    with pytest.raises(EnvironmentProblem, match="--torch-device cuda:0: this machine has no NVIDIA GPU driver"):
        check_local_gpus("cuda:0", "cpu")
    check_local_gpus("cpu", "cpu")                      # CPU workers need no driver
    monkeypatch.setattr(placement, "nvidia_driver_present", lambda: True)
    check_local_gpus("cuda:0", "gpu:1")                 # the control: with a driver it goes on


def test_a_worker_on_a_gpu_whose_framework_sees_no_cuda_is_refused_at_hello():
    cpu_build = {"framework": "torch", "framework_version": "2.13.0+cpu", "device": "cuda:0", "cuda_available": False}
    with pytest.raises(EnvironmentProblem, match="torch worker was started on cuda:0, but its torch 2.13.0.cpu sees "
                                                 "no CUDA"):
        check_hello_devices({"torch": cpu_build, "paddle": {"device": "cpu", "cuda_available": False}})
    check_hello_devices({"torch": dict(cpu_build, cuda_available=True), "paddle": {"device": "cpu"}})


def _hello(uuid, **extra):
    return {"device": "cuda:0", "device_uuid": uuid, "device_name": "H200", **extra}


def test_same_physical_gpu_by_uuid_is_refused_unless_allowed():
    assert check_hello_gpus({"torch": _hello("aa"), "paddle": _hello("bb")}, False) is None
    assert check_hello_gpus({"torch": _hello("aa"), "paddle": {"device": "cpu"}}, False) is None
    with pytest.raises(UsageError, match="same physical GPU.*torch on H200 aa"):
        check_hello_gpus({"torch": _hello("aa"), "paddle": _hello("aa")}, False)
    assert "on purpose" in check_hello_gpus({"torch": _hello("aa"), "paddle": _hello("aa")}, True)


def test_determinism_report_flags_tf32_on_a_gpu():
    good_t = {"allow_tf32_matmul": False, "allow_tf32_cudnn": False, "cudnn_deterministic": True,
              "deterministic_algorithms": True, "NVIDIA_TF32_OVERRIDE": "0"}
    good_p = {"FLAGS_cudnn_deterministic": True, "allow_tf32_cublas": False, "allow_tf32_cudnn": False,
              "NVIDIA_TF32_OVERRIDE": "0"}
    rep = determinism_report({"torch": _hello("a", determinism=good_t), "paddle": _hello("b", determinism=good_p)})
    assert rep["ok"] and rep["gpu"] and rep["torch"]["cudnn_deterministic"] is True
    bad_p = dict(good_p, allow_tf32_cublas=True, NVIDIA_TF32_OVERRIDE=None)
    rep = determinism_report({"torch": _hello("a", determinism=good_t), "paddle": _hello("b", determinism=bad_p)})
    assert not rep["ok"] and any("paddle: allow_tf32_cublas is on" in p for p in rep["problems"])
    assert any("NVIDIA_TF32_OVERRIDE" in p for p in rep["problems"])
    # on CPU the GPU switches do not matter
    cpu = determinism_report({"torch": {"device": "cpu", "determinism": {"allow_tf32_cudnn": True}}})
    assert cpu["ok"] and not cpu["gpu"]


def test_fake_run_records_determinism_and_schedule(fake_run):
    proc, out = fake_run("--steps", "weights")
    assert proc.returncode == ExitCode.ALIGNED
    s = load_summary(out)
    assert s["determinism"]["gpu"] is False and s["determinism"]["ok"] is True
    assert s["schedule"]["mode"] in ("parallel", "alternate") and "schedule:" in proc.stdout


def test_same_host():
    assert same_host({"torch": {"host": "a"}, "paddle": {"host": "a"}})
    assert not same_host({"torch": {"host": "a"}, "paddle": {"host": "b"}})
    assert same_host({"torch": {}, "paddle": {"host": "b"}})


@pytest.mark.parametrize("ep,loop", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.4.5:1", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/x", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.0.0.2:5555", False),
    ("tcp://[2001:db8::1]:5555", False), ("tcp://gpu-box:5555", False),
])
def test_is_loopback(ep, loop):
    assert is_loopback(ep) is loop
