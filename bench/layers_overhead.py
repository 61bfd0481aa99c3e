"""Overhead of all-layer capture (step ``layers``) against the frameworks' own compute.

BERT-base shape with random weights (hidden 768, 12 layers, 12 heads, intermediate 3072),
batch 4, sequence 128, both real worker environments, CPU. For each side it times the
same ``capture_layers`` pass with ``hooks: false`` (the plain pass, the baseline) and with
every mapped layer hooked and streamed, forward and forward+backward, and the whole live
comparison as the step does it (both workers, the coordinator diffing as tensors arrive).

    .venv/bin/python bench/layers_overhead.py [--reps 3] [--threads 2] [--layers 12] [--out DIR] [--smoke]
    .venv/bin/python bench/layers_overhead.py --factory [--schedule parallel --threads 8]
        [--torch-device cuda:0]

``--factory`` runs the same measurement on ``bench/models/ffn_*.py`` instead of BERT: an own-model
pair of BERT-base's shape without attention (12 blocks of Linear 768->3072, GELU, Linear,
LayerNorm), which needs only torch and paddle (no transformers, no paddlenlp), so it runs on a
machine where only the frameworks can be installed (scripts/device_bench.sh).

Reported: worker-side seconds (min over reps: the machine is shared, the minimum is the
least disturbed), overhead in percent (mins against mins, and the median of the ratios paired
within each repetition), the coordinator's held/spilled bytes and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
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
from coordinator.layerrun import FORWARD_TOL, BACKWARD_TOL, capture, diff_threads, layer_map  # noqa: E402
from coordinator.runner import RunContext, RunOptions  # noqa: E402
from coordinator.session import Session  # noqa: E402
from coordinator.steps.common import ensure_converted, gen_inputs  # noqa: E402

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


MODELS = ROOT / "bench" / "models"


def start(out: Path, ckpt: Path | None, threads: int, hold_mib: float | None = None, *, schedule: str = "alternate",
          torch_device: str = "cpu", paddle_device: str = "cpu", diff_threads: int = 0) -> RunContext:
    from coordinator.params import resolve
    from coordinator.placement import tune_own_malloc
    tune_own_malloc()  # what `coordinator run` does for its own process
    if ckpt is None:   # --factory: the FFN stack, an own-model pair
        model = {"torch_model": "ffn_torch:build", "paddle_model": "ffn_paddle:build",
                 "torch_path": [str(MODELS)], "paddle_path": [str(MODELS)]}
    else:
        model = {"torch_model": "bert", "paddle_model": "bert", "model_path": str(ckpt)}
    opts = RunOptions(steps=[], out=out, **model, threads=threads, schedule=schedule, torch_device=torch_device,
                      paddle_device=paddle_device, allow_shared_gpu=True,
                      params=resolve({"layers_diff_threads": diff_threads,
                                      **({} if hold_mib is None else {"layers_hold_mib": hold_mib})}))
    out.mkdir(parents=True, exist_ok=True)
    specs = _worker_specs(opts, True, lambda s: None)
    session = Session(out)
    for sp in specs.values():
        session.launch(sp)
    session.wait_hello()
    rc = RunContext(opts, session, lambda s: None)
    rc.cache["schedule"] = schedule
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
    ap.add_argument("--factory", action="store_true",
                    help="the FFN stack of bench/models (torch + paddle only) instead of BERT")
    ap.add_argument("--schedule", choices=("alternate", "parallel"), default="alternate",
                    help="alternate: one worker computes at a time (the 2-core choice); parallel: both at once")
    ap.add_argument("--diff-threads", type=int, default=0,
                    help="layers_diff_threads: threads comparing one large tensor (0: the run's auto rule)")
    ap.add_argument("--copy-threads", type=int, default=0,
                    help="LOCKSTEP_COPY_THREADS for both workers: threads copying one large tensor into "
                         "the ring (0: the workers' auto rule)")
    ap.add_argument("--torch-device", default="cpu")
    ap.add_argument("--paddle-device", default="cpu")
    a = ap.parse_args()
    if a.smoke:
        a.layers, a.reps, a.batch, a.seq = 1, 1, 1, 8
    out = a.out or Path(tempfile.mkdtemp(prefix="lockstep-bench-layers-"))
    if a.factory:
        ckpt = None
        os.environ["LOCKSTEP_FFN"] = f"{a.layers},{a.batch},{a.seq}"   # the workers inherit it
    else:
        ckpt = Path(tempfile.gettempdir()) / f"lockstep-bert-base-random-{a.layers}"
        make_checkpoint(ckpt, a.layers)
    if a.copy_threads:
        os.environ["LOCKSTEP_COPY_THREADS"] = str(a.copy_threads)
    rc = start(out, ckpt, a.threads, a.hold_mib, schedule=a.schedule, torch_device=a.torch_device,
               paddle_device=a.paddle_device, diff_threads=a.diff_threads)
    rss_after_convert = _vm("VmHWM")   # the weights step's own copies (torch state dict + converted)
    try:
        lmap = layer_map(rc)
        rng = np.random.RandomState(0)
        if a.factory:
            inputs = gen_inputs(rc)
            labels = inputs["labels"]
        else:
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
            for phase, backward in (("fwd", False), ("bwd", True)):
                # the same schedule without capture: both plain passes as the run would issue them
                body = {"inputs": inputs, "hooks": False}
                if backward:
                    body.update(backward=True, labels=labels)
                t0 = time.perf_counter()
                rc.both("capture_layers", body, body)
                res.setdefault("both_plain", {}).setdefault(phase, []).append({"wall": time.perf_counter() - t0})
            for phase, backward in (("live_fwd", False), ("live_bwd", True)):
                t0 = time.perf_counter()
                cap = capture(rc, lmap, inputs, BACKWARD_TOL if backward else FORWARD_TOL, backward=backward,
                              labels=labels if backward else None)
                wall = time.perf_counter() - t0
                failed = sum(1 for r in cap.diff.rows if not r.passed)
                res.setdefault("live", {}).setdefault(phase, []).append(
                    {"wall": wall, "rows": len(cap.diff.rows), "failed": failed,
                     "held_peak_bytes": cap.stats["held_peak_bytes"], "spilled_bytes": cap.stats["spilled_bytes"],
                     "direct_copies": cap.stats.get("direct_copies", {})})
                cap.diff.close()
        summary = summarize(res)
        summary["config"] = {"model": "ffn stack (bench/models)" if a.factory else "bert",
                             "hidden": 768, "layers": a.layers, "heads": None if a.factory else 12,
                             "intermediate": 3072, "batch": a.batch, "seq": a.seq, "threads": a.threads,
                             "schedule": a.schedule, "devices": {"torch": a.torch_device, "paddle": a.paddle_device},
                             "cpus": os.cpu_count(), "reps": a.reps,
                             "diff_threads": diff_threads(int(rc.param("layers_diff_threads"))),
                             "copy_threads": a.copy_threads or "auto",
                             "direct_copy": os.environ.get("LOCKSTEP_DIRECT_COPY", "1"),
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
        "spilled_mib": round(max(r["spilled_bytes"] for r in live["live_fwd"] + live["live_bwd"]) / 2**20, 1),
        "direct_copies_fwd": live["live_fwd"][0].get("direct_copies", {})}
    # Paired within each repetition (the live step against the plain passes of the same rep, run
    # seconds apart): the machine's drift between reps (+-30 % here) cancels out of each ratio.
    for phase, plain in (("fwd", "fwd_plain"), ("bwd", "bwd_plain")):
        ratios = [r["wall"] / (res["torch"][plain][i]["worker"] + res["paddle"][plain][i]["worker"]) - 1
                  for i, r in enumerate(live["live_" + phase])]
        s["live"][f"{phase}_vs_plain_pct_paired"] = [round(100 * x, 1) for x in ratios]
        s["live"][f"{phase}_vs_plain_pct_paired_median"] = round(100 * statistics.median(ratios), 1)
    # Against both plain passes issued with the run's own schedule (rc.both, no hooks): in turns
    # that is the sum above plus two round trips; in parallel it is the slower side's pass.
    bp = res["both_plain"]
    for phase in ("fwd", "bwd"):
        base = [r["wall"] for r in bp[phase]]
        ratios = [r["wall"] / b - 1 for r, b in zip(live["live_" + phase], base)]
        s["live"][f"{phase}_both_plain_s"] = round(min(base), 3)
        s["live"][f"{phase}_vs_both_plain_pct"] = round(
            100 * (min(r["wall"] for r in live["live_" + phase]) / min(base) - 1), 1)
        s["live"][f"{phase}_vs_both_plain_pct_paired"] = [round(100 * x, 1) for x in ratios]
        s["live"][f"{phase}_vs_both_plain_pct_paired_median"] = round(100 * statistics.median(ratios), 1)
    return s


if __name__ == "__main__":
    sys.exit(main())
