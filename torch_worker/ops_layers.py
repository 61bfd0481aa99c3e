"""Layer-by-layer capture (step ``layers``, command ``debug``): hooks stream every mapped
module's input and output during forward, then the activation and parameter gradients
during one backward pass, each as a partial reply the moment it exists.

Hooks live only inside ``_Capture`` (a context manager): registered on enter, removed on
exit, so a failed capture never leaves a hook behind. An input that is the very tensor a
captured module just returned is sent as a reference (``ref``) instead of a second copy.
``replay`` runs one named module on a given input with the other arguments it received
during the last capture (attention masks and the like), optionally backward too.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from typing import Any, Callable

import torch

from .adapter import DIRECT_COPIES, from_numpy, to_numpy, to_wire
from protocol.shared import NoHooks as _NoHooks

WINDOW = 16   # recent outputs remembered for input references (they stay alive while listed)


def first_tensor(x: Any) -> torch.Tensor | None:
    """The primary tensor of a module's input/output: a tensor, or the first one in a tuple/dict/ModelOutput."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for v in x:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def _slot(args: tuple, kwargs: dict) -> tuple[str, Any] | None:
    """Where the primary input sits: ("arg", i) or ("kw", name)."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return ("arg", i)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return ("kw", k)
    return None


def _call_record(slot: tuple[str, Any] | None, args: tuple, kwargs: dict) -> tuple:
    """The call minus its primary input (the coordinator sends that), other tensors detached.

    Keeping the primary input, or anything attached to the autograd graph, would hold every
    activation of the model alive until the next capture.
    """
    def light(v: Any) -> Any:
        return v.detach() if isinstance(v, torch.Tensor) else v
    a = [light(v) for v in args]
    kw = {k: light(v) for k, v in kwargs.items()}
    if slot is not None:
        if slot[0] == "arg":
            a[slot[1]] = None
        else:
            kw[slot[1]] = None
    return slot, tuple(a), kw


def _key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's data: two views with the same storage, layout and dtype are the same tensor."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype))


class _Capture:
    """Registers forward hooks (and, for backward, tensor hooks) on the named modules; removes them on exit."""

    def __init__(self, model: torch.nn.Module, names: list[str] | None, send: Callable[[dict], None],
                 backward: bool, calls: dict[str, tuple], forward_events: bool = True):
        self.model, self.send, self.backward = model, send, backward
        modules = dict(model.named_modules())
        wanted = list(modules) if names is None else names
        missing = [n for n in wanted if n not in modules]
        if missing:
            raise KeyError(f"torch model has no module(s) {missing[:5]} (asked to capture them)")
        self.sent = set(wanted)       # streamed; every other module is only tracked (who made a tensor)
        self.targets = modules
        self.handles: list[Any] = []
        self.window: OrderedDict[tuple, tuple[list[str], torch.Tensor]] = OrderedDict()
        self.calls = calls          # name -> (slot, args, kwargs) of the first call, for replay
        self.seq = 0
        self.seconds = 0.0          # time spent inside hooks (copying + sending)
        self.forward_events = forward_events   # False: only gradients are streamed

    def __enter__(self) -> "_Capture":
        self.calls.clear()
        for name, mod in self.targets.items():
            if name in self.sent:
                self.handles.append(mod.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.window.clear()

    def _remember(self, y: Any, name: str) -> list[str]:
        """Note that ``name`` returned ``y``; returns every module known to have returned it."""
        k = _key(y)
        hit = self.window.get(k)
        if hit is not None:
            hit[0].append(name)
            self.window.move_to_end(k)
            return hit[0]
        self.window[k] = ([name], y)
        if len(self.window) > WINDOW:
            self.window.popitem(last=False)
        return [name]

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _pre(self, name: str) -> Callable:
        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            t0 = time.perf_counter()
            slot = _slot(args, kwargs)
            x = None if slot is None else (args[slot[1]] if slot[0] == "arg" else kwargs[slot[1]])
            if name not in self.calls:
                self.calls[name] = _call_record(slot, args, kwargs)
            if not self.forward_events:
                return
            ev: dict[str, Any] = {"ev": "in", "module": name, "seq": self._next()}
            if x is not None:
                hit = self.window.get(_key(x))
                made_by = list(hit[0]) if hit is not None else []
                sent = [n for n in made_by if n in self.sent]
                if sent:
                    ev["ref"] = sent
                else:
                    ev["tensor"] = to_wire(x)  # send() = ctx.partial: snapshots
                    ev["made_by"] = made_by
            self.send(ev)
            self.seconds += time.perf_counter() - t0
        return hook

    def _post(self, name: str) -> Callable:
        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            t0 = time.perf_counter()
            y = first_tensor(out)
            if name not in self.sent:
                if y is not None:
                    self._remember(y, name)
                return
            if not self.forward_events:
                if self.backward and y is not None and y.requires_grad:
                    self.handles.append(y.register_hook(self._grad(name)))
                return
            ev: dict[str, Any] = {"ev": "out", "module": name, "seq": self._next(), "type": type(mod).__name__}
            if y is not None:
                same = [n for n in self._remember(y, name)[:-1] if n in self.sent]
                if same:
                    ev["same_as"] = same        # the coordinator has these bytes already
                else:
                    ev["tensor"] = to_wire(y)
                if self.backward and y.requires_grad:
                    self.handles.append(y.register_hook(self._grad(name)))
            self.send(ev)
            self.seconds += time.perf_counter() - t0
        return hook

    def _grad(self, name: str) -> Callable:
        def hook(g: torch.Tensor) -> None:
            t0 = time.perf_counter()
            self.send({"ev": "grad", "module": name, "seq": self._next(), "tensor": to_wire(g)})
            self.seconds += time.perf_counter() - t0
        return hook

    def hook_params(self) -> None:
        """Stream each parameter's gradient as autograd produces it."""
        for pname, p in self.model.named_parameters():
            if p.requires_grad:
                self.handles.append(p.register_hook(self._param_grad(pname)))

    def _param_grad(self, pname: str) -> Callable:
        def hook(g: torch.Tensor) -> None:
            t0 = time.perf_counter()
            self.send({"ev": "param_grad", "param": pname, "seq": self._next(), "tensor": to_wire(g)})
            self.seconds += time.perf_counter() - t0
        return hook


def _tree(model: torch.nn.Module) -> list[dict[str, Any]]:
    out = []
    for name, mod in model.named_modules():
        out.append({"name": name, "type": type(mod).__name__,
                    "params": [p for p, _ in mod.named_parameters(recurse=False)],
                    "children": [c for c, _ in mod.named_children()], "settings": _settings(mod)})
    return out


def _settings(mod: torch.nn.Module) -> str:
    """The module's own settings as it prints them (``eps=1e-05, momentum=0.1``, ...): shown next to
    an own error, where a differing epsilon or flag is usually the bug. One line, capped."""
    try:
        text = " ".join(str(mod.extra_repr()).split())
    except Exception:   # a user module's extra_repr may fail; it is only shown
        return ""
    return text[:300]


def _rnns_for_backward(model: torch.nn.Module) -> None:
    """cuDNN's RNN kernels have no backward in eval mode ("cudnn RNN backward can only be called in
    training mode"); with dropout 0, train mode computes the same numbers, so nn.LSTM/GRU/RNN
    layers train for a backward pass (the paddle worker does the same for its fused RNN op)."""
    for module in model.modules():
        if isinstance(module, torch.nn.RNNBase) and not module.dropout:
            module.train()


class LayerOps:
    def op_module_tree(self, body: dict, ctx: Any) -> dict:
        """Every named module in definition order: type, direct parameter names, children."""
        return {"framework": "torch", "modules": _tree(self._need_model())}

    def op_capture_layers(self, body: dict, ctx: Any) -> dict:
        """Forward (and optionally one backward) with hooks on ``modules``; every tensor is a partial reply.

        Body: ``inputs``; ``modules`` (names to stream, None = all; every other module is only
        tracked, to tell who made an input); ``backward`` (bool); ``labels`` for the cross-entropy
        loss; ``param_grads`` (bool); ``forward_events`` (False: stream only gradients);
        ``hooks`` (False: the same pass with no hook at all, the benchmark's baseline). Dropout
        is off (eval mode); gradients are cleared afterwards so no later step sees them.
        """
        from . import models
        from .ops_train import training_loss
        model = self._need_model()
        model.eval()
        inputs = {k: from_numpy(v, self.device) for k, v in body["inputs"].items()}
        backward = bool(body.get("backward"))
        self._layer_calls: dict[str, tuple] = {}
        t0, direct0 = time.perf_counter(), DIRECT_COPIES[0]
        send = functools.partial(ctx.partial, batch=True)  # a message per hook: batched (RequestContext.partial)
        cap_cm = _Capture(model, body.get("modules"), send, backward, self._layer_calls,
                          bool(body.get("forward_events", True))) if body.get("hooks", True) else _NoHooks()
        with cap_cm as cap:
            reply: dict[str, Any] = {}
            if backward:
                if body.get("param_grads", True):
                    cap.hook_params()
                model.zero_grad(set_to_none=True)
                _rnns_for_backward(model)
                with torch.enable_grad():
                    out = models.forward(model, self.model_info, inputs)
                    labels = from_numpy(body["labels"], self.device)
                    loss = training_loss(out, labels, self.model_info, models, model, inputs,
                                         torch.nn.functional.cross_entropy)   # a factory's own loss, if any
                    ctx.partial({"ev": "loss", "seq": cap._next(), "tensor": to_numpy(loss)})
                    loss.backward()
                reply["loss"] = float(loss.detach())
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    out = models.forward(model, self.model_info, inputs)
            reply.update(seconds=time.perf_counter() - t0, hook_seconds=cap.seconds, events=cap.seq,
                         direct_copies=DIRECT_COPIES[0] - direct0)
        return reply

    def op_replay(self, body: dict, ctx: Any) -> dict:
        """Run one module on ``input`` with the other arguments of its last captured call.

        With ``grad_output`` also runs backward and returns the input's and the module's
        parameter gradients (names relative to the module).
        """
        name = body["module"]
        calls = getattr(self, "_layer_calls", {})
        if name not in calls:
            raise KeyError(f"torch module {name!r} was not executed during the last capture_layers; "
                           f"nothing to replay it with")
        slot, args, kwargs = calls[name]
        mod = dict(self._need_model().named_modules())[name]
        x = from_numpy(body["input"], self.device)
        grad_out = body.get("grad_output")
        if grad_out is not None and x.is_floating_point():
            x.requires_grad_(True)
        args, kwargs = list(args), dict(kwargs)
        if slot is None:
            raise ValueError(f"torch module {name!r} took no tensor input; cannot replay it")
        if slot[0] == "arg":
            args[slot[1]] = x
        else:
            kwargs[slot[1]] = x
        t0 = time.perf_counter()
        if grad_out is None:
            probed: dict[str, Any] = {}
            handle = None
            if body.get("probe"):
                # the input a sub-module receives while its parent replays (functional code in between)
                sub = dict(self._need_model().named_modules()).get(body["probe"])
                if sub is None:
                    raise KeyError(f"torch model has no module {body['probe']!r} to probe")
                def probe(m: Any, a: tuple, kw: dict) -> None:
                    probed.setdefault("x", first_tensor((a, kw)))
                handle = sub.register_forward_pre_hook(probe, with_kwargs=True)
            try:
                with torch.no_grad():
                    y = first_tensor(mod(*args, **kwargs))
            finally:
                if handle is not None:
                    handle.remove()
            reply = {"output": to_numpy(y), "seconds": time.perf_counter() - t0}
            if "x" in probed:
                reply["probe_input"] = to_numpy(probed["x"])
            return reply
        params = dict(mod.named_parameters())
        _rnns_for_backward(self._need_model())
        with torch.enable_grad():
            y = first_tensor(mod(*args, **kwargs))
            wrt = ([x] if x.requires_grad else []) + list(params.values())
            grads = torch.autograd.grad(y, wrt, grad_outputs=from_numpy(grad_out, self.device), allow_unused=True)
        reply: dict[str, Any] = {"output": to_numpy(y.detach()), "seconds": time.perf_counter() - t0}
        if x.requires_grad:
            reply["grad_input"] = to_numpy(grads[0]) if grads[0] is not None else None
            grads = grads[1:]
        reply["param_grads"] = {n: to_numpy(g) for n, g in zip(params, grads) if g is not None}
        return reply


OPS = (LayerOps,)
