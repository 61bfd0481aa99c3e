"""Where each worker runs: GPU pinning, the same-GPU check, and what summary.json says about it.

Framework-free: everything here works from device strings and the HELLOs the workers
send, so it is testable without a GPU.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from .errors import EnvironmentProblem, UsageError

GPU_DETERMINISM_ENV = {"NVIDIA_TF32_OVERRIDE": "0",          # no TF32 in any CUDA library
                       "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS (torch asks for it)
                       "FLAGS_cudnn_deterministic": "1",      # paddle: deterministic cuDNN
                       "FLAGS_embedding_deterministic": "1",  # paddle: deterministic embedding grad
                       "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}     # CUDA numbers GPUs like nvidia-smi does


def gpu_index(device: str) -> str | None:
    """``cuda:1`` -> ``"1"``, ``cuda``/``gpu`` -> ``"0"``, ``cpu`` -> None."""
    if device == "cpu":
        return None
    return device.partition(":")[2] or "0"


def physical_gpu(device: str, inherited: str | None = None) -> str | None:
    """The physical device a ``cuda:N``/``gpu:N`` means, honouring the user's own CUDA_VISIBLE_DEVICES.

    With ``CUDA_VISIBLE_DEVICES=2,3`` in the coordinator's environment, ``cuda:1`` is
    physical GPU 3, as it would be in a single-process script.
    """
    idx = gpu_index(device)
    if idx is None:
        return None
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES") if inherited is None else inherited
    visible = [v.strip() for v in (inherited or "").split(",") if v.strip()]
    if not visible:
        return idx
    try:
        return visible[int(idx)]
    except (ValueError, IndexError):
        raise UsageError(f"device {device}: CUDA_VISIBLE_DEVICES={inherited} has only {len(visible)} GPU(s) "
                         f"(indices 0..{len(visible) - 1})") from None


def device_env(name: str, device: str, inherited: str | None = None) -> dict[str, str]:
    """Pin one worker: it sees only its GPU, as device 0, with the determinism switches set."""
    phys = physical_gpu(device, inherited)
    if phys is None:
        return {"LOCKSTEP_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    local = "cuda:0" if name == "torch" else "gpu:0"
    return {"LOCKSTEP_DEVICE": local, "CUDA_VISIBLE_DEVICES": phys, **GPU_DETERMINISM_ENV}


def check_device_flags(torch_device: str, paddle_device: str, allow_shared: bool) -> None:
    """Before launch: valid device strings, and not one GPU for both unless allowed."""
    if torch_device != "cpu" and not (torch_device == "cuda" or torch_device.startswith("cuda:")):
        raise UsageError(f"--torch-device {torch_device!r}: use cpu or cuda:N")
    if paddle_device != "cpu" and not (paddle_device == "gpu" or paddle_device.startswith("gpu:")):
        raise UsageError(f"--paddle-device {paddle_device!r}: use cpu or gpu:N")
    for flag, dev in (("--torch-device", torch_device), ("--paddle-device", paddle_device)):
        idx = gpu_index(dev)
        if idx is not None and not (idx.isdigit() or idx.upper().startswith(("GPU-", "MIG-"))):
            raise UsageError(f"{flag} {dev!r}: the index must be a number (cuda:0) or a GPU UUID")
    tp, pp = physical_gpu(torch_device), physical_gpu(paddle_device)
    if tp is not None and tp == pp and not allow_shared:
        raise UsageError(f"both workers would use GPU {tp} ({torch_device} and {paddle_device}): pin them to "
                         f"different GPUs or pass --allow-shared-gpu")


def nvidia_driver_present() -> bool:
    """An NVIDIA driver on this host (what a local GPU worker needs); no CUDA library is loaded."""
    import shutil
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def check_local_gpus(torch_device: str, paddle_device: str) -> None:
    """Local workers asked for a GPU on a host without an NVIDIA driver: refuse before GPU
    environments (GBs) are built for nothing."""
    asked = [f"--{n}-device {d}" for n, d in (("torch", torch_device), ("paddle", paddle_device)) if d != "cpu"]
    if asked and not nvidia_driver_present():
        raise EnvironmentProblem(f"{' and '.join(asked)}: this machine has no NVIDIA GPU driver (no "
                                 f"/proc/driver/nvidia/version, no nvidia-smi); use cpu here, or run the worker "
                                 f"on a GPU host (coordinator run --listen ..., docs/remote-and-gpu.md)")


def check_hello_devices(hellos: Mapping[str, dict]) -> None:
    """A worker on a GPU device whose framework sees no CUDA (a CPU build, or no GPU on its host)
    would fail in its first op with an assertion: refuse at the handshake, naming it."""
    for name, h in hellos.items():
        device = str(h.get("device", "cpu"))
        if device != "cpu" and h.get("cuda_available") is False:
            raise EnvironmentProblem(
                f"{name} worker was started on {device}, but its {h.get('framework', name)} "
                f"{h.get('framework_version', '')} sees no CUDA (a CPU build, or no GPU on its host): use "
                f"--{name}-device cpu, or the GPU environment (coordinator envs create {name} --env-set gpu)")


def check_hello_gpus(hellos: Mapping[str, dict], allow_shared: bool) -> str | None:
    """After the handshake: refuse two workers on one physical GPU (by UUID), unless allowed.

    Catches what the index check cannot: remote workers, a user's CUDA_VISIBLE_DEVICES,
    two names for one device. Returns a note for the log when GPUs are shared on purpose.
    """
    uuids = {n: h.get("device_uuid") for n, h in hellos.items() if h.get("device_uuid")}
    if len(uuids) < 2 or len(set(uuids.values())) == len(uuids):
        return None
    names = sorted(uuids)
    where = ", ".join(f"{n} on {hellos[n].get('device_name', '?')} {uuids[n]}" for n in names)
    if not allow_shared:
        raise UsageError(f"the workers report the same physical GPU ({where}): they would compete for its "
                         f"memory and time; use different GPUs or pass --allow-shared-gpu")
    return f"workers share one GPU on purpose (--allow-shared-gpu): {where}"


def determinism_report(hellos: Mapping[str, dict]) -> dict[str, Any]:
    """summary.json 'determinism': each worker's switches, and what is not as it should be on a GPU."""
    report: dict[str, Any] = {}
    problems: list[str] = []
    on_gpu = False
    for name, h in hellos.items():
        d = dict(h.get("determinism") or h.get("deterministic") or {})
        gpu = str(h.get("device", "cpu")) != "cpu"
        on_gpu = on_gpu or gpu
        report[name] = {"device": h.get("device"), **d}
        if gpu:
            problems += [f"{name}: {p}" for p in _gpu_problems(d)]
    report["gpu"] = on_gpu
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _gpu_problems(d: Mapping[str, Any]) -> list[str]:
    out = []
    for key in ("allow_tf32_matmul", "allow_tf32_cudnn", "allow_tf32_cublas"):
        if d.get(key):
            out.append(f"{key} is on (TF32 rounds float32 matmuls to 10 mantissa bits)")
    for key in ("cudnn_deterministic", "deterministic_algorithms", "FLAGS_cudnn_deterministic"):
        if key in d and not d[key]:
            out.append(f"{key} is off")
    if d.get("NVIDIA_TF32_OVERRIDE") != "0":
        out.append(f"NVIDIA_TF32_OVERRIDE is {d.get('NVIDIA_TF32_OVERRIDE')!r}, not '0'")
    return out


def same_host(hellos: Mapping[str, dict]) -> bool:
    """Do the workers share a machine (and so its cores)? Unknown counts as yes."""
    hosts = {h.get("host") for h in hellos.values()}
    return None in hosts or len(hosts) <= 1


def describe(name: str, h: Mapping[str, Any]) -> str:
    """One line per worker for the console: framework, device, GPU name/UUID/memory, threads, host."""
    parts = [f"{name}: {h.get('framework')} {h.get('framework_version')} on {h.get('device')}"]
    if h.get("device_name"):
        mem = h.get("device_memory")
        parts.append(f"{h['device_name']}" + (f" {mem / 2**30:.0f} GiB" if isinstance(mem, (int, float)) else ""))
    if h.get("visible_devices") not in (None, ""):
        parts.append(f"physical {h['visible_devices']}")
    if h.get("device_uuid"):
        parts.append(f"uuid {h['device_uuid']}")
    parts.append(f"threads {h.get('threads')}")
    if h.get("host"):
        parts.append(f"host {h['host']}")
    parts.append(f"python {h.get('python')}, {h.get('executable')}")
    return ", ".join(parts)


BASE_WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GLOG_minloglevel": "2",
                   "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


# glibc malloc: keep memory a worker frees for its next iteration instead of handing it back to
# the kernel (top of the heap never trimmed, blocks under 32 MiB from the heap, the heap grown
# 256 MiB at a time). A training loop frees and re-allocates the same activations and gradients
# every iteration; returned pages come back as page faults, and on VMs with free-page reporting
# (the reference machine) each of those is a trip to the hypervisor: BERT-base backward, 4
# iterations, 55.1 s -> 48.7 s (bench/RESULTS.md). A worker's memory stays at its high-water
# mark. Not applied when the user tunes malloc (any MALLOC_* variable, or glibc.malloc in
# GLIBC_TUNABLES); other C libraries ignore them.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
              "MALLOC_TOP_PAD_": str(256 << 20)}


def malloc_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MALLOC_ENV, unless the user's environment already tunes glibc malloc (their choice wins)."""
    environ = os.environ if environ is None else environ
    if any(k.startswith("MALLOC_") for k in environ) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return {}
    return dict(MALLOC_ENV)


_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3}  # M_* numbers


def tune_own_malloc() -> bool:
    """The same settings for the coordinator process itself, through ``mallopt`` (its
    environment was read at start-up). Its comparisons allocate 1 MB temporaries per chunk;
    with glibc's defaults each came back as fresh pages: the layers step's BERT-base forward
    comparisons took 0.48 s instead of 0.17 s. False when skipped (not glibc, or the user
    tunes malloc)."""
    import ctypes
    import platform
    wanted = malloc_env()
    if not wanted or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        # mallopt takes a C int: 2 GiB - 1 is "never trim" for any heap top this process will have
        return all(libc.mallopt(_MALLOPT[k], min(int(v), 2**31 - 1)) == 1 for k, v in wanted.items())
    except (OSError, AttributeError, ValueError, OverflowError):
        return False


def worker_env(name: str, device: str, threads: int) -> dict[str, str]:
    """Everything a worker's environment needs from us: offline hubs, its device, its thread
    count, and malloc settings that keep freed memory in the process."""
    env = dict(BASE_WORKER_ENV)
    env.update(device_env(name, device))
    env.update({"LOCKSTEP_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env.update(malloc_env())
    return env
