"""Steps data, metric, loss, lr and the offline ``coordinator compare`` (issue 3).

Framework-free: TSV validation, the data step's comparison/localisation on synthetic
replies, the lr step's per-schedule check, and the compare command (including a malicious
pickle). Real environments (marked ``frameworks``): three small runs -- everything aligned
on a user TSV with edge cases, every negative control at once on the demo set (each step
owns exactly one inject, so each failure is attributable), and the guide's literal cosine
call -- plus reprod_log reading our files inside the paddle environment.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from conftest import ROOT, coordinator, fake_env, load_summary
from coordinator.compare import Tolerance, compare
from coordinator.errors import ExitCode, UsageError
from coordinator.reprodlog import save_npy
from coordinator.safe_npy import load_reprod_npy
from coordinator.steps.data import compare_pipelines, first_difference
from coordinator.steps.lr import check_schedule, first_exceeding
from coordinator.tsv import Split, load_splits, read_tsv, require_batches

EDGE_TSV = ROOT / "tests" / "data" / "stages_edge.tsv"


def _flat(text: str) -> str:
    """Without whitespace: the CLI's console wraps long lines (even inside paths)."""
    return "".join(text.split())


# -- TSV validation (framework-free) ----------------------------------------------------------
def test_demo_set_has_both_splits_balanced():
    train, dev = load_splits(None)
    assert (train.name, len(train), dev.name, len(dev)) == ("train", 240, "dev", 60)
    assert train.label_counts() == {0: 120, 1: 120} and dev.label_counts() == {0: 30, 1: 30}
    assert train.lines[0] == 2 and train.where(1) == "demo_train.tsv:3"


def test_user_tsv_is_one_split_with_extra_columns_and_blank_lines(tmp_path):
    p = tmp_path / "mine.tsv"
    p.write_text('idx\tlabel\tsentence\n0\t1\tgood "quoted\n\n1\t0\tbad one\n', encoding="utf-8")
    (s,) = load_splits(p)
    assert s.name == "data" and s.sentences == ['good "quoted', "bad one"] and s.labels == [1, 0]
    assert s.lines == [2, 4]  # the blank line 3 is skipped, line numbers stay the file's


@pytest.mark.parametrize("content, expected", [
    ("sentence\ttarget\nfine\t1\n", "bad.tsv:1: header has no 'label' column"),
    ("text\tlabel\nfine\t1\n", "bad.tsv:1: header has no 'sentence' column"),
    ("sentence\tlabel\nfine\t1\nnot good\tpos\n", "bad.tsv:3: label 'pos' is not an integer"),
    ("sentence\tlabel\nfine\t1\n   \t0\n", "bad.tsv:3: empty sentence"),
    ("sentence\tlabel\nfine\t1\nno label here\n", "bad.tsv:3: 1 tab-separated field(s), the header has 2"),
    ("sentence\tlabel\nfine\t-1\n", "bad.tsv:2: label -1 is negative"),
    ("", "bad.tsv:1: empty file"),
    ("sentence\tlabel\n", "bad.tsv: no examples after the header"),
    ("sentence\tlabel\n\n  \n", "bad.tsv: no examples after the header"),
    ("sentence\tlabel\nfine\t1\nthree classes?\t2\n", "bad.tsv:3: label 2 is not a class of the 2-label classifier"),
    ("sentence\tlabel\nfine\t+1\n", "bad.tsv:2: label '+1' is not an integer"),          # int() takes these
    ("sentence\tlabel\nfine\t0_1\n", "bad.tsv:2: label '0_1' is not an integer"),
    ("sentence\tlabel\nfine\t\u0661\n", "bad.tsv:2: label '\u0661' is not an integer"),   # Arabic-Indic one
    ("sentence\tlabel\tlabel\nfine\t1\t0\n", "bad.tsv:1: header names 'label' more than once"),
    ("sentence\tlabel\rgood\t1\rbad\t0\r", "its lines end in a bare CR, old Mac style"),
])
def test_bad_tsv_is_refused_with_file_line_and_reason(tmp_path, content, expected):
    p = tmp_path / "bad.tsv"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError) as e:
        read_tsv(p)
    assert expected in str(e.value)


def test_a_directory_given_as_data_is_named_as_such(tmp_path):
    with pytest.raises(UsageError, match="is a directory, not a file|a directory, not a file"):
        read_tsv(tmp_path)


def test_unicode_line_separators_stay_inside_a_sentence(tmp_path):
    """Only newlines end a row (str.splitlines would also cut at U+2028, NEL or a form feed)."""
    p = tmp_path / "ok.tsv"
    p.write_text("sentence\tlabel\r\none\u2028two\x85three\x0cfour\t1\r\nnext\t0\n", encoding="utf-8")
    s = read_tsv(p)
    assert s.sentences == ["one\u2028two\x85three\x0cfour", "next"] and s.labels == [1, 0] and s.lines == [2, 3]


def test_non_utf8_tsv_names_the_line(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_bytes(b"sentence\tlabel\nfine\t1\ncaf\xe9\t0\n")
    with pytest.raises(UsageError, match=r"bad.tsv:3: not UTF-8"):
        read_tsv(p)


def test_too_small_dataset_says_how_small():
    s = Split("data", Path("tiny.tsv"), ["a", "b"], [0, 1], [2, 3])
    with pytest.raises(UsageError, match=r"tiny.tsv: 2 example\(s\), too few for 1 batch\(es\) of 4"):
        require_batches(s, 4)
    require_batches(s, 2)  # exactly one batch is enough


def test_cli_refuses_bad_tsv_before_any_worker_starts(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nbad\tx\n")
    out = tmp_path / "run"
    proc = coordinator(["run", "--steps", "data", "--data", str(bad), "--out", str(out)], env=fake_env())
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    assert _flat("bad.tsv:3: label 'x' is not an integer") in _flat(proc.stdout)
    assert not (out / "torch_worker.log").exists()  # refused before launching anything


def test_cli_refuses_dataset_smaller_than_a_batch(tmp_path):
    small = tmp_path / "small.tsv"
    small.write_text("sentence\tlabel\none\t1\ntwo\t0\n")
    out = tmp_path / "run"
    proc = coordinator(["run", "--steps", "data", "--data", str(small), "--out", str(out)], env=fake_env())
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    assert _flat("small.tsv: 2 example(s), too few for 1 batch(es) of 4") in _flat(proc.stdout)


# -- the data step's comparison on synthetic replies (framework-free) --------------------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "The", "cat", "sat"]


def _reply(items: list[list[int]], labels: list[int], bs: int, pad: int = 0) -> dict:
    it = {"input_ids": [np.array(x, np.int64) for x in items],
          "token_type_ids": [np.zeros(len(x), np.int64) for x in items],
          "labels": [np.array(lab, np.int64) for lab in labels]}
    batches = []
    for s in range(0, len(items), bs):
        chunk = items[s:s + bs]
        width = max(len(x) for x in chunk)
        ids = np.array([x + [pad] * (width - len(x)) for x in chunk], np.int64)
        batches.append({"input_ids": ids, "token_type_ids": np.zeros_like(ids),
                        "labels": np.array(labels[s:s + bs], np.int64)})
    return {"splits": {"data": {"length": len(items), "items": it, "batches": batches}}}


SPLIT = Split("data", Path("mine.tsv"), ["the cat", "The cat sat", "cat"], [1, 0, 1], [2, 3, 4])
ITEMS = [[2, 4, 6, 3], [2, 4, 6, 7, 3], [2, 6, 3]]


def test_identical_pipelines_pass_with_every_key():
    t, p = _reply(ITEMS, [1, 0, 1], 2), _reply(ITEMS, [1, 0, 1], 2)
    td, pd_, diffs, mism, info = compare_pipelines([SPLIT], t, p, Tolerance(0.0, "max"), 2)
    assert not mism and all(d.passed for d in diffs)
    assert set(td) == set(pd_) and "data_length" in td and "data_item_2_input_ids" in td and "data_batch_1_labels" in td
    assert len(diffs) == 1 + 3 * 3 + 2 * 3
    assert info["data"]["fields_compared"]["items"] == ["input_ids", "token_type_ids", "labels"]


def test_item_mismatch_names_sentence_line_and_first_token():
    bad = [list(x) for x in ITEMS]
    bad[1][1] = 1  # paddle did not lowercase "The": [UNK]
    t, p = _reply(ITEMS, [1, 0, 1], 2), _reply(bad, [1, 0, 1], 2)
    _, _, diffs, mism, info = compare_pipelines([SPLIT], t, p, Tolerance(0.0, "max"), 2)
    first = mism[0]
    assert (first.kind, first.item, first.field, first.position, first.torch, first.paddle) == \
        ("item", 1, "input_ids", 1, 4, 1)
    text = first.describe(SPLIT, VOCAB)
    assert text == ("data item 1 (mine.tsv:3) 'The cat sat': input_ids differ first at token 1: "
                    "torch 4 'the' vs paddle 1 '[UNK]'")
    assert info["data"]["items_differing"] == 1 and info["data"]["batches_differing"] == 1
    assert {d.name for d in diffs if not d.passed} == {"data_item_1_input_ids", "data_batch_0_input_ids"}


def test_collator_only_mismatch_names_the_batch_and_item():
    t, p = _reply(ITEMS, [1, 0, 1], 2, pad=0), _reply(ITEMS, [1, 0, 1], 2, pad=7)  # wrong pad id
    _, _, _, mism, info = compare_pipelines([SPLIT], t, p, Tolerance(0.0, "max"), 2)
    assert len(mism) == 1 and info["data"]["items_differing"] == 0
    m = mism[0]
    assert (m.kind, m.index, m.item, m.position, m.torch, m.paddle) == ("batch", 0, 0, 4, 0, 7)
    assert m.describe(SPLIT, VOCAB).startswith("data batch 0 (item 0) (mine.tsv:2) 'the cat': input_ids differ "
                                               "first at token 4: torch 0 '[PAD]' vs paddle 7 'sat'")


def test_label_and_length_mismatches_are_found():
    t, p = _reply(ITEMS, [1, 0, 1], 2), _reply(ITEMS, [1, 1, 1], 2)
    _, _, _, mism, _ = compare_pipelines([SPLIT], t, p, Tolerance(0.0, "max"), 2)
    assert mism[0].field == "labels" and mism[0].item == 1
    assert first_difference(np.array([2, 4, 3]), np.array([2, 4])) == (2, 3, "(end)")


def test_field_on_one_side_only_is_noted_not_compared():
    t, p = _reply(ITEMS, [1, 0, 1], 2), _reply(ITEMS, [1, 0, 1], 2)
    t["splits"]["data"]["items"]["attention_mask"] = [np.ones(len(x), np.int64) for x in ITEMS]
    _, _, diffs, mism, info = compare_pipelines([SPLIT], t, p, Tolerance(0.0, "max"), 2)
    assert not mism and all(d.passed for d in diffs)
    assert info["data"]["fields_one_side"] == ["attention_mask (torch only)"]


# -- the lr step's per-schedule check (framework-free) -----------------------------------------
def test_lr_check_names_first_step_and_never_passes_nan():
    ref = np.linspace(0, 3e-5, 10)
    got = ref.copy()
    got[4:] += 1e-9
    d, info = check_schedule("linear", ref, got, Tolerance(0.0, "max"))
    assert not d.passed and info["first_step_exceeding"] == 4 and "step 4" in d.reason
    d, info = check_schedule("cosine", ref, got, Tolerance(1e-8, "max"))
    assert d.passed and info["first_step_exceeding"] is None
    got[2] = np.nan
    assert first_exceeding(ref, got, 1.0) == 2
    assert not check_schedule("cosine", ref, got, Tolerance(1.0, "max"))[0].passed


# -- coordinator compare (framework-free) ------------------------------------------------------
def _compare(tmp_path: Path, a: dict, b: dict, *opts: str):
    save_npy(tmp_path / "a.npy", a)
    save_npy(tmp_path / "b.npy", b)
    return coordinator(["compare", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), *opts])


def test_compare_passes_identical_files_and_writes_the_log(tmp_path):
    x = {"loss": np.array([0.5], np.float32), "ids": np.arange(6).reshape(2, 3)}
    proc = _compare(tmp_path, x, x, "--out", str(tmp_path / "diff.log"))
    assert proc.returncode == ExitCode.ALIGNED, proc.stdout + proc.stderr
    log = (tmp_path / "diff.log").read_text()
    assert log in proc.stdout and log.strip().endswith("diff check passed")
    assert "root INFO: loss: \n" in log and "\tmean diff: check passed: True, value: 0.0" in log


def test_compare_fails_over_threshold_and_names_the_key(tmp_path):
    a = {"loss": np.array([0.5], np.float32), "acc": np.array([0.25])}
    b = {"loss": np.array([0.5001], np.float32), "acc": np.array([0.25])}
    proc = _compare(tmp_path, a, b, "--method", "max", "--threshold", "1e-6")
    assert proc.returncode == ExitCode.DIVERGED
    assert "loss: \n" in proc.stdout and "max diff: check passed: False" in proc.stdout
    assert "FAIL loss: max abs diff" in proc.stdout and "FAIL acc" not in proc.stdout
    assert proc.stdout.count("diff check failed") == 1
    assert _compare(tmp_path, a, b, "--method", "max", "--threshold", "1e-3").returncode == ExitCode.ALIGNED


def test_compare_rel_judges_each_key_against_its_own_size(tmp_path):
    """--method rel: energies near 2000 off by 2e-4 (1e-7 of their size) pass 1e-6, a loss near
    0.5 off by 1e-4 (2e-4 of its size) fails it and is the only key named."""
    a = {"energy": np.array([2000.0, -1500.0], np.float32), "loss": np.array([0.5], np.float32)}
    b = {"energy": np.array([2000.0002, -1500.0], np.float32), "loss": np.array([0.5001], np.float32)}
    proc = _compare(tmp_path, a, b, "--method", "rel", "--threshold", "1e-6")
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout + proc.stderr
    assert "FAIL loss: max|diff|/max|A| 2.000e-04" in proc.stdout and "FAIL energy" not in proc.stdout
    assert "\trel diff: check passed: True" in proc.stdout and "\trel diff: check passed: False" in proc.stdout
    assert _compare(tmp_path, a, b, "--method", "rel", "--threshold", "1e-3").returncode == ExitCode.ALIGNED


def test_compare_nan_fails_where_reprod_log_would_pass(tmp_path):
    a = {"loss": np.array([np.nan], np.float32)}
    proc = _compare(tmp_path, a, a)  # |nan - nan| = nan; reprod_log: "nan > 1e-6" is False -> passed
    assert proc.returncode == ExitCode.DIVERGED
    assert "check passed: False" in proc.stdout and "nan in A output at index [0]" in proc.stdout


def test_compare_refuses_broadcasting_shapes(tmp_path):
    proc = _compare(tmp_path, {"acc": np.array([0.5])}, {"acc": np.array(0.5)})
    assert proc.returncode == ExitCode.DIVERGED
    assert "shape mismatch: A (1,) vs B ()" in proc.stdout
    w = np.arange(6, dtype=np.float32).reshape(3, 2)   # reprod_log would transpose A and pass this
    proc = _compare(tmp_path, {"fc.weight": w}, {"fc.weight": np.ascontiguousarray(w.T)})
    assert proc.returncode == ExitCode.DIVERGED and "shape mismatch: A (3, 2) vs B (2, 3)" in proc.stdout


def test_compare_key_set_mismatch_names_the_keys(tmp_path):
    a = {"loss": np.zeros(1), "step_100_lr": np.zeros(1), "common": np.ones(2)}
    b = {"loss": np.zeros(1), "step_101_lr": np.zeros(1), "common": np.ones(2)}
    proc = _compare(tmp_path, a, b)
    assert proc.returncode == ExitCode.DIVERGED
    assert "keys only in a.npy (1): step_100_lr" in proc.stdout
    assert "keys only in b.npy (1): step_101_lr" in proc.stdout
    assert "2/2 common keys within" in proc.stdout and "diff check failed" in proc.stdout
    proc = _compare(tmp_path, a, b, "--out", str(tmp_path / "diff.log"))   # the log says why, too
    log = (tmp_path / "diff.log").read_text()
    assert "diff check failed" in log and "# FAIL keys only in a.npy (1): step_100_lr" in log


def test_compare_bad_paths_are_usage_errors_not_tracebacks(tmp_path):
    x = {"loss": np.zeros(1)}
    for extra, message in ((["--out", str(tmp_path / "no" / "such" / "x.log")], "cannot write the report"),
                           ([], "not a file")):
        if not extra:   # B is a directory
            save_npy(tmp_path / "a.npy", x)
            proc = coordinator(["compare", str(tmp_path / "a.npy"), str(tmp_path)])
        else:
            proc = _compare(tmp_path, x, x, *extra)
        assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_compare_refuses_a_malicious_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.npy"
    np.save(evil, np.array({"loss": _Evil(str(marker))}, dtype=object), allow_pickle=True)
    save_npy(tmp_path / "good.npy", {"loss": np.zeros(1)})
    proc = coordinator(["compare", str(evil), str(tmp_path / "good.npy")])
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    assert "refused" in proc.stderr and "evil.npy" in proc.stderr
    assert not marker.exists()  # the payload never ran
    raw = tmp_path / "raw.npy"  # a hand-made header whose payload is the bare malicious object
    with open(raw, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(pickle.dumps({"loss": _Evil(str(marker))}, protocol=2))
    proc = coordinator(["compare", str(raw), str(tmp_path / "good.npy")])
    assert proc.returncode == ExitCode.USAGE and not marker.exists()
    # the payload is live: the unsafe loader reprod_log uses runs it (which is why we never do)
    subprocess.run([sys.executable, "-c", f"import numpy; numpy.load({str(evil)!r}, allow_pickle=True)"],
                   capture_output=True, timeout=60)
    assert marker.exists()


@pytest.mark.parametrize("make, expected", [
    (lambda p: np.save(p, np.zeros(3)), "holds a bare float64 array"),
    (lambda p: p.write_bytes(b"not numpy at all"), "not an .npy file"),
    (lambda p: None, "no such file"),
])
def test_compare_bad_input_exits_2(tmp_path, make, expected):
    p = tmp_path / "x.npy"
    make(p)
    save_npy(tmp_path / "good.npy", {"loss": np.zeros(1)})
    proc = coordinator(["compare", str(p), str(tmp_path / "good.npy")])
    assert proc.returncode == ExitCode.USAGE and expected in proc.stderr


# -- real environments ---------------------------------------------------------------------------
STEPS = "data,metric,loss,lr"
NEGATIVE = ["--paddle-inject", "tokenizer_no_lower", "--paddle-inject", "metric_argmin",
            "--paddle-inject", "label_shift", "--paddle-inject", "warmup_offby1"]


def _steps(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in load_summary(out)["steps"]}


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    from real_envs import real_run
    out = tmp_path_factory.mktemp("stages_ok")
    return real_run(["--steps", STEPS, "--data", str(EDGE_TSV)], out), out


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    from real_envs import real_run
    out = tmp_path_factory.mktemp("stages_bad")
    return real_run(["--steps", STEPS, *NEGATIVE], out), out


@pytest.mark.frameworks
@pytest.mark.timeout(300)
def test_all_four_stages_align_on_real_frameworks(aligned):
    proc, out = aligned
    assert proc.returncode == ExitCode.ALIGNED, proc.stdout[-3000:] + proc.stderr[-3000:]
    st = _steps(out)
    assert all(st[n]["passed"] for n in STEPS.split(","))
    for n in STEPS.split(","):
        for f in (f"{n}_torch.npy", f"{n}_paddle.npy", f"{n}_diff.log"):
            assert (out / f).exists(), f
        assert (out / f"{n}_diff.log").read_text().strip().endswith("diff check passed")
    data = st["data"]["details"]["splits"]["data"]
    assert data["examples"] == 9 and data["batches"] == 3 and data["items_at_max_length"] == 1  # truncated
    assert data["fields_compared"]["batches"] == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    assert st["data"]["worst"] == 0.0 and st["data"]["details"]["compared_tensors"] == 1 + 9 * 4 + 3 * 4
    assert st["metric"]["details"]["torch"]["accuracy"] == st["metric"]["details"]["paddle"]["accuracy"]
    assert st["loss"]["details"]["abs_diff"] <= 1e-6 and st["loss"]["details"]["logits"]["within_forward_tolerance"]
    lr = st["lr"]["details"]["schedules"]
    assert set(lr) == {"linear", "cosine", "polynomial"}
    assert all(lr[s]["max_abs"] == 0.0 and lr[s]["first_step_exceeding"] is None for s in lr)
    assert load_reprod_npy(out / "lr_torch.npy")["cosine_lr"].shape == (1024,)
    assert "with_hard_restarts=True, num_cycles=1.0" in lr["cosine"]["paddle_call"]


@pytest.mark.frameworks
@pytest.mark.timeout(300)
def test_each_negative_control_fails_its_step_and_is_named(broken):
    proc, out = broken
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout[-3000:] + proc.stderr[-3000:]
    st = _steps(out)
    assert [st[n]["status"] for n in STEPS.split(",")] == ["failed"] * 4
    # data: the first sentence with a capital, at the token after [CLS]; its figure counts the tensors
    assert st["data"]["worst"] == (out / "data_diff.log").read_text().count("check passed: False") > 0
    assert "differ" in proc.stdout.split("lockstep verdict", 1)[1].split("data", 1)[1].splitlines()[0]
    assert st["data"]["message"].startswith(
        "train item 1 (demo_train.tsv:3) 'The animated feature bored me so much that i walked out early.': "
        "input_ids differ first at token 1: torch 1996 'the' vs paddle 100 '[UNK]'")
    first = st["data"]["details"]["mismatches"][0]
    assert (first["line"], first["position"], first["torch_token"], first["paddle_token"]) == (3, 1, "the", "[UNK]")
    assert ("  first difference: train item 1 (demo_train.tsv:3) 'The animated feature bored me so much that i "
            "walked out early.': input_ids differ first at token 1") in proc.stdout   # whole, not clipped
    # metric: argmin flips every prediction, so the accuracies add up to one
    m = st["metric"]["details"]
    assert m["torch"]["accuracy"] + m["paddle"]["accuracy"] == 1.0
    assert "first differing batch" in st["metric"]["message"]
    # loss: same logits, labels rolled on paddle
    assert st["loss"]["details"]["logits"]["within_forward_tolerance"] and st["loss"]["details"]["samples_differing"]
    assert "look at the labels or the loss call" in st["loss"]["message"]
    # lr: warmup 346 on paddle; every schedule is off from update 1
    for s in ("linear", "cosine", "polynomial"):
        info = st["lr"]["details"]["schedules"][s]
        assert info["first_step_exceeding"] == 1 and "warmup=346" in info["paddle_call"]
        assert f"{s}: first update exceeding" in st["lr"]["message"]


@pytest.mark.frameworks
@pytest.mark.timeout(180)
def test_guide_cosine_call_is_a_real_gap_not_float_precision(tmp_path):
    from real_envs import real_run
    proc = real_run(["--steps", "lr", "--param", "lr_cosine=guide", "--threads", "1"], tmp_path)
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout[-3000:]
    lr = _steps(tmp_path)["lr"]["details"]["schedules"]
    assert lr["linear"]["passed"] and lr["polynomial"]["passed"] and not lr["cosine"]["passed"]
    cos = lr["cosine"]
    assert cos["first_step_exceeding"] == 346  # the first update after warmup
    assert cos["worst_step"]["step"] == 1023 and cos["max_abs"] > 2.9e-5  # paddle is back at the peak lr
    assert "NOT float precision" in cos["note"]
    # the guide's published cosine diffs at its steps 500, 700, 900
    got = [cos["guide_milestones"][f"step_{i}"]["abs_diff"] for i in (500, 700, 900)]
    assert got == pytest.approx([9.35605818719964e-06, 1.3681476625617212e-05, 1.8924391285779562e-05], rel=1e-9)


REPROD = """
import sys
from reprod_log import ReprodDiffHelper
h = ReprodDiffHelper()
h.compare_info(h.load_info(sys.argv[1]), h.load_info(sys.argv[2]))
h.report(diff_method=sys.argv[3], diff_threshold=float(sys.argv[4]), path=sys.argv[5])
"""


@pytest.mark.frameworks
@pytest.mark.timeout(180)
@pytest.mark.parametrize("which", ["aligned", "broken"])
def test_reprod_log_reads_our_lr_and_metric_files_and_agrees(which, request, tmp_path):
    from real_envs import run_in_env
    proc, out = request.getfixturevalue(which)
    script = tmp_path / "check.py"
    script.write_text(REPROD)
    strip = lambda lines: [ln.split("] ", 1)[1] for ln in lines]  # noqa: E731  (timestamps differ)
    steps = [("lr", "1e-15"), ("metric", "0"), ("loss", "1e-6")]
    if which == "aligned":   # reprod_log itself crashes on the broken tokenizer's different lengths
        steps.append(("data", "0"))
    for step, threshold in steps:
        log = tmp_path / f"{step}_reprod.log"
        argv = ["x", str(out / f"{step}_torch.npy"), str(out / f"{step}_paddle.npy"), "max", threshold, str(log)]
        r = run_in_env("paddle", f"import sys; sys.argv = {argv!r}; exec(open({str(script)!r}).read())")
        assert r.returncode == 0, r.stderr[-2000:]
        theirs = strip(log.read_text().strip().splitlines())
        ours = strip((out / f"{step}_diff.log").read_text().strip().splitlines())
        assert theirs[-1] == ours[-1] == ("root INFO: diff check " + ("passed" if which == "aligned" else "failed"))
        assert [ln.split(", value:")[0] for ln in theirs] == [ln.split(", value:")[0] for ln in ours]
        if step != "lr":   # the very values too (lr: reprod_log prints numpy's float repr of a 0-d diff)
            assert theirs == ours, [(a, b) for a, b in zip(theirs, ours) if a != b][:3]
        # and our offline command agrees with both
        c = coordinator(["compare", str(out / f"{step}_torch.npy"), str(out / f"{step}_paddle.npy"),
                         "--method", "max", "--threshold", threshold])
        assert c.returncode == (ExitCode.ALIGNED if which == "aligned" else ExitCode.DIVERGED), c.stdout
        assert strip(c.stdout.splitlines()[:len(ours)]) == ours


def test_diff_log_lists_keys_in_the_npy_files_order_as_reprod_log_does(tmp_path):
    """reprod_log reports in the order of the reference file's keys; a step that compared them in
    another order (train: acc first) still writes its log in the file's order."""
    from types import SimpleNamespace
    from coordinator.compare import Tolerance, compare
    from coordinator.steps.common import finish
    t = {"loss_0": np.float32(1.0), "loss_1": np.float32(0.5), "acc": np.float64(0.75)}
    p = dict(t)
    diffs = [compare("acc", t["acc"], p["acc"], Tolerance(0, "max"))] + \
        [compare(k, t[k], p[k], Tolerance(0, "max")) for k in ("loss_0", "loss_1")]
    finish(SimpleNamespace(out=tmp_path), "train", t, p, diffs, Tolerance(0, "max"))
    names = [ln.split("INFO: ")[1].rstrip(": ") for ln in (tmp_path / "train_diff.log").read_text().splitlines()
             if ln.endswith(": ")]
    assert names == ["loss_0", "loss_1", "acc"] == list(load_reprod_npy(tmp_path / "train_torch.npy"))


@pytest.mark.frameworks
@pytest.mark.timeout(300)
def test_a_large_data_file_shows_progress_while_both_sides_tokenize(tmp_path):
    """5001 sentences: each worker reports at 5000 instead of staying silent (a 50k-line file took
    ~50 s without a word); the result is the same comparison (the control: all identical)."""
    from real_envs import real_run
    body = (ROOT / "coordinator/data/demo_train.tsv").read_text().splitlines()
    big = tmp_path / "big.tsv"
    big.write_text(body[0] + "\n" + "\n".join(body[1 + i % (len(body) - 1)] for i in range(5001)) + "\n")
    proc = real_run(["--steps", "data", "--data", str(big)], tmp_path / "r")
    assert proc.returncode == ExitCode.ALIGNED, proc.stdout[-3000:] + proc.stderr[-3000:]
    for side in ("torch ", "paddle"):
        assert f"  {side} tokenized 5000/5001 data sentences" in proc.stdout
    assert "data: 5001 items" in proc.stdout


@pytest.mark.parametrize("method, ref, got, fails_at, passes_at", [
    # each statistic decides on its own: the thresholds sit between it and the other statistics
    ("mean", [0, 0, 0, 0], [0, 0, 0, 4e-3], 5e-4, 2e-3),          # mean 1e-3, max 4e-3, min 0
    ("max", [0, 0, 0, 0], [0, 0, 0, 4e-3], 2e-3, 5e-3),
    ("min", [0, 0, 0, 0], [1e-3, 2e-3, 3e-3, 4e-3], 5e-4, 2e-3),  # min 1e-3 (mean 2.5e-3, max 4e-3)
    ("rel", [1, 1, 1, 2], [1, 1, 1, 2.004], 1e-3, 3e-3),           # 4e-3 / max|ref| 2 = 2e-3
])
def test_every_tolerance_method_fails_above_its_own_statistic(method, ref, got, fails_at, passes_at):
    """Negative control for each method: a statistic that were not computed (0) would pass both."""
    a, b = np.array(ref, np.float64), np.array(got, np.float64)
    bad = compare("x", a, b, Tolerance(fails_at, method))
    said = "max|diff|/max|torch|" if method == "rel" else f"{method} abs diff"
    assert not bad.passed and said in bad.reason, bad.reason
    assert compare("x", a, b, Tolerance(passes_at, method)).passed


def test_compare_command_default_method_is_mean_and_fails_above_it(tmp_path):
    a = {"loss": np.zeros(4, np.float32)}
    b = {"loss": np.array([0, 0, 0, 4e-3], np.float32)}       # mean 1e-3
    proc = _compare(tmp_path, a, b, "--threshold", "5e-4")
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout + proc.stderr
    assert "mean diff: check passed: False" in proc.stdout and "FAIL loss: mean abs diff 1.000e-03" in proc.stdout
    assert _compare(tmp_path, a, b, "--threshold", "2e-3").returncode == ExitCode.ALIGNED
