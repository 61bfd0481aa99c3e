"""Op ``param_info``: what automatic weight mapping needs to know about every state-dict entry.

Per entry: name, shape, dtype, owning layer path and class, and whether it is a buffer
(BatchNorm's ``_mean`` / ``_variance``). With ``inputs`` in the body it also runs one eval
forward with pre-hooks on every layer that owns tensors, and returns the order in which
those layers are first called.
"""

from __future__ import annotations

from typing import Any

import paddle

from .adapter import from_numpy, state_dict


class ParamOps:
    def op_param_info(self, body: dict, ctx: Any) -> dict:
        model = self._need_model()
        layers = dict(model.named_sublayers(include_self=True))
        buffers = {n for n, _ in model.named_buffers()}
        params = []
        for name, t in state_dict(model).items():
            path = name.rpartition(".")[0]
            owner = layers.get(path)
            params.append({"name": name, "shape": [int(d) for d in t.shape],
                           "dtype": str(t.dtype).replace("paddle.", ""), "module": path,
                           "module_type": type(owner).__name__ if owner is not None else "?",
                           "buffer": name in buffers})
        out: dict[str, Any] = {"params": params}
        if body.get("inputs"):
            out["call_order"] = self._param_call_order(model, {p["module"] for p in params}, body["inputs"])
        return out

    def _param_call_order(self, model: paddle.nn.Layer, owners: set[str], inputs: dict) -> list[str]:
        from . import models
        order: list[str] = []
        handles = []
        for path, layer in model.named_sublayers(include_self=True):
            if path in owners:
                handles.append(layer.register_forward_pre_hook(
                    lambda lay, args, p=path: order.append(p) if p not in order else None))
        try:
            model.eval()
            with paddle.no_grad():
                models.forward(model, self.model_info, {k: from_numpy(v) for k, v in inputs.items()})
        finally:
            for h in handles:
                h.remove()
        return order


OPS = (ParamOps,)
