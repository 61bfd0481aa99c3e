"""A numpy-only worker for tests: speaks the real protocol, needs no framework.

Run as ``python tests/fake_worker.py <flavor> --connect ...`` where flavor is ``torch``
(Linear weights stored [out, in]) or ``paddle`` ([in, out]). Faults are injected with
``LOCKSTEP_FAKE_FAULT_<FLAVOR>``, a comma list of:
  exit-before-hello, wrong-version, wrong-framework, bad-hello, kill@<op>, exit@<op>, hang@<op>,
  nan@forward, bug@forward (paddle computes with a wrong bias), garbage@<op>.
Robustness faults (tests/test_faults.py): <op> may also be ``hello`` (before HELLO) or
``forward-partial`` (after the first partial reply was sent, i.e. while replying);
  hangnoterm@<op>   ignore SIGTERM and spin in C holding the GIL (a stuck extension)
  slow=<s>@<op>     sleep <s> seconds (default 30), then carry on
  sysexit=<n>@<op>  raise SystemExit(n) inside the op (a user's factory or model calling sys.exit)
  silent-before-hello  never connect
  garbageonly@forward  send a malformed message instead of the reply, then hang
  dup@forward, stale@forward  an extra duplicate reply / a reply with a stale request id
  nested@forward    the logits as a nested dict (a reply no step expects)
  badset@set_weights  store one element of the first key one ULP off (a silently lossy weight load)
``LOCKSTEP_FAKE_STAMP_DIR`` (optional): write ``<flavor>.pid`` at start and
``<flavor>.<fault>`` (holding time.time()) just before a fault fires, so tests can
measure detection time and find the processes.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from protocol.adapter import Adapter, main  # noqa: E402
from protocol.codec import encode  # noqa: E402

FLAVOR = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "torch"
FAULTS = [f for f in os.environ.get(f"LOCKSTEP_FAKE_FAULT_{FLAVOR.upper()}", "").split(",") if f]
STAMPS = os.environ.get("LOCKSTEP_FAKE_STAMP_DIR")


def stamp(what: str) -> None:
    if STAMPS:
        path = os.path.join(STAMPS, f"{FLAVOR}.{what}")
        with open(path + ".tmp", "w") as f:
            f.write(repr(time.time()))
        os.replace(path + ".tmp", path)


def fault(op: str) -> None:
    print(f"fake {FLAVOR}: op {op}", file=sys.stderr, flush=True)
    for f in FAULTS:
        what, _, where = f.partition("@")
        if where != op:
            continue
        what, _, arg = what.partition("=")
        if what in ("kill", "exit", "hang", "hangnoterm", "slow"):
            stamp(f"{what}@{op}")
        if what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if what == "exit":
            os._exit(17)
        if what == "hang":
            while True:
                time.sleep(1)
        if what == "hangnoterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:  # sum() over a C iterator never returns to the eval loop: holds the GIL
                sum(itertools.repeat(1, 10**12))
        if what == "slow":
            time.sleep(float(arg or 30))
        if what == "sysexit":   # user code calling sys.exit() inside an op
            raise SystemExit(int(arg or 3))


class FakeAdapter(Adapter):
    framework = FLAVOR

    def __init__(self) -> None:
        self.w: dict[str, np.ndarray] = {}

    def hello(self) -> dict:
        fault("hello")
        fw = "tensorflow" if "wrong-framework" in FAULTS else FLAVOR
        info = {"framework": fw, "framework_version": "fake-0", "device": "cpu",
                "threads": int(os.environ.get("LOCKSTEP_THREADS") or 0) or None}
        if "bad-hello" in FAULTS:   # fields of the wrong type, as a rogue peer could send
            info.update(device_uuid={"a": 1}, threads="two", determinism={"x": [1, 2]})
        return info

    def op_load_model(self, body: dict, ctx) -> dict:
        fault("load_model")
        rng = np.random.RandomState(int(body.get("seed", 0)) + (0 if FLAVOR == "torch" else 99))
        shapes = {"fc1.weight": (8, 4), "fc1.bias": (8,), "fc2.weight": (2, 8), "fc2.bias": (2,)}
        for k, s in shapes.items():
            a = rng.standard_normal(s).astype(np.float32)
            self.w[k] = a.T.copy() if (FLAVOR == "paddle" and a.ndim == 2) else a
        return {"kind": "fake_mlp", "config": {"in": 4}, "default_mapping": body.get("mapping"),
                "inputs": [{"name": "x", "shape": [4, 4], "dtype": "float32"}], "n_params": 58}

    def op_weight_specs(self, body, ctx) -> dict:
        fault("weight_specs")
        return {k: [list(v.shape), str(v.dtype)] for k, v in self.w.items()}

    def op_get_weights(self, body, ctx) -> dict:
        fault("get_weights")
        keys = body.get("keys") or list(self.w)
        return {k: self.w[k].copy() for k in keys}

    def op_set_weights(self, body, ctx) -> dict:
        fault("set_weights")
        for k, v in body.items():
            if k not in self.w:
                raise KeyError(f"fake model has no parameter {k!r}")
            self.w[k] = np.array(v, dtype=np.float32)
        if "badset@set_weights" in FAULTS:   # a set_weights that silently corrupts: one ULP, one element
            k = sorted(body)[0]
            self.w[k].flat[0] = np.nextafter(self.w[k].flat[0], np.float32(np.inf), dtype=np.float32)
        return {"set": len(body)}

    def op_save_weights(self, body, ctx) -> dict:
        np.savez(body["path"] + ".npz", **self.w)
        return {"path": body["path"] + ".npz"}

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        w = self.w[f"{name}.weight"]
        return x @ (w.T if FLAVOR == "torch" else w) + self.w[f"{name}.bias"]

    def op_forward(self, body, ctx) -> dict:
        fault("forward")
        x = np.asarray(body["inputs"]["x"], dtype=np.float32)
        h = np.maximum(self._linear(x, "fc1"), 0)
        if "bug@forward" in FAULTS:
            h = h + 0.01
        ctx.partial({"layer": "fc1", "output": h})
        fault("forward-partial")
        y = self._linear(h, "fc2")
        if "nan@forward" in FAULTS:
            y[1, 1] = np.nan
        if "garbage@forward" in FAULTS:
            ctx._sock.send_multipart([b"\xc1\xff garbage"])
        if "garbageonly@forward" in FAULTS:
            ctx._sock.send_multipart([b"\xc1\xff garbage"])
            while True:
                time.sleep(1)
        reply = {"logits": y.astype(np.float32)}
        if "nested@forward" in FAULTS:
            reply = {"logits": {"deeper": [y.astype(np.float32)]}}
        if "stale@forward" in FAULTS:
            ctx._sock.send_multipart(encode("reply", ctx.id - 1, "forward", {"logits": y * 0}))
        if "dup@forward" in FAULTS:
            ctx._sock.send_multipart(encode("reply", ctx.id, "forward", reply))
        return reply

    def op_tensors(self, body, ctx) -> dict:
        """Deterministic float32 tensors of the asked sizes (transport tests): ``sizes`` in
        elements; ``stream`` sends each as a partial first (``batch``: batched partials; ``pause``:
        [i, seconds] sleeps after partial i; ``raise_after``: i fails after partial i);
        ``unencodable`` fails after encoding."""
        out = {}
        pause = body.get("pause") or [-1, 0]
        for i, n in enumerate(body.get("sizes", [])):
            a = (np.arange(int(n), dtype=np.float32) * 0.5 + i).astype(np.float32)
            if body.get("stream"):
                time.sleep(float(body.get("delay", 0)))  # a slow side, for pacing tests
                ctx.partial({"i": i, "t": a}, batch=bool(body.get("batch")))
                if i == pause[0]:
                    time.sleep(pause[1])
                if i == body.get("raise_after"):
                    raise RuntimeError(f"failed after partial {i}")
            out[f"t{i}"] = a
        if body.get("unencodable"):
            out["bad"] = object()  # encode() fails after the arrays went into the ring
        return out

    def op_sleep(self, body, ctx) -> dict:
        time.sleep(float(body.get("seconds", 0)))
        return {}


if __name__ == "__main__":
    if STAMPS:
        with open(os.path.join(STAMPS, f"{FLAVOR}.pid.tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(os.path.join(STAMPS, f"{FLAVOR}.pid.tmp"), os.path.join(STAMPS, f"{FLAVOR}.pid"))
    if "silent-before-hello" in FAULTS:
        while True:
            time.sleep(1)
    if "exit-before-hello" in FAULTS:
        print("fake worker: exiting before hello as asked", file=sys.stderr)
        sys.exit(3)
    if "wrong-version" in FAULTS:
        import protocol
        protocol.PROTOCOL_VERSION = 999
        import protocol.worker
        protocol.worker.PROTOCOL_VERSION = 999
    sys.exit(main(FakeAdapter, FLAVOR))
