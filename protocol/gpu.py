"""Which physical GPU a worker got, asked of nvidia-smi (stdlib only: both workers use it).

A worker sees its GPU as device 0 (the launcher sets ``CUDA_VISIBLE_DEVICES`` to one
physical index, with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA and nvidia-smi number
GPUs alike). The frameworks do not all expose a UUID (paddle does not), so the HELLO
carries nvidia-smi's answer for that physical device; the coordinator compares UUIDs
to refuse two workers on one GPU even when their indices look different (two hosts'
views, a MIG slice, a user's own CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

FIELDS = ("index", "uuid", "pci.bus_id", "name", "memory.total")


def normalize_uuid(uuid: Any) -> str:
    """``GPU-5d4f...`` (nvidia-smi) and ``5d4f...`` (torch) name the same device."""
    text = str(uuid or "").strip().lower()
    return text[4:] if text.startswith("gpu-") else text


def visible_device() -> str | None:
    """The physical device this process sees as its device 0, from ``CUDA_VISIBLE_DEVICES``."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return "0"
    first = value.split(",")[0].strip()
    return first or None


def nvidia_smi_identity(timeout: float = 15.0) -> dict[str, Any]:
    """``{physical_index, uuid, pci_bus_id, name, memory_mib}`` of our device, or ``{error}``."""
    dev = visible_device()
    if dev is None:
        return {"error": "CUDA_VISIBLE_DEVICES is empty: no GPU visible"}
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    try:
        out = subprocess.run([exe, "-i", dev, f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"nvidia-smi failed: {exc}"}
    if out.returncode != 0 or not out.stdout.strip():
        return {"error": f"nvidia-smi -i {dev} exited {out.returncode}: {(out.stderr or out.stdout).strip()[:200]}"}
    parts = [p.strip() for p in out.stdout.strip().splitlines()[0].split(",")]
    if len(parts) != len(FIELDS):
        return {"error": f"unexpected nvidia-smi output: {out.stdout.strip()[:200]}"}
    index, uuid, bus, name, mem = parts
    info: dict[str, Any] = {"physical_index": index, "uuid": normalize_uuid(uuid), "pci_bus_id": bus, "name": name}
    try:
        info["memory_mib"] = int(float(mem))
    except ValueError:
        info["memory_mib"] = mem
    return info
