"""Baseline (today's workflow): one paddle stage script, run in the paddle env.

    python paddle_stage.py STAGES OUTDIR [THREADS]
Needs OUTDIR/paddle_weights.npz (convert.py) for every stage but ``weights`` / ``lr``; the
``weights`` stage saves the converted state dict with paddle.save, as the guide does.
"""
import json
import os

from common_inputs import EPS, ITERS, LR, TOTAL, WARMUP, WD, args, batch, load_body, no_decay, now, report

t0 = now()
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddle_worker.models import forward, load  # noqa: E402

stages, out, threads = args()
paddle.set_device("cpu")
# threads: OMP_NUM_THREADS from the caller (bench/_runs.py sets it as the launcher does for workers)
t1 = now()
config = json.load(open(os.path.join(out, "config.json")))
model, info = load({**load_body(), "config": config})
with np.load(os.path.join(out, "paddle_weights.npz")) as z:  # no pickle: plain arrays only
    model.set_state_dict({k: z[k] for k in z.files})
model.eval()
inputs, labels = batch(int(config["vocab_size"]))
pin = {k: paddle.to_tensor(v) for k, v in inputs.items()}
t2 = now()
times, iter_s = {}, []
for stage in stages:
    ts = now()
    if stage == "weights":
        paddle.save(model.state_dict(), os.path.join(out, "model_state.pdparams"))
    elif stage == "forward":
        with paddle.no_grad():
            np.save(os.path.join(out, "paddle_forward.npy"), forward(model, info, pin)["logits"].numpy())
    elif stage == "loss":
        with paddle.no_grad():
            loss = paddle.nn.functional.cross_entropy(forward(model, info, pin)["logits"], paddle.to_tensor(labels))
        np.save(os.path.join(out, "paddle_loss.npy"), loss.numpy())
    elif stage == "lr":
        from paddlenlp.transformers import LinearDecayWithWarmup
        sched = LinearDecayWithWarmup(LR, TOTAL, WARMUP)
        lrs = []
        for _ in range(TOTAL):
            lrs.append(sched.get_lr())
            sched.step()
        np.save(os.path.join(out, "paddle_lr.npy"), np.array(lrs))
    elif stage == "backward":
        decay = {p.name for n, p in model.named_parameters() if not no_decay(n)}
        opt = paddle.optimizer.AdamW(LR, parameters=model.parameters(), weight_decay=WD, epsilon=EPS,
                                     apply_decay_param_fun=lambda name: name in decay)
        losses = []
        for _ in range(ITERS):
            ti = now()
            loss = paddle.nn.functional.cross_entropy(forward(model, info, pin)["logits"], paddle.to_tensor(labels))
            loss.backward()
            opt.step()
            opt.clear_grad()
            losses.append(float(loss))
            iter_s.append(now() - ti)
        np.save(os.path.join(out, "paddle_backward.npy"), np.array(losses, np.float32))
    times[stage] = now() - ts
report("paddle", times, t1 - t0, t2 - t1, iter_s)
