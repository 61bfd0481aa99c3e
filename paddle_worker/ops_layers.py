"""Layer-by-layer capture (step ``layers``, command ``debug``), the paddle twin of
``torch_worker/ops_layers.py``: hooks stream every mapped layer's input and output during
forward, then activation and parameter gradients during one backward pass, each as a
partial reply the moment it exists.

Some of PaddleNLP's work is a function, not a layer: ``TransformerEncoderLayer`` applies
``self.activation`` (GELU) as a plain function. Such activation attributes are reported
in the module tree as pseudo-layers ``<layer>.<attr>`` (type ``function:<name>``) and are
captured by temporarily wrapping the attribute, so the GELU output can be compared and
replayed on its own. Every hook and wrapper lives only inside ``_Capture``.
"""

from __future__ import annotations

import functools
import re
import time
import types
from collections import OrderedDict
from typing import Any, Callable

import paddle

from .adapter import from_numpy, state_dict, to_numpy
from protocol.shared import NoHooks as _NoHooks

WINDOW = 16   # recent outputs remembered for input references (kept alive while listed)
ACT_ATTR = re.compile(r"(^|_)(act|activation|act_fn|activation_fn|hidden_act_fn)$")


def _owned(t: Any) -> Any:
    """What a hook streams: a zero-copy DLPack view (``to_numpy(copy=False)``), because every
    caller hands it straight to ``ctx.partial``, which snapshots it (into the shared-memory ring
    or ZeroMQ's buffers) before the layer's tensor can change. All-layer capture moves ~330 MB
    per BERT-base forward: this is its only copy on the worker's side."""
    return to_numpy(t, copy=False)


def first_tensor(x: Any) -> Any:
    if isinstance(x, paddle.Tensor):
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
    for i, a in enumerate(args):
        if isinstance(a, paddle.Tensor):
            return ("arg", i)
    for k, v in kwargs.items():
        if isinstance(v, paddle.Tensor):
            return ("kw", k)
    return None


def _call_record(slot: tuple[str, Any] | None, args: tuple, kwargs: dict) -> tuple:
    """The call minus its primary input, other tensors detached (see the torch twin for why)."""
    def light(v: Any) -> Any:
        return v.detach() if isinstance(v, paddle.Tensor) else v
    a = [light(v) for v in args]
    kw = {k: light(v) for k, v in kwargs.items()}
    if slot is not None:
        if slot[0] == "arg":
            a[slot[1]] = None
        else:
            kw[slot[1]] = None
    return slot, tuple(a), kw


def _key(t: Any) -> tuple:
    # the dtype object itself (hashable): str() of it costs ~1 us in paddle 3, on every hook
    return (t.data_ptr(), tuple(t.shape), tuple(getattr(t, "strides", ()) or ()), t.dtype)


def function_attrs(model: paddle.nn.Layer) -> list[tuple[str, paddle.nn.Layer, str, Callable]]:
    """(pseudo name, owning layer, attribute, function) for activation functions held as attributes."""
    found = []
    for name, layer in model.named_sublayers(include_self=True):
        for attr, val in vars(layer).items():
            if ACT_ATTR.search(attr) and isinstance(val, (types.FunctionType, types.BuiltinFunctionType)):
                found.append((f"{name}.{attr}" if name else attr, layer, attr, val))
    return found


class _Capture:
    def __init__(self, model: paddle.nn.Layer, names: list[str] | None, send: Callable[[dict], None],
                 backward: bool, calls: dict[str, tuple], forward_events: bool = True):
        self.model, self.send, self.backward = model, send, backward
        layers = dict(model.named_sublayers(include_self=True))
        funcs = {n: (layer, attr, fn) for n, layer, attr, fn in function_attrs(model)}
        wanted = list(layers) + list(funcs) if names is None else names
        missing = [n for n in wanted if n not in layers and n not in funcs]
        if missing:
            raise KeyError(f"paddle model has no layer(s) {missing[:5]} (asked to capture them)")
        self.sent = set(wanted)       # streamed; every other layer is only tracked (who made a tensor)
        self.layers = layers
        self.funcs = funcs
        self.handles: list[Any] = []
        self.window: OrderedDict[tuple, tuple[list[str], Any]] = OrderedDict()
        self.calls = calls
        self.seq = 0
        self.seconds = 0.0
        self.forward_events = forward_events   # False: only gradients are streamed

    def __enter__(self) -> "_Capture":
        self.calls.clear()
        # Only streamed layers are hooked: a hook puts paddle's Layer.__call__ on its slow path, and
        # who-made-this-input is torch's to tell (the coordinator decides input rows from torch's side).
        for name, layer in self.layers.items():
            if name in self.sent:
                self.handles.append(layer.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                self.handles.append(layer.register_forward_post_hook(self._post(name, type(layer).__name__),
                                                                     with_kwargs=True))
        self.funcs = {n: f for n, f in self.funcs.items() if n in self.sent}
        for name, (layer, attr, fn) in self.funcs.items():
            setattr(layer, attr, self._wrap(name, fn))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, (layer, attr, fn) in self.funcs.items():
            setattr(layer, attr, fn)
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

    def _wrap(self, name: str, fn: Callable) -> Callable:
        pre, post = self._pre(name), self._post(name, f"function:{getattr(fn, '__name__', 'fn')}")

        def wrapper(x: Any, *a: Any, **kw: Any) -> Any:
            if name in self.sent:
                pre(None, (x, *a), kw)
            y = fn(x, *a, **kw)
            post(None, (x, *a), kw, y)
            return y
        return wrapper

    def _pre(self, name: str) -> Callable:
        def hook(layer: Any, args: tuple, kwargs: dict) -> None:
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
                    ev["tensor"] = _owned(x)
                    ev["made_by"] = made_by
            self.send(ev)
            self.seconds += time.perf_counter() - t0
        return hook

    def _post(self, name: str, type_name: str) -> Callable:
        def hook(layer: Any, args: tuple, kwargs: dict, out: Any) -> None:
            t0 = time.perf_counter()
            y = first_tensor(out)
            if name not in self.sent:
                if y is not None:
                    self._remember(y, name)
                return
            if not self.forward_events:
                if self.backward and y is not None and not y.stop_gradient:
                    self.handles.append(y.register_hook(self._grad(name)))
                return
            ev: dict[str, Any] = {"ev": "out", "module": name, "seq": self._next(), "type": type_name}
            if y is not None:
                same = [n for n in self._remember(y, name)[:-1] if n in self.sent]
                if same:
                    ev["same_as"] = same        # the coordinator has these bytes already
                else:
                    ev["tensor"] = _owned(y)
                if self.backward and not y.stop_gradient:
                    self.handles.append(y.register_hook(self._grad(name)))
            self.send(ev)
            self.seconds += time.perf_counter() - t0
        return hook

    def _grad(self, name: str) -> Callable:
        def hook(g: Any) -> None:
            t0 = time.perf_counter()
            self.send({"ev": "grad", "module": name, "seq": self._next(), "tensor": _owned(g)})
            self.seconds += time.perf_counter() - t0
        return hook

    def hook_params(self) -> None:
        for pname, p in self.model.named_parameters():
            if not p.stop_gradient:
                self.handles.append(p.register_hook(self._param_grad(pname)))

    def _param_grad(self, pname: str) -> Callable:
        def hook(g: Any) -> None:
            t0 = time.perf_counter()
            self.send({"ev": "param_grad", "param": pname, "seq": self._next(), "tensor": _owned(g)})
            self.seconds += time.perf_counter() - t0
        return hook


class _Probe(dict):
    """Records the first input a named layer (or activation pseudo-layer) receives; undone on exit."""

    def __init__(self, model: paddle.nn.Layer, name: str | None):
        super().__init__()
        self.model, self.name, self.undo = model, name, None

    def __enter__(self) -> "_Probe":
        if not self.name:
            return self
        layers = dict(self.model.named_sublayers(include_self=True))
        if self.name in layers:
            def probe(layer: Any, a: tuple, kw: dict) -> None:
                self.setdefault("x", first_tensor((a, kw)))
            h = layers[self.name].register_forward_pre_hook(probe, with_kwargs=True)
            self.undo = h.remove
            return self
        for pseudo, layer, attr, fn in function_attrs(self.model):
            if pseudo == self.name:
                def wrapper(x: Any, *a: Any, **kw: Any) -> Any:
                    self.setdefault("x", x)
                    return fn(x, *a, **kw)
                setattr(layer, attr, wrapper)
                self.undo = lambda: setattr(layer, attr, fn)
                return self
        raise KeyError(f"paddle model has no layer {self.name!r} to probe")

    def __exit__(self, *exc: Any) -> None:
        if self.undo is not None:
            self.undo()


def _tree(model: paddle.nn.Layer) -> list[dict[str, Any]]:
    out = []
    funcs: dict[str, list[tuple[str, Callable]]] = {}
    for pseudo, layer, attr, fn in function_attrs(model):
        owner = pseudo.rsplit(".", 1)[0] if "." in pseudo else ""
        funcs.setdefault(owner, []).append((pseudo, fn))
    own = set(state_dict(model))   # an RNN cell's second names for its RNN's weights are not its own
    for name, layer in model.named_sublayers(include_self=True):
        children = [c for c, _ in layer.named_children()]
        fn_children = funcs.get(name, [])
        out.append({"name": name, "type": type(layer).__name__,
                    # BatchNorm's running statistics are parameters here but buffers in torch (whose
                    # tree lists parameters only): counted, they would leave every container holding
                    # a BatchNorm without its torch counterpart, and its activations uncompared
                    "params": [p for p, t in layer.named_parameters(include_sublayers=False)
                               if (f"{name}.{p}" if name else p) in own
                               and not (p in ("_mean", "_variance") and t.stop_gradient)],
                    "children": children + [p.rsplit(".", 1)[-1] for p, _ in fn_children],
                    "settings": _settings(layer)})
        for pseudo, fn in fn_children:
            out.append({"name": pseudo, "type": f"function:{getattr(fn, '__name__', 'fn')}", "params": [],
                        "children": [], "function": True})
    return out


def _settings(layer: paddle.nn.Layer) -> str:
    """The layer's own settings as it prints them (``epsilon=1e-05``, ...), one line, capped (as the
    torch worker's)."""
    try:
        text = " ".join(str(layer.extra_repr()).split())
    except Exception:   # a user layer's extra_repr may fail; it is only shown
        return ""
    return text[:300]


class LayerOps:
    def op_module_tree(self, body: dict, ctx: Any) -> dict:
        """Every named layer in definition order (plus activation-function pseudo-layers)."""
        return {"framework": "paddle", "modules": _tree(self._need_model())}

    @staticmethod
    def _rnns_for_backward(model: Any) -> None:
        """Paddle's fused RNN op (nn.LSTM/GRU/SimpleRNN) has no backward in eval mode ("Tensor holds
        no memory"). With dropout 0 its train mode computes the same numbers, so such layers train
        for a backward pass; with dropout > 0 they stay in eval and the error says what to do."""
        from paddle.nn.layer.rnn import RNNBase
        for _name, layer in model.named_sublayers(include_self=True):
            if isinstance(layer, RNNBase) and not float(getattr(layer, "dropout", 0.0) or 0.0):
                layer.train()

    def op_capture_layers(self, body: dict, ctx: Any) -> dict:
        """See the torch twin: forward (and one backward) with hooks, every tensor a partial reply."""
        from . import models
        from .ops_train import training_loss
        model = self._need_model()
        model.eval()
        inputs = {k: from_numpy(v) for k, v in body["inputs"].items()}
        backward = bool(body.get("backward"))
        self._layer_calls: dict[str, tuple] = {}
        t0 = time.perf_counter()
        send = functools.partial(ctx.partial, batch=True)  # a message per hook: batched (RequestContext.partial)
        cap_cm = _Capture(model, body.get("modules"), send, backward, self._layer_calls,
                          bool(body.get("forward_events", True))) if body.get("hooks", True) else _NoHooks()
        with cap_cm as cap:
            reply: dict[str, Any] = {}
            if backward:
                if body.get("param_grads", True):
                    cap.hook_params()
                self._rnns_for_backward(model)
                model.clear_gradients()
                out = models.forward(model, self.model_info, inputs)
                labels = from_numpy(body["labels"])
                loss = training_loss(out, labels, self.model_info, models, model, inputs,
                                     paddle.nn.functional.cross_entropy)   # a factory's own loss, if any
                ctx.partial({"ev": "loss", "seq": cap._next(), "tensor": _owned(loss)})
                loss.backward()
                reply["loss"] = float(loss.detach())
                model.clear_gradients()
            else:
                with paddle.no_grad():
                    out = models.forward(model, self.model_info, inputs)
            reply.update(seconds=time.perf_counter() - t0, hook_seconds=cap.seconds, events=cap.seq)
        return reply

    def op_replay(self, body: dict, ctx: Any) -> dict:
        """Run one layer (or activation pseudo-layer) on ``input`` with the rest of its last captured call."""
        name = body["module"]
        calls = getattr(self, "_layer_calls", {})
        if name not in calls:
            raise KeyError(f"paddle layer {name!r} was not executed during the last capture_layers; "
                           f"nothing to replay it with")
        slot, args, kwargs = calls[name]
        model = self._need_model()
        layers = dict(model.named_sublayers(include_self=True))
        if name in layers:
            fn: Callable = layers[name]
        else:
            funcs = {n: f for n, _, _, f in function_attrs(model)}
            if name not in funcs:
                raise KeyError(f"paddle model has no layer {name!r}")
            fn = funcs[name]
        if slot is None:
            raise ValueError(f"paddle layer {name!r} took no tensor input; cannot replay it")
        x = from_numpy(body["input"])
        grad_out = body.get("grad_output")
        if grad_out is not None and x.dtype in (paddle.float32, paddle.float64, paddle.float16, paddle.bfloat16):
            x.stop_gradient = False
        args, kwargs = list(args), dict(kwargs)
        if slot[0] == "arg":
            args[slot[1]] = x
        else:
            kwargs[slot[1]] = x
        t0 = time.perf_counter()
        if grad_out is None:
            with _Probe(model, body.get("probe")) as probed, paddle.no_grad():
                y = first_tensor(fn(*args, **kwargs))
            reply = {"output": to_numpy(y), "seconds": time.perf_counter() - t0}
            if "x" in probed:
                reply["probe_input"] = to_numpy(probed["x"])
            return reply
        params = dict(fn.named_parameters()) if isinstance(fn, paddle.nn.Layer) else {}
        self._rnns_for_backward(model)
        y = first_tensor(fn(*args, **kwargs))
        wrt = ([x] if not x.stop_gradient else []) + list(params.values())
        grads = paddle.grad([y], wrt, grad_outputs=[from_numpy(grad_out)], allow_unused=True)
        reply: dict[str, Any] = {"output": to_numpy(y.detach()), "seconds": time.perf_counter() - t0}
        if not x.stop_gradient:
            reply["grad_input"] = to_numpy(grads[0]) if grads[0] is not None else None
            grads = grads[1:]
        reply["param_grads"] = {n: to_numpy(g) for n, g in zip(params, grads) if g is not None}
        return reply


OPS = (LayerOps,)
