"""Op ``param_info``: what automatic weight mapping needs to know about every state-dict entry.

Per entry: name, shape, dtype, owning module path and class, and whether it is a buffer.
With ``inputs`` in the body it also runs one eval forward with pre-hooks on every module
that owns tensors, and returns the order in which those modules are first called.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapter import from_numpy


class ParamOps:
    def op_param_info(self, body: dict, ctx: Any) -> dict:
        model = self._need_model()
        modules = dict(model.named_modules())
        buffers = {n for n, _ in model.named_buffers()}
        params = []
        first: dict[tuple, str] = {}   # tied weights: the same tensor under a second name
        for name, t in model.state_dict().items():
            path = name.rpartition(".")[0]
            owner = modules.get(path)
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype)) if t.numel() else (name,)
            alias = first.setdefault(key, name)
            params.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                           "module": path, "module_type": type(owner).__name__ if owner is not None else "?",
                           "buffer": name in buffers, "alias_of": alias if alias != name else ""})
        out: dict[str, Any] = {"params": params}
        if body.get("inputs"):
            out["call_order"] = self._param_call_order(model, {p["module"] for p in params}, body["inputs"])
        return out

    def _param_call_order(self, model: torch.nn.Module, owners: set[str], inputs: dict) -> list[str]:
        from . import models
        order: list[str] = []
        handles = []
        for path, m in model.named_modules():
            if path in owners:
                handles.append(m.register_forward_pre_hook(
                    lambda mod, args, p=path: order.append(p) if p not in order else None))
        try:
            model.eval()
            with torch.no_grad():
                models.forward(model, self.model_info, {k: from_numpy(v, self.device) for k, v in inputs.items()})
        finally:
            for h in handles:
                h.remove()
        return order


OPS = (ParamOps,)
