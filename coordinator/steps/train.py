"""Step ``train``: fine-tune both sides from identical weights, then compare dev accuracy.

Both workers get the same sentences in the same order (sequential, no shuffle) and
tokenize them with their own BertTokenizer built from one vocab.txt; a crc32 of every
batch's input ids proves they trained on the same ids. AdamW is the guide's recipe at
``train_lr`` (constant; the lr step checks schedules). Each step's loss streams back as
a partial reply and is printed every ``train_log_every`` steps. Verdict (the guide's):
``|acc_torch - acc_paddle| <= acc_threshold`` (0.25%); the per-step losses must also stay
within ``--tolerance train=max:1e-3`` (only meaningful with dropout off or shared).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..compare import TensorDiff, Tolerance, compare
from ..runner import RunContext, StepResult
from ..tsv import DEMO_FILES, Split, read_tsv
from ._training import DROPOUT_NOTE, compare_dropout_calls, dropout_mode, run_then_restore, setup_both
from .common import check_seq_len, finish

LOSS_TOL = Tolerance(1e-3, "max")


def splits(rc: RunContext) -> tuple[Split, Split, str]:
    """(train, dev, note): the demo set, or --data for training and --param dev_data for eval."""
    data, dev = rc.param("data"), rc.param("dev_data")
    train = read_tsv(data or DEMO_FILES["train"], "train")
    if dev:
        return train, read_tsv(dev, "dev"), f"dev = {dev}"
    if data:
        return train, read_tsv(data, "dev"), "no --param dev_data: evaluated on the training file itself"
    return train, read_tsv(DEMO_FILES["dev"], "dev"), "demo dev split"


def run(rc: RunContext) -> StepResult:
    return run_then_restore(rc, _run)


def _run(rc: RunContext) -> StepResult:
    mode = dropout_mode(rc)
    train, dev, dev_note = splits(rc)
    bs, epochs, max_steps = int(rc.param("batch_size")), int(rc.param("epochs")), int(rc.param("train_max_steps"))
    per_epoch = -(-len(train) // bs)
    total = min(per_epoch * epochs, max_steps) if max_steps else per_epoch * epochs
    tinfo = rc.model_info["torch"]
    check_seq_len(tinfo, "max_length", int(rc.param("max_length")))
    t_setup, p_setup, decay_check = setup_both(rc, float(rc.param("train_lr")), mode)
    body = {"texts": train.sentences, "labels": np.asarray(train.labels, np.int64),
            "dev_texts": dev.sentences, "dev_labels": np.asarray(dev.labels, np.int64), "batch_size": bs,
            "epochs": epochs, "max_length": int(rc.param("max_length")), "max_steps": max_steps,
            "do_lower_case": bool(tinfo.get("do_lower_case", True))}
    rc.say(f"  fine-tuning {len(train)} sentences ({Path(train.path).name}), batch {bs}, {epochs} epoch(s) = "
           f"{total} steps per side, lr {rc.param('train_lr')} constant, dropout {mode}; eval on {len(dev)} "
           f"({dev_note})")
    if "lr" in rc.opts.params_given and "train_lr" not in rc.opts.params_given:
        rc.say(f"  note: --lr sets the backward step's rate; train fine-tunes at --param train_lr "
               f"({rc.param('train_lr')})")
    progress = Progress(rc, total, int(rc.param("train_log_every")))
    t, p = rc.both("train", body, dict(body, vocab=tinfo.get("vocab")), on_partial=progress.on_partial)
    return _verdict(rc, t, p, mode, decay_check, dev_note, total)


class Progress:
    """Prints each side's running loss every N steps (and the other side's, once known)."""

    def __init__(self, rc: RunContext, total: int, every: int) -> None:
        self.rc, self.total, self.every = rc, total, max(1, every)
        self.loss: dict[str, dict[int, float]] = {"torch": {}, "paddle": {}}

    def on_partial(self, worker: str, body: dict) -> None:
        step, loss = int(body["step"]), float(body["loss"])
        self.loss.setdefault(worker, {})[step] = loss
        if (step + 1) % self.every and step + 1 != self.total:
            return
        other = "paddle" if worker == "torch" else "torch"
        seen = self.loss.get(other, {}).get(step)
        vs = f"  ({other} {seen:.6f}, diff {abs(seen - loss):.1e})" if seen is not None else ""
        self.rc.say(f"  {worker:6s} step {step + 1:4d}/{self.total} epoch {int(body['epoch']) + 1}  "
                    f"loss {loss:.6f}{vs}")


def _verdict(rc: RunContext, t: dict, p: dict, mode: str, decay_check: TensorDiff, dev_note: str,
             total: int) -> StepResult:
    lt, lp = np.asarray(t["losses"], np.float32), np.asarray(p["losses"], np.float32)
    ct, cp = np.asarray(t["ids_crc"]), np.asarray(p["ids_crc"])
    acc_thr = float(rc.param("acc_threshold"))
    acc_d = compare("acc", np.float64(t["acc"]), np.float64(p["acc"]), Tolerance(acc_thr, "max"))
    loss_tol = rc.tol("train", LOSS_TOL)
    n = min(len(lt), len(lp))
    loss_diffs = [compare(f"loss_{i}", lt[i], lp[i], loss_tol) for i in range(n)]
    diffs = [decay_check, acc_d] + loss_diffs
    problems = []
    if len(lt) != len(lp):
        problems.append(f"torch ran {len(lt)} steps, paddle {len(lp)}")
    bs = int(rc.param("batch_size"))
    bad_batch = next((i for i in range(min(len(ct), len(cp))) if ct[i] != cp[i]), None)
    if bad_batch is not None:
        problems.append(f"batch {bad_batch} (sentences {bad_batch * bs}..): the two "
                        f"tokenizers produced different input ids (run the data step to see where)")
    dt, dp = np.asarray(t.get("dev_ids_crc", [])), np.asarray(p.get("dev_ids_crc", []))
    bad_dev = next((i for i in range(min(len(dt), len(dp))) if dt[i] != dp[i]), None)
    if bad_dev is not None:   # an accuracy gap with this cause is not the model's
        problems.append(f"dev batch {bad_dev} (dev sentences {bad_dev * bs}..): the two tokenizers produced "
                        f"different input ids (run the data step with --data on the dev file to see where)")
    calls_t, calls_p = t.get("dropout_calls") or [], p.get("dropout_calls") or []
    for i in range(min(len(calls_t), len(calls_p))):   # the masks come before the losses they change
        why = compare_dropout_calls(calls_t[i], calls_p[i], mode)
        if why:
            problems.append(f"step {i + 1}: {why}")
            break
    if not decay_check.passed:
        problems.append(decay_check.reason)
    first_loss = next((d for d in loss_diffs if not d.passed), None)
    if first_loss is not None:
        step_no = int(first_loss.name.rsplit("_", 1)[1]) + 1   # the console counts steps from 1
        problems.append(f"step {step_no} ({first_loss.name}): {first_loss.reason}")
    if not acc_d.passed:
        problems.insert(0, f"dev accuracy torch {t['acc']:.4f} vs paddle {p['acc']:.4f}: |diff| "
                           f"{abs(t['acc'] - p['acc']):.4f} > {acc_thr:g}")
    preds_t, preds_p = np.asarray(t["preds"]), np.asarray(p["preds"])
    agree = float((preds_t == preds_p).mean()) if preds_t.shape == preds_p.shape and preds_t.size else 0.0
    ldiff = np.abs(lt[:n].astype(np.float64) - lp[:n]) if n else np.zeros(0)
    details = {"acc_torch": t["acc"], "acc_paddle": p["acc"], "acc_diff": abs(t["acc"] - p["acc"]),
               "acc_threshold": acc_thr, "prediction_agreement": agree, "dev": dev_note, "steps": n,
               "steps_planned": total, "loss_first": [float(lt[0]), float(lp[0])] if n else None,
               "loss_last": [float(lt[n - 1]), float(lp[n - 1])] if n else None,
               "loss_max_diff": float(ldiff.max()) if n else None,
               "loss_max_diff_step": int(ldiff.argmax()) if n else None,
               "train_seconds": {"torch": t["train_seconds"], "paddle": p["train_seconds"]},
               "dropout": mode, "dropout_note": DROPOUT_NOTE[mode], "loss_tolerance": loss_tol.describe()}
    rc.say(f"  dev accuracy: torch {t['acc']:.4f}, paddle {p['acc']:.4f} (|diff| {details['acc_diff']:.4f}, "
           f"threshold {acc_thr:g}); predictions agree on {agree:.1%}; loss max diff "
           f"{details['loss_max_diff'] or 0:.2e} over {n} steps; train time torch {t['train_seconds']:.1f}s, "
           f"paddle {p['train_seconds']:.1f}s")
    rc.say(f"  {DROPOUT_NOTE[mode]}")
    t_npy = {f"loss_{i}": lt[i] for i in range(len(lt))} | {"acc": np.float64(t["acc"])}
    p_npy = {f"loss_{i}": lp[i] for i in range(len(lp))} | {"acc": np.float64(p["acc"])}
    res = finish(rc, "train", t_npy, p_npy, diffs, loss_tol, details, extra_fail="; ".join(problems))
    # the figure that decided: the accuracy gap, unless only a step's loss failed
    res.worst = details["acc_diff"] if acc_d.passed is False or first_loss is None else details["loss_max_diff"]
    res.tolerance = f"|acc diff| <= {acc_thr:g}; loss {loss_tol.describe()}"
    if res.passed:
        res.message = (f"dev accuracy torch {t['acc']:.4f} = paddle {p['acc']:.4f} within {acc_thr:g} after {n} "
                       f"steps; loss max diff {details['loss_max_diff'] or 0:.1e}; dropout {mode}")
    return res
