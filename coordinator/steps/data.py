"""Step ``data`` (guide 4.3): each side's tokenizer + collator on the same sentences, compared exactly.

The coordinator reads and validates the TSV itself (``coordinator.tsv``: the demo set's
``train`` and ``dev`` files, or the one file given with ``--data``), then sends the
sentences and labels to both workers. Torch tokenizes with HF's ``BertTokenizer`` from its
model directory and batches with ``DataCollatorWithPadding``; paddle rebuilds PaddleNLP's
``BertTokenizer`` from the vocab text the coordinator ships (workers may be on different
hosts) and batches with PaddleNLP's ``DataCollatorWithPadding``. Both truncate at
``max_length`` and batch in file order (sequential sampler, ``batch_size``).

Compared, every one with tolerance ``max <= 0``: each split's length; every item's
``input_ids``, ``token_type_ids``, ``attention_mask``, ``labels``; every batch's padded
tensors. A field only one side produces is noted, not compared. A mismatch names the
split, item, file line, sentence, field and first differing token (ids and vocab tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..compare import TensorDiff, Tolerance
from ..runner import RunContext, StepResult
from ..tsv import Split, load_splits, require_batches
from ._stages import side_inject
from .common import diff_dicts, finish, model_body

DEFAULT = Tolerance(0.0, "max")
FIELDS = ("input_ids", "token_type_ids", "attention_mask", "labels")
SUMMARY_DIFFS = 20   # failing tensors kept in summary.json; data_diff.log has every key


@dataclass
class Mismatch:
    """One place where the two pipelines disagree, resolved to an example of the TSV."""

    split: str
    kind: str          # item | batch
    index: int         # item index, or batch index
    field: str
    item: int          # the example (TSV row) it comes from
    position: int      # first differing token (or the batch row for labels)
    torch: Any
    paddle: Any

    def describe(self, split: Split, vocab: list[str]) -> str:
        where = f"{self.split} item {self.item}" if self.kind == "item" else \
            f"{self.split} batch {self.index} (item {self.item})"
        sentence = split.sentences[self.item] if self.item < len(split) else "?"
        if self.position < 0:
            what = f"{self.field} shapes differ: torch {self.torch} vs paddle {self.paddle}"
        elif self.field == "labels":
            what = f"label: torch {self.torch} vs paddle {self.paddle}"
        else:
            what = (f"{self.field} differ first at token {self.position}: torch {_tok(self.torch, vocab)} "
                    f"vs paddle {_tok(self.paddle, vocab)}")
        src = split.where(self.item) if self.item < len(split) else split.path.name
        return f"{where} ({src}) {sentence[:80]!r}: {what}"

    def to_json(self, split: Split, vocab: list[str]) -> dict[str, Any]:
        return {"split": self.split, "kind": self.kind, "index": self.index, "field": self.field,
                "item": self.item, "line": split.lines[self.item] if self.item < len(split) else None,
                "sentence": split.sentences[self.item] if self.item < len(split) else None,
                "position": self.position, "torch": self.torch, "paddle": self.paddle,
                "torch_token": _token(self.torch, vocab), "paddle_token": _token(self.paddle, vocab)}


def _token(tid: Any, vocab: list[str]) -> str | None:
    if isinstance(tid, int) and 0 <= tid < len(vocab):
        return vocab[tid]
    return None


def _tok(tid: Any, vocab: list[str]) -> str:
    t = _token(tid, vocab)
    return f"{tid} {t!r}" if t is not None else str(tid)


def first_difference(a: np.ndarray, b: np.ndarray) -> tuple[int, Any, Any] | None:
    """(position, torch value, paddle value) of the first differing element of two 1-D rows, or None."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    n = min(a.size, b.size)
    neq = np.nonzero(a[:n] != b[:n])[0]
    if neq.size:
        i = int(neq[0])
        return i, int(a[i]), int(b[i])
    if a.size != b.size:  # one is a prefix of the other: the shorter one ended here
        return n, int(a[n]) if n < a.size else "(end)", int(b[n]) if n < b.size else "(end)"
    return None


def item_mismatches(name: str, t_items: dict, p_items: dict, fields: list[str]) -> list[Mismatch]:
    out = []
    for i in range(min(len(t_items[fields[0]]), len(p_items[fields[0]]))):
        for f in fields:
            d = first_difference(t_items[f][i], p_items[f][i])
            if d:
                out.append(Mismatch(name, "item", i, f, i, *d))
                break
    return out


def batch_mismatches(name: str, t_batches: list, p_batches: list, fields: list[str], bs: int) -> list[Mismatch]:
    out = []
    for b, (tb, pb) in enumerate(zip(t_batches, p_batches)):
        for f in fields:
            a, c = np.asarray(tb[f]), np.asarray(pb[f])
            if a.shape == c.shape and np.array_equal(a, c):
                continue
            rows = a.shape[0] if a.ndim else 1
            for r in range(min(rows, c.shape[0] if c.ndim else 1)):
                d = first_difference(a[r] if a.ndim else a, c[r] if c.ndim else c)
                if d:
                    pos = r if f == "labels" else d[0]
                    out.append(Mismatch(name, "batch", b, f, b * bs + r, pos, d[1], d[2]))
                    break
            else:  # rows agree as far as both go: the padded widths or batch sizes differ
                out.append(Mismatch(name, "batch", b, f, b * bs, -1, list(a.shape), list(c.shape)))
            break
    return out


def split_tensors(name: str, side: dict, fields_items: list[str], fields_batches: list[str]) -> dict[str, Any]:
    """The reprod_log keys of one split, in the guide's naming: length, per item, per batch."""
    d: dict[str, Any] = {f"{name}_length": np.array([side["length"]], dtype=np.int64)}
    for i in range(side["length"]):
        for f in fields_items:
            d[f"{name}_item_{i}_{f}"] = np.asarray(side["items"][f][i])
    for b, batch in enumerate(side["batches"]):
        for f in fields_batches:
            d[f"{name}_batch_{b}_{f}"] = np.asarray(batch[f])
    return d


def _fields(t: dict, p: dict) -> tuple[list[str], list[str]]:
    both = [f for f in FIELDS if f in t and f in p]
    one = [f"{f} ({'torch' if f in t else 'paddle'} only)" for f in FIELDS if (f in t) != (f in p)]
    return both, one


def compare_pipelines(splits: list[Split], t_rep: dict, p_rep: dict, tol: Tolerance, batch_size: int,
                      max_length: int = 128) -> tuple[dict, dict, list[TensorDiff], list[Mismatch], dict]:
    """Everything the data step compares, from both workers' replies (no I/O: testable alone)."""
    torch_d, paddle_d, mismatches, info = {}, {}, [], {}
    for split in splits:
        t, p = t_rep["splits"][split.name], p_rep["splits"][split.name]
        item_f, item_one = _fields(t["items"], p["items"])
        batch_f, batch_one = _fields(t["batches"][0] if t["batches"] else {}, p["batches"][0] if p["batches"] else {})
        torch_d.update(split_tensors(split.name, t, item_f, batch_f))
        paddle_d.update(split_tensors(split.name, p, item_f, batch_f))
        found = item_mismatches(split.name, t["items"], p["items"], item_f) + \
            batch_mismatches(split.name, t["batches"], p["batches"], batch_f, batch_size)
        mismatches.extend(found)
        lengths = [int(np.asarray(x).size) for x in t["items"].get("input_ids", [])]
        info[split.name] = {
            "file": str(split.path), "examples": len(split), "batches": len(t["batches"]),
            "labels": split.label_counts(), "fields_compared": {"items": item_f, "batches": batch_f},
            "fields_one_side": sorted(set(item_one + batch_one)),
            "tokens_max": max(lengths, default=0),
            "items_at_max_length": sum(1 for n in lengths if n >= max_length),  # (possibly) truncated
            "items_differing": len({m.item for m in found if m.kind == "item"}),
            "batches_differing": len({m.index for m in found if m.kind == "batch"})}
    diffs = diff_dicts(torch_d, paddle_d, tol)
    return torch_d, paddle_d, diffs, mismatches, info


def run(rc: RunContext) -> StepResult:
    bs, max_length = int(rc.param("batch_size")), int(rc.param("max_length"))
    splits = load_splits(rc.param("data"))
    for s in splits:
        require_batches(s, bs)
    info_body = model_body(rc, "torch")
    tok_info = rc.session.request("torch", "tokenizer_info", info_body)
    vocab = tok_info["vocab"].splitlines()
    body = {"splits": {s.name: {"sentences": s.sentences, "labels": s.labels} for s in splits},
            "max_length": max_length, "batch_size": bs}
    t_body = dict(body, inject=side_inject(rc, "torch"), preset=info_body["preset"], path=info_body.get("path"))
    p_body = dict(body, inject=side_inject(rc, "paddle"), vocab=tok_info["vocab"],
                  do_lower_case=tok_info["do_lower_case"])
    rc.say(f"  {', '.join(f'{s.name}: {len(s)} sentences ({s.path.name})' for s in splits)}; "
           f"batch {bs}, max_length {max_length}")
    def progress(worker: str, part: dict) -> None:
        rc.say(f"  {worker:6s} tokenized {part['done']}/{part['of']} {part['split']} sentences")
    t_rep, p_rep = rc.both("data_pipeline", t_body, p_body, on_partial=progress)
    tol = rc.tol("data", DEFAULT)
    torch_d, paddle_d, diffs, mismatches, per_split = compare_pipelines(splits, t_rep, p_rep, tol, bs, max_length)
    for name, s in per_split.items():
        rc.say(f"  {name}: {s['examples']} items, {s['batches']} batches; "
               f"{s['items_differing']} items and {s['batches_differing']} batches differ")
    by_name = {s.name: s for s in splits}
    details: dict[str, Any] = {
        "splits": per_split, "batch_size": bs, "max_length": max_length, "data": rc.param("data") or "demo",
        "tokenizers": {"torch": f"{t_rep['tokenizer']} from {tok_info['source']}",
                       "paddle": p_rep["tokenizer"], "vocab_size": {"torch": t_rep["vocab_size"],
                                                                    "paddle": p_rep["vocab_size"]},
                       "do_lower_case": tok_info["do_lower_case"]},
        "compared_tensors": len(diffs),
        "summary_diffs": f"failing tensors only (first {SUMMARY_DIFFS}); data_diff.log lists every key"}
    if mismatches:
        details["mismatches"] = [m.to_json(by_name[m.split], vocab) for m in mismatches[:SUMMARY_DIFFS]]
    result = finish(rc, "data", torch_d, paddle_d, diffs, tol, details)
    result.diffs = [d for d in diffs if not d.passed][:SUMMARY_DIFFS]
    # the deciding figure: how many tensors differ (a token-id difference means nothing in itself)
    result.worst = float(sum(1 for d in diffs if not d.passed))
    if mismatches:
        first = mismatches[0]
        counts = "; ".join(f"{n}: {s['items_differing']}/{s['examples']} items, "
                           f"{s['batches_differing']}/{s['batches']} batches differ" for n, s in per_split.items())
        result.message = f"{first.describe(by_name[first.split], vocab)} ({counts})"
        rc.say(f"  first difference: {first.describe(by_name[first.split], vocab)}")   # whole, unlike the table
    elif result.passed:
        sizes = ", ".join(f"{n}: {s['examples']} items, {s['batches']} batches" for n, s in per_split.items())
        result.message = f"{len(diffs)} tensors identical ({sizes})"
    return result
