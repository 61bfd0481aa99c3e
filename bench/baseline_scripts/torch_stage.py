"""Baseline (today's workflow): one torch stage script, run in the torch env.

    python torch_stage.py STAGES OUTDIR [THREADS]     STAGES: comma list of weights,forward,loss,lr,backward
Each stage writes .npy files into OUTDIR; a JSON line with per-stage seconds goes to stdout.
"""
import json
import os

from common_inputs import EPS, ITERS, LR, TOTAL, WARMUP, WD, args, batch, load_body, no_decay, now, report

t0 = now()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch_worker.models import forward, load  # noqa: E402

stages, out, threads = args()
torch.set_num_threads(threads)
t1 = now()
model, info = load(load_body(), "cpu")
model.eval()  # dropout off, as the coordinator's default
inputs, labels = batch(int(info["config"]["vocab_size"]))
tin = {k: torch.from_numpy(v) for k, v in inputs.items()}
t2 = now()
times, iter_s = {}, []
for stage in stages:
    ts = now()
    if stage == "weights":
        np.savez(os.path.join(out, "torch_weights.npz"), **{k: v.detach().numpy() for k, v in model.state_dict().items()})
        json.dump(info["config"], open(os.path.join(out, "config.json"), "w"))
    elif stage == "forward":
        with torch.no_grad():
            np.save(os.path.join(out, "torch_forward.npy"), forward(model, info, tin)["logits"].numpy())
    elif stage == "loss":
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(forward(model, info, tin)["logits"], torch.from_numpy(labels))
        np.save(os.path.join(out, "torch_loss.npy"), loss.numpy())
    elif stage == "lr":
        from transformers import get_linear_schedule_with_warmup
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        sched = get_linear_schedule_with_warmup(opt, WARMUP, TOTAL)
        lrs = []
        for _ in range(TOTAL):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        np.save(os.path.join(out, "torch_lr.npy"), np.array(lrs))
    elif stage == "backward":
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": WD},
                  {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=LR, eps=EPS)
        losses = []
        for _ in range(ITERS):
            ti = now()
            loss = torch.nn.functional.cross_entropy(forward(model, info, tin)["logits"], torch.from_numpy(labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            iter_s.append(now() - ti)
        np.save(os.path.join(out, "torch_backward.npy"), np.array(losses, np.float32))
    times[stage] = now() - ts
report("torch", times, t1 - t0, t2 - t1, iter_s)
