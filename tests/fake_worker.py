"""A numpy-only worker for tests: speaks the real protocol, needs no framework.

Run as ``python tests/fake_worker.py <flavor> --connect ...`` where flavor is ``torch``
(Linear weights stored [out, in]) or ``paddle`` ([in, out]). Faults are injected with
``LOCKSTEP_FAKE_FAULT_<FLAVOR>``, a comma list of:
  exit-before-hello, wrong-version, wrong-framework, kill@<op>, exit@<op>, hang@<op>,
  nan@forward, bug@forward (paddle computes with a wrong bias), garbage@<op>.
"""

from __future__ import annotations

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from protocol.adapter import Adapter, main  # noqa: E402

FLAVOR = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "torch"
FAULTS = [f for f in os.environ.get(f"LOCKSTEP_FAKE_FAULT_{FLAVOR.upper()}", "").split(",") if f]


def fault(op: str) -> None:
    for f in FAULTS:
        what, _, where = f.partition("@")
        if where != op:
            continue
        if what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if what == "exit":
            os._exit(17)
        if what == "hang":
            while True:
                time.sleep(1)


class FakeAdapter(Adapter):
    framework = FLAVOR

    def __init__(self) -> None:
        self.w: dict[str, np.ndarray] = {}

    def hello(self) -> dict:
        fw = "tensorflow" if "wrong-framework" in FAULTS else FLAVOR
        return {"framework": fw, "framework_version": "fake-0", "device": "cpu"}

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
        y = self._linear(h, "fc2")
        if "nan@forward" in FAULTS:
            y[1, 1] = np.nan
        if "garbage@forward" in FAULTS:
            ctx._sock.send_multipart([b"\xc1\xff garbage"])
        return {"logits": y.astype(np.float32)}

    def op_sleep(self, body, ctx) -> dict:
        time.sleep(float(body.get("seconds", 0)))
        return {}


if __name__ == "__main__":
    if "exit-before-hello" in FAULTS:
        print("fake worker: exiting before hello as asked", file=sys.stderr)
        sys.exit(3)
    if "wrong-version" in FAULTS:
        import protocol
        protocol.PROTOCOL_VERSION = 999
        import protocol.worker
        protocol.worker.PROTOCOL_VERSION = 999
    sys.exit(main(FakeAdapter, FLAVOR))
