"""PaddlePaddle adapter: PaddleNLP models behind the worker interface."""

from __future__ import annotations

import os
import platform
from typing import Any, Callable

import numpy as np
import paddle

from protocol.adapter import Adapter
from protocol.shared import check_number_injects
from protocol.codec import BFloat16


def to_numpy(t: Any, copy: bool = True) -> Any:
    """An owned copy by default: paddle's ``Tensor.numpy()`` already copies (checked on CPU with
    paddle 3.3.1: neither ``set_value``, an in-place ``add_`` nor an AdamW step on the tensor
    shows in an array taken before; its base is a temporary tensor), so no second copy.

    ``copy=False``: a zero-copy view of a CPU tensor through DLPack, under the same rule as the
    torch worker's (a reply of tensors nothing changes before the handler returns, or a tensor
    handed straight to ``ctx.partial``); anything DLPack refuses falls back to the copy.
    """
    if t.dtype == paddle.bfloat16:
        return BFloat16(np.array(t.view(paddle.uint16).numpy() if hasattr(t, "view") else t.numpy(), copy=True))
    if not copy:
        try:
            if t.place.is_cpu_place():
                return np.from_dlpack(t.detach())
        except (AttributeError, BufferError, RuntimeError, TypeError, ValueError):
            pass
    return t.numpy()


def state_dict(model: Any) -> dict[str, Any]:
    """``model.state_dict()`` without the second names paddle's fused RNNs (nn.LSTM/GRU/SimpleRNN)
    give their weights: ``rnn.weight_ih_l0`` is also ``rnn.0.cell.weight_ih`` (one tensor, the
    cell's view). torch has the first kind only; keeping both would leave the cell's names
    unmapped. Tied weights elsewhere keep both names (torch lists both too)."""
    sd = model.state_dict()
    cells = {n for n, layer in model.named_sublayers(include_self=True)
             if isinstance(layer, paddle.nn.RNNCellBase)}
    seen: set[int] = set()
    out: dict[str, Any] = {}
    for name, t in sd.items():
        if id(t) in seen and name.rpartition(".")[0] in cells:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def from_numpy(a: Any) -> Any:
    if isinstance(a, BFloat16):
        return paddle.to_tensor(a.to_float32()).astype("bfloat16")
    return paddle.to_tensor(np.array(a, copy=True))


def _configure() -> tuple[str, int]:
    device = os.environ.get("LOCKSTEP_DEVICE", "cpu")
    n = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)  # set by the launcher before paddle loads
    if device.startswith("gpu"):
        _make_deterministic()
    paddle.set_device(device)
    return device, n


_DETERMINISM_FLAGS = ("FLAGS_cudnn_deterministic", "FLAGS_embedding_deterministic", "FLAGS_cudnn_exhaustive_search")


def _core() -> Any:
    return getattr(getattr(paddle, "base", None), "core", None) or paddle.fluid.core  # 2.6+ / older


def _make_deterministic() -> None:
    """GPU results must not depend on TF32 or on the kernel autotuner's choice."""
    want = {"FLAGS_cudnn_deterministic": True, "FLAGS_embedding_deterministic": 1,
            "FLAGS_cudnn_exhaustive_search": False}
    for flag, value in want.items():
        try:
            paddle.set_flags({flag: value})
        except (ValueError, RuntimeError):
            pass  # the flag does not exist in this build; the report shows it as missing
    core = _core()
    for switch in ("set_cublas_switch", "set_cudnn_switch"):  # False: no TF32 in cuBLAS / cuDNN
        if hasattr(core, switch):
            getattr(core, switch)(False)


def _gpu_hello() -> dict[str, Any]:
    """Name, memory, local index and the physical identity (UUID from nvidia-smi: paddle has none)."""
    from protocol.gpu import nvidia_smi_identity
    info: dict[str, Any] = {"visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        props = paddle.device.cuda.get_device_properties()
        info["device_name"] = props.name
        info["device_memory"] = int(props.total_memory)
        info["device_index"] = int(paddle.device.get_device().partition(":")[2] or 0)
    except Exception as exc:  # report, don't fail the handshake
        info["device_error"] = str(exc)
    smi = nvidia_smi_identity()
    info["nvidia_smi"] = smi
    if smi.get("uuid"):
        info["device_uuid"] = smi["uuid"]
    return info


def _determinism() -> dict[str, Any]:
    """The switches that decide whether GPU math is reproducible, as they are now (for summary.json)."""
    out: dict[str, Any] = {}
    for flag in _DETERMINISM_FLAGS:
        try:
            out[flag] = paddle.get_flags([flag])[flag]
        except (ValueError, RuntimeError):
            out[flag] = None  # not in this build (CPU builds have no cuDNN flags)
    core = _core()
    for switch, key in (("get_cublas_switch", "allow_tf32_cublas"), ("get_cudnn_switch", "allow_tf32_cudnn")):
        out[key] = bool(getattr(core, switch)()) if hasattr(core, switch) else None
    out["NVIDIA_TF32_OVERRIDE"] = os.environ.get("NVIDIA_TF32_OVERRIDE")
    return out



def omp_rester(device: str) -> Callable[[], None] | None:
    """A function that puts Intel OpenMP's idle threads to sleep now, or None.

    Paddle's CPU kernels (MKL, oneDNN) run on Intel OpenMP, whose threads keep spinning for
    KMP_BLOCKTIME (default 200 ms) after every parallel region in case more work comes. When
    the workers take turns on the same cores, that is paddle spinning on the cores torch has
    just been handed: 0.2 CPU-seconds after every request on the reference VM. A shorter
    KMP_BLOCKTIME for the whole worker stops that but slows paddle's own passes (10 ms: its
    BERT-base backward +3-6 %, three A/B pairs; 0: its forward 1.66 -> 1.8-1.9 s), so instead,
    after each reply, one tiny parallel region runs with blocktime 0 (its threads go to sleep
    at its end; ~0.3 ms) and the blocktime is set back. None when the user set KMP_BLOCKTIME or
    OMP_WAIT_POLICY (theirs wins), off a CPU device, or without libiomp5.
    """
    if not device.startswith("cpu") or "KMP_BLOCKTIME" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return None
    import ctypes
    try:
        lib = ctypes.CDLL("libiomp5.so", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)   # only if paddle loaded it
        get_bt, set_bt = lib.kmp_get_blocktime, lib.kmp_set_blocktime
    except (OSError, AttributeError):
        return None
    a, b = paddle.ones([64, 128], dtype="float32"), paddle.ones([128, 128], dtype="float32")

    def rest() -> None:
        old = get_bt()
        set_bt(0)
        try:
            paddle.matmul(a, b)
        finally:
            set_bt(old)
    return rest


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


class PaddleAdapter(*_MIXINS, Adapter):
    framework = "paddle"

    def __init__(self) -> None:
        self.device, self.threads = _configure()
        self.after_op = omp_rester(self.device)
        self.model: Any = None
        self.model_info: dict[str, Any] = {}
        self.inject: list[str] = []   # deliberate bugs for negative controls, set by load_model

    def hello(self) -> dict[str, Any]:
        try:     # BERT presets need it; an own-model (factory) pair runs on paddle alone
            import paddlenlp
            nlp_version = paddlenlp.__version__
        except Exception as exc:   # missing, or installed but broken against this paddle
            nlp_version = f"not importable ({type(exc).__name__}: {exc})"
        info = {"framework": "paddle", "framework_version": paddle.__version__,
                "libraries": {"paddlenlp": nlp_version, "numpy": np.__version__},
                "device": self.device, "threads": self.threads, "platform": platform.platform(),
                "cuda_available": paddle.device.is_compiled_with_cuda()}
        if self.device.startswith("gpu"):
            info.update(_gpu_hello())
        info["determinism"] = _determinism()
        from . import models
        info["injects"] = sorted(models.OP_INJECTS | set(models.BUILDER_INJECTS))   # checked by the coordinator
        return info

    def op_load_model(self, body: dict, ctx: Any) -> dict:
        from . import models
        self.inject = list(body.get("inject") or [])
        check_number_injects(self.inject)   # before the model loads: a malformed one is exit 2
        self.model, self.model_info = models.load(body)
        self.model.eval()
        return self.model_info

    def _need_model(self) -> Any:
        if self.model is None:
            raise RuntimeError("no model loaded: send load_model first")
        return self.model

    def op_weight_specs(self, body: dict, ctx: Any) -> dict:
        sd = state_dict(self._need_model())
        return {k: [list(v.shape), str(v.dtype).replace("paddle.", "")] for k, v in sd.items()}

    def op_get_weights(self, body: dict, ctx: Any) -> dict:
        sd = state_dict(self._need_model())
        keys = body.get("keys") or list(sd)
        return {k: to_numpy(sd[k]) for k in keys}

    def op_set_weights(self, body: dict, ctx: Any) -> dict:
        sd = state_dict(self._need_model())
        unknown = [k for k in body if k not in sd]
        if unknown:
            raise KeyError(f"paddle model has no parameter(s) {unknown[:5]}")
        for k, v in body.items():
            arr = v.to_float32() if isinstance(v, BFloat16) else np.asarray(v)
            if tuple(arr.shape) != tuple(sd[k].shape):
                raise ValueError(f"{k}: got shape {tuple(arr.shape)}, model has {tuple(sd[k].shape)}")
            sd[k].set_value(arr.astype(str(sd[k].dtype).replace("paddle.", "")) if not isinstance(v, BFloat16) else arr)
        return {"set": len(body)}

    def op_save_weights(self, body: dict, ctx: Any) -> dict:
        """Write the converted state dict as a .pdparams that paddle.load reads."""
        path = body["path"]
        paddle.save(self._need_model().state_dict(), path)
        return {"path": path, "bytes": os.path.getsize(path)}

    def op_forward(self, body: dict, ctx: Any) -> dict:
        from . import models
        model = self._need_model()
        model.eval()
        inputs = {k: from_numpy(v) for k, v in body["inputs"].items()}
        with paddle.no_grad():
            out = models.forward(model, self.model_info, inputs)
        return {k: to_numpy(v) for k, v in out.items()}
