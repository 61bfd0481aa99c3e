"""Overhead of all-layer capture (step ``layers``) against the frameworks' own compute.

BERT-base shape with random weights (hidden 768, 12 layers, 12 heads, intermediate 3072),
batch 4, sequence 128, both real worker environments, CPU. For each side it times the
same ``capture_layers`` pass with ``hooks: false`` (the plain pass, the baseline) and with
every mapped layer hooked and streamed, forward and forward+backward, and the whole live
comparison as the step does it (both workers, the coordinator diffing as tensors arrive).

    .venv/bin/python bench/layers_overhead.py [--reps 3] [--threads 2] [--layers 12] [--out DIR] [--smoke]

Reported: worker-side seconds (min over reps: the machine is shared, the minimum is the
least disturbed), overhead in percent (mins against mins, and the median of the ratios paired
within each repetition), the coordinator's held/spilled bytes and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator import envs  # noqa: E402
from coordinator.cli import _worker_specs  # noqa: E402
from coordinator.layerrun import FORWARD_TOL, BACKWARD_TOL, capture, layer_map  # noqa: E402
from coordinator.runner import RunContext, RunOptions  # noqa: E402
from coordinator.session import Session  # noqa: E402
from coordinator.steps.common import ensure_converted  # noqa: E402

MAKE_CKPT = """
import sys, torch
from transformers import BertConfig, BertForSequenceClassification
torch.manual_seed(0)
cfg = BertConfig(hidden_size=768, num_hidden_layers=int(sys.argv[2]), num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522, max_position_embeddings=512, num_labels=2)
BertForSequenceClassification(cfg).save_pretrained(sys.argv[1])
"""


def make_checkpoint(path: Path, layers: int) -> None:
    if (path / "config.json").exists():
        return
    py = envs.env_spec("torch").python
    subprocess.run([str(py), "-c", MAKE_CKPT, str(path), str(layers)], check=True, capture_output=True)


def start(out: Path, ckpt: Path, threads: int, hold_mib: float | None = None) -> RunContext:
    from coordinator.params import resolve
    from coordinator.placement import tune_own_malloc
    tune_own_malloc()  # what `coordinator run` does for its own process
    opts = RunOptions(steps=[], out=out, torch_model="bert", paddle_model="bert", model_path=str(ckpt),
                      threads=threads, params=resolve({} if hold_mib is None else {"layers_hold_mib": hold_mib}))
    out.mkdir(parents=True, exist_ok=True)
    specs = _worker_specs(opts, True, lambda s: None)
    session = Session(out)
    for sp in specs.values():
        session.launch(sp)
    session.wait_hello()
    rc = RunContext(opts, session, lambda s: None)
    rc.cache["schedule"] = "alternate"
    ensure_converted(rc)
    return rc


def timed(rc: RunContext, side: str, body: dict) -> dict:
    """Round-trip seconds as the coordinator sees them, plus the worker's own figures."""
    got = {"bytes": 0, "events": 0}

    def on_partial(worker: str, ev: dict) -> None:
        got["events"] += 1
        t = ev.get("tensor")
        if isinstance(t, np.ndarray):
            got["bytes"] += t.nbytes
    t0 = time.perf_counter()
    reply = rc.session.request(side, "capture_layers", body, on_partial=on_partial)
    return {"wall": time.perf_counter() - t0, "worker": reply["seconds"], "hooks": reply["hook_seconds"], **got}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hold-mib", type=float, default=None, help="layers_hold_mib (default: the run's default)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="CI: 1 layer, 1 rep, batch 1 x 8 (still runs)")
    a = ap.parse_args()
    if a.smoke:
        a.layers, a.reps, a.batch, a.seq = 1, 1, 1, 8
    out = a.out or Path(tempfile.mkdtemp(prefix="lockstep-bench-layers-"))
    ckpt = Path(tempfile.gettempdir()) / f"lockstep-bert-base-random-{a.layers}"
    make_checkpoint(ckpt, a.layers)
    rc = start(out, ckpt, a.threads, a.hold_mib)
    rss_after_convert = _vm("VmHWM")   # the weights step's own copies (torch state dict + converted)
    try:
        lmap = layer_map(rc)
        rng = np.random.RandomState(0)
        inputs = {"input_ids": rng.randint(1, 30522, (a.batch, a.seq)).astype(np.int64),
                  "token_type_ids": np.zeros((a.batch, a.seq), np.int64),
                  "attention_mask": np.ones((a.batch, a.seq), np.int64)}
        labels = rng.randint(0, 2, (a.batch,)).astype(np.int64)
        names = {"torch": [p.torch for p in lmap.pairs], "paddle": [p.paddle for p in lmap.pairs]}
        res: dict = {}
        for side in ("torch", "paddle"):   # warm-up: first calls allocate
            timed(rc, side, {"inputs": inputs, "hooks": False})
        for rep in range(a.reps):
            for side in ("torch", "paddle"):
                for mode, body in (
                        ("fwd_plain", {"inputs": inputs, "hooks": False}),
                        ("fwd_capture", {"inputs": inputs, "modules": names[side]}),
                        ("bwd_plain", {"inputs": inputs, "hooks": False, "backward": True, "labels": labels}),
                        ("bwd_capture", {"inputs": inputs, "modules": names[side], "backward": True,
                                         "labels": labels, "forward_events": False})):
                    r = timed(rc, side, body)
                    res.setdefault(side, {}).setdefault(mode, []).append(r)
            for phase, backward in (("live_fwd", False), ("live_bwd", True)):
                t0 = time.perf_counter()
                cap = capture(rc, lmap, inputs, BACKWARD_TOL if backward else FORWARD_TOL, backward=backward,
                              labels=labels if backward else None)
                wall = time.perf_counter() - t0
                failed = sum(1 for r in cap.diff.rows if not r.passed)
                res.setdefault("live", {}).setdefault(phase, []).append(
                    {"wall": wall, "rows": len(cap.diff.rows), "failed": failed,
                     "held_peak_bytes": cap.stats["held_peak_bytes"], "spilled_bytes": cap.stats["spilled_bytes"]})
                cap.diff.close()
        summary = summarize(res)
        summary["config"] = {"hidden": 768, "layers": a.layers, "heads": 12, "intermediate": 3072,
                             "batch": a.batch, "seq": a.seq, "threads": a.threads, "reps": a.reps,
                             "pairs": len(lmap.pairs), "hold_mib": float(rc.param("layers_hold_mib"))}
        summary["coordinator_peak_rss_mib"] = round(_vm("VmHWM"), 1)
        summary["coordinator_peak_rss_after_convert_mib"] = round(rss_after_convert, 1)
        print(json.dumps(summary, indent=1))
        (out / "layers_overhead.json").write_text(json.dumps({"summary": summary, "raw": res}, indent=1))
    finally:
        rc.session.close()
    return 0


def _vm(field: str) -> float:
    """VmHWM (peak) or VmRSS of this process, MiB (Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(res: dict) -> dict:
    s: dict = {}
    for side in ("torch", "paddle"):
        m = {k: min(r["worker"] for r in v) for k, v in res[side].items()}
        w = {k: min(r["wall"] for r in v) for k, v in res[side].items()}
        s[side] = {
            "fwd_plain_s": round(m["fwd_plain"], 3), "fwd_capture_s": round(m["fwd_capture"], 3),
            "fwd_overhead_pct": round(100 * (m["fwd_capture"] / m["fwd_plain"] - 1), 1),
            "fwd_roundtrip_overhead_pct": round(100 * (w["fwd_capture"] / w["fwd_plain"] - 1), 1),
            "bwd_plain_s": round(m["bwd_plain"], 3), "bwd_capture_s": round(m["bwd_capture"], 3),
            "bwd_overhead_pct": round(100 * (m["bwd_capture"] / m["bwd_plain"] - 1), 1),
            "hook_s_fwd": round(min(r["hooks"] for r in res[side]["fwd_capture"]), 3),
            "streamed_mib_fwd": round(res[side]["fwd_capture"][0]["bytes"] / 2**20, 1),
            "streamed_mib_bwd": round(res[side]["bwd_capture"][0]["bytes"] / 2**20, 1),
            "events_fwd": res[side]["fwd_capture"][0]["events"]}
    live = res["live"]
    plain_both_fwd = s["torch"]["fwd_plain_s"] + s["paddle"]["fwd_plain_s"]
    plain_both_bwd = s["torch"]["bwd_plain_s"] + s["paddle"]["bwd_plain_s"]
    s["live"] = {
        "fwd_wall_s": round(min(r["wall"] for r in live["live_fwd"]), 3),
        "fwd_vs_plain_pct": round(100 * (min(r["wall"] for r in live["live_fwd"]) / plain_both_fwd - 1), 1),
        "bwd_wall_s": round(min(r["wall"] for r in live["live_bwd"]), 3),
        "bwd_vs_plain_pct": round(100 * (min(r["wall"] for r in live["live_bwd"]) / plain_both_bwd - 1), 1),
        "rows_fwd": live["live_fwd"][0]["rows"], "rows_bwd": live["live_bwd"][0]["rows"],
        "failed_rows": [r["failed"] for r in live["live_fwd"] + live["live_bwd"]],
        "held_peak_mib_fwd": round(max(r["held_peak_bytes"] for r in live["live_fwd"]) / 2**20, 1),
        "held_peak_mib_bwd": round(max(r["held_peak_bytes"] for r in live["live_bwd"]) / 2**20, 1),
        "spilled_mib": round(max(r["spilled_bytes"] for r in live["live_fwd"] + live["live_bwd"]) / 2**20, 1)}
    # Paired within each repetition (the live step against the plain passes of the same rep, run
    # seconds apart): the machine's drift between reps (+-30 % here) cancels out of each ratio.
    for phase, plain in (("fwd", "fwd_plain"), ("bwd", "bwd_plain")):
        ratios = [r["wall"] / (res["torch"][plain][i]["worker"] + res["paddle"][plain][i]["worker"]) - 1
                  for i, r in enumerate(live["live_" + phase])]
        s["live"][f"{phase}_vs_plain_pct_paired"] = [round(100 * x, 1) for x in ratios]
        s["live"][f"{phase}_vs_plain_pct_paired_median"] = round(100 * statistics.median(ratios), 1)
    return s


if __name__ == "__main__":
    sys.exit(main())
