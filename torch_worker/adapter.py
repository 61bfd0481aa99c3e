"""PyTorch adapter: HF transformers models behind the worker interface."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import numpy as np
import torch

from protocol.adapter import Adapter
from protocol.shared import check_number_injects
from protocol.codec import DTYPES, BFloat16, HostCopy


def to_numpy(t: torch.Tensor, copy: bool = True) -> Any:
    """An owned copy by default.

    ``copy=False`` (a view of a CPU tensor) is safe in two places: a tensor handed straight to
    ``ctx.partial`` (which snapshots it before returning), and a *reply* of tensors nothing
    changes before the handler returns (the worker runs nothing else until the coordinator has
    the whole reply: it sends the next request only after it).
    """
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return BFloat16(t.view(torch.int16).numpy().view(np.uint16).copy())
    return t.numpy().copy() if copy else t.numpy()


# ``LOCKSTEP_DIRECT_COPY``: ``1`` (default) a streamed tensor is copied by torch itself, once,
# straight into the shared ring; ``0``: through a host numpy array (``.cpu()`` for a GPU tensor)
# and numpy's copy into the ring, the older path (the benchmark's baseline). Read once: a hook
# runs per layer.
DIRECT = os.environ.get("LOCKSTEP_DIRECT_COPY", "1").strip() != "0"


@functools.lru_cache(maxsize=None)
def _np_dtype(dtype: torch.dtype) -> np.dtype | None:
    """numpy's dtype for a torch dtype the wire carries, else None (bfloat16, complex, ...)."""
    if dtype == torch.bfloat16:
        return None
    try:
        d = torch.empty(0, dtype=dtype).numpy().dtype
    except (TypeError, RuntimeError):
        return None
    return d if d.name in DTYPES else None


DIRECT_COPIES = [0]   # tensors copied straight into the ring so far (the capture reply reports its share)


def to_wire(t: torch.Tensor) -> Any:
    """A tensor to hand to ``ctx.partial`` (whose encoder snapshots it before anything changes it).

    It becomes a ``HostCopy``: when it goes into the shared ring, torch copies it there itself,
    once. For a GPU tensor that is one device-to-ring copy instead of ``.cpu()`` into a fresh
    host tensor and a second copy into the ring; for a CPU tensor torch's copy runs on its own
    intra-op threads and takes any strides, where numpy's is one thread (a transposed view: two
    copies). Measured in bench/RESULTS.md (layer capture). A tensor that goes as frames (no ring,
    too small, no room) is made a host array as before."""
    t = t.detach()
    dtype = _np_dtype(t.dtype) if DIRECT else None
    if dtype is None:
        return to_numpy(t, copy=False)

    def fill(dst: np.ndarray) -> None:
        torch.from_numpy(dst).copy_(t)   # synchronous: the bytes are in the ring on return
        DIRECT_COPIES[0] += 1

    return HostCopy(dtype, tuple(t.shape), fill, lambda: to_numpy(t, copy=False))


def from_numpy(a: Any, device: str = "cpu") -> torch.Tensor:
    if isinstance(a, BFloat16):
        return torch.from_numpy(a.bits.astype(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.array(a, copy=True)).to(device)


def _configure_threads() -> int:
    n = int(os.environ.get("LOCKSTEP_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _make_deterministic() -> None:
    """GPU results must not depend on TF32 or on the kernel autotuner's choice."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _gpu_hello(dev: torch.device) -> dict[str, Any]:
    """Name, memory, local index and the physical identity (UUID, PCI bus) of our GPU."""
    from protocol.gpu import normalize_uuid, nvidia_smi_identity
    props = torch.cuda.get_device_properties(dev)
    info: dict[str, Any] = {"device_name": props.name, "device_memory": int(props.total_memory),
                            "device_index": dev.index if dev.index is not None else torch.cuda.current_device(),
                            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "device_uuid": normalize_uuid(getattr(props, "uuid", ""))}
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        info["device_pci"] = f"{getattr(props, 'pci_domain_id', 0):08X}:{bus:02X}:{getattr(props, 'pci_device_id', 0):02X}.0"
    smi = nvidia_smi_identity()
    info["nvidia_smi"] = smi
    if not info["device_uuid"] and smi.get("uuid"):
        info["device_uuid"] = smi["uuid"]
    return info


def _determinism() -> dict[str, Any]:
    """The switches that decide whether GPU math is reproducible, as they are now (for summary.json)."""
    return {"allow_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "allow_tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            **{k: os.environ.get(k) for k in ("NVIDIA_TF32_OVERRIDE", "CUBLAS_WORKSPACE_CONFIG")}}


def _discover_mixins() -> tuple[type, ...]:
    """Feature ops live in ``ops_*.py`` modules of this package, each exporting ``OPS = (SomeOps, ...)``."""
    import importlib
    import pkgutil
    found: list[type] = []
    for m in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]), key=lambda m: m.name):
        if m.name.startswith("ops_"):
            found.extend(getattr(importlib.import_module(f"{__package__}.{m.name}"), "OPS", ()))
    return tuple(found)


_MIXINS = _discover_mixins()


class TorchAdapter(*_MIXINS, Adapter):
    framework = "torch"

    def __init__(self) -> None:
        self.threads = _configure_threads()
        self.device = os.environ.get("LOCKSTEP_DEVICE", "cpu")
        if self.device.startswith("cuda"):
            _make_deterministic()
        self.model: torch.nn.Module | None = None
        self.model_info: dict[str, Any] = {}
        self.inject: list[str] = []   # deliberate bugs for negative controls, set by load_model

    def hello(self) -> dict[str, Any]:
        import transformers
        info = {"framework": "torch", "framework_version": torch.__version__,
                "libraries": {"transformers": transformers.__version__, "numpy": np.__version__},
                "device": self.device, "threads": self.threads, "platform": platform.platform(),
                "cuda_available": torch.cuda.is_available()}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            info.update(_gpu_hello(torch.device(self.device)))
        info["determinism"] = _determinism()
        from . import models
        info["injects"] = sorted(models.OP_INJECTS)   # the coordinator refuses other --torch-inject names
        return info

    # -- model ------------------------------------------------------------------------
    def op_load_model(self, body: dict, ctx: Any) -> dict:
        from . import models
        self.inject = list(body.get("inject") or [])
        check_number_injects(self.inject)   # before the model loads: a malformed one is exit 2
        self.model, self.model_info = models.load(body, self.device)
        self.model.eval()
        return self.model_info

    def _need_model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("no model loaded: send load_model first")
        return self.model

    def op_weight_specs(self, body: dict, ctx: Any) -> dict:
        sd = self._need_model().state_dict()
        return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()}

    def op_get_weights(self, body: dict, ctx: Any) -> dict:
        sd = self._need_model().state_dict()
        keys = body.get("keys") or list(sd)
        return {k: to_numpy(sd[k]) for k in keys}

    def op_set_weights(self, body: dict, ctx: Any) -> dict:
        model = self._need_model()
        sd = model.state_dict()
        unknown = [k for k in body if k not in sd]
        if unknown:
            raise KeyError(f"torch model has no parameter(s) {unknown[:5]}")
        with torch.no_grad():
            for k, v in body.items():
                t = from_numpy(v, self.device)
                if tuple(t.shape) != tuple(sd[k].shape):
                    raise ValueError(f"{k}: got shape {tuple(t.shape)}, model has {tuple(sd[k].shape)}")
                sd[k].copy_(t)
        return {"set": len(body)}

    def op_forward(self, body: dict, ctx: Any) -> dict:
        from . import models
        model = self._need_model()
        model.eval()
        inputs = {k: from_numpy(v, self.device) for k, v in body["inputs"].items()}
        with torch.no_grad():
            out = models.forward(model, self.model_info, inputs)
        return {k: to_numpy(v) for k, v in out.items()}
