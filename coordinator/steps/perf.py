"""Step ``perf``: training throughput of both sides on identical steps.

Each side runs ``perf_warmup`` untimed then ``perf_steps`` timed full training steps
(forward, backward, AdamW update, native dropout: what real training runs) on the same
seeded batch of ``batch_size`` x ``perf_seq_len`` tokens, timed steps interleaved between the sides (default 32: the length the demo
sentences pad to, so the timing matches the training run being checked; on CPU, paddle 3.3.1
is 4-7x slower than torch at 128 tokens but close at 32 — see docs/training.md). The sides run one after the other,
never at once, whatever the schedule, so neither competes with the other for cores or
a shared GPU. Verdict: the port's throughput over the reference's, paddle/torch >= ``perf_ratio``
(the guide only says "should be close"; a port faster than the original is no migration error),
from each side's median step. On a busy machine (a side's slowest step over ``NOISY`` times its
fastest) a failing verdict is re-timed once with as many steps again and judged on the medians of
all of them; a failure then says the machine was busy. Never on the fastest steps alone: a port
slow on most steps must fail. Timings are informative; tests never assert on them.
"""

from __future__ import annotations

import numpy as np

from ..reprodlog import save_npy
from ..runner import RunContext, StepResult
from ..errors import UsageError
from ._training import run_then_restore, setup_both
from .common import check_seq_len


def batch(rc: RunContext) -> tuple[dict[str, np.ndarray], np.ndarray]:
    cfg = rc.model_info["torch"].get("config", {})
    bs, seq = int(rc.param("batch_size")), int(rc.param("perf_seq_len"))
    rng = np.random.RandomState(rc.opts.seed + 3)
    inputs = {"input_ids": rng.randint(1, int(cfg.get("vocab_size", 30522)), (bs, seq)).astype(np.int64),
              "token_type_ids": np.zeros((bs, seq), np.int64), "attention_mask": np.ones((bs, seq), np.int64)}
    return inputs, rng.randint(0, 2, (bs,)).astype(np.int64)


def verdict(torch_sps: float, paddle_sps: float, threshold: float) -> tuple[bool, float, str]:
    """(passed, paddle/torch throughput ratio, which side is faster); a side with no throughput fails."""
    faster = "torch" if torch_sps >= paddle_sps else "paddle"
    if min(torch_sps, paddle_sps) <= 0:
        return False, 0.0, faster
    ratio = paddle_sps / torch_sps
    return ratio >= threshold, ratio, faster


NOISY = 2.0   # a side's slowest step over its fastest above which the machine was busy


def judge(times: dict[str, np.ndarray], samples: dict[str, int], threshold: float) -> dict:
    """The verdict on each side's median step, and whether the timing was noisy (a side's slowest
    step over ``NOISY`` x its fastest: load from elsewhere landed on single steps)."""
    spread = {n: float(t.max() / t.min()) if len(t) and t.min() > 0 else float("inf") for n, t in times.items()}
    sps = {n: samples[n] / float(np.median(t)) if len(t) and np.median(t) > 0 else 0.0 for n, t in times.items()}
    passed, ratio, faster = verdict(sps["torch"], sps["paddle"], threshold)
    return {"passed": passed, "ratio": ratio, "faster": faster, "sps": sps,
            "noisy": any(x > NOISY for x in spread.values()), "spread": spread}


def run(rc: RunContext) -> StepResult:
    return run_then_restore(rc, _run)


def _side(times: np.ndarray, samples: int, threads: int) -> dict:
    """Throughput from the *median* step: one step slowed by a noisy neighbour does not decide."""
    median = float(np.median(times)) if len(times) else 0.0
    total = float(times.sum())
    return {"samples_per_s": samples / median if median > 0 else 0.0,
            "samples_per_s_mean": samples * len(times) / total if total > 0 else 0.0,
            "step_ms_median": median * 1000, "step_ms": [round(float(x) * 1000, 3) for x in times],
            "threads": threads}


def _run(rc: RunContext) -> StepResult:
    warmup, steps, thr = int(rc.param("perf_warmup")), int(rc.param("perf_steps")), float(rc.param("perf_ratio"))
    if steps < 1:
        raise UsageError(f"--param perf_steps={steps}: must be >= 1")
    check_seq_len(rc.model_info["torch"], "perf_seq_len", int(rc.param("perf_seq_len")))
    setup_both(rc, float(rc.param("train_lr")), "native")
    inputs, labels = batch(rc)
    body = {"inputs": inputs, "labels": labels, "warmup": warmup, "steps": steps}
    rc.say(f"  {warmup} warm-up + {steps} timed training steps per side, batch {inputs['input_ids'].shape}, "
           f"one side at a time, timed steps interleaved")
    # Interleave: warm up each side, then time one step per side in turns, so load from anything
    # else on the machine falls on both sides alike instead of on whichever side ran second.
    times: dict[str, list[float]] = {"torch": [], "paddle": []}
    info: dict[str, dict] = {}
    for name in ("torch", "paddle"):
        info[name] = rc.session.request(name, "perf", dict(body, warmup=warmup, steps=1))

    def time_steps() -> dict:
        for _ in range(steps):
            for name in ("torch", "paddle"):
                r = rc.session.request(name, "perf", dict(body, warmup=0, steps=1))
                times[name].extend(float(t) for t in r["times"])
                info[name] = r
        return judge({n: np.asarray(t, np.float64) for n, t in times.items()},
                     {n: int(info[n]["samples"]) for n in info}, thr)

    j = time_steps()
    retimed = not j["passed"] and j["noisy"]
    if retimed:
        worst = max(j["spread"], key=lambda n: j["spread"][n])
        rc.say(f"  the machine is busy ({worst}'s step times spread {j['spread'][worst]:.1f}x): "
               f"{steps} more steps per side, judged on the medians of all")
        j = time_steps()
    sides = {}
    for name in ("torch", "paddle"):
        r = info[name]
        sides[name] = _side(np.asarray(times[name], np.float64), int(r["samples"]), int(r.get("threads") or 0))
        rc.say(f"  {name:6s} {sides[name]['samples_per_s']:8.2f} samples/s  "
               f"(median step {sides[name]['step_ms_median']:.1f} ms, fastest {min(times[name]) * 1000:.1f} ms)")
    t_sps, p_sps = j["sps"]["torch"], j["sps"]["paddle"]
    passed, ratio, faster = j["passed"], j["ratio"], j["faster"]
    save_npy(rc.out / "perf_torch.npy", {"samples_per_s": np.float64(t_sps),
                                          "step_s": np.asarray(sides["torch"]["step_ms"]) / 1000})
    save_npy(rc.out / "perf_paddle.npy", {"samples_per_s": np.float64(p_sps),
                                           "step_s": np.asarray(sides["paddle"]["step_ms"]) / 1000})
    details = {"torch": sides["torch"], "paddle": sides["paddle"], "ratio": ratio, "faster": faster,
               "paddle_over_torch": p_sps / t_sps if t_sps > 0 else None, "threshold": thr,
               "spread": j["spread"], "retimed": retimed,
               "warmup": warmup, "steps": steps, "batch": list(inputs["input_ids"].shape),
               "devices": {"torch": rc.opts.torch_device, "paddle": rc.opts.paddle_device},
               "dropout": "native (timing real training)", "schedule": "sequential (one side at a time)"}
    msg = (f"paddle {p_sps:.2f} vs torch {t_sps:.2f} samples/s (median step): {faster} faster, "
           f"paddle/torch = {ratio:.2f} {'>=' if passed else '<'} {thr:g}")
    if j["noisy"] and not passed:
        msg += (f"; step times spread up to {max(j['spread'].values()):.1f}x: the machine was busy, so this may "
                f"be load, not the port: run perf again on a quiet machine or with --threads 1 (docs/training.md)")
    return StepResult("perf", passed, ratio, f"paddle/torch >= {thr:g}", msg, [], details)
