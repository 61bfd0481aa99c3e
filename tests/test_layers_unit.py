"""Layer map, live pairing, tolerance, report and view of the ``layers`` step, without a framework.

The module trees and events below have the shape the real workers send (see
torch_worker/ops_layers.py); every comparison has a deliberately broken twin.
"""

import io
import json
import re

import numpy as np
import pytest

from coordinator.advice import advice_for
from coordinator.errors import UsageError
from coordinator.layerdiff import HoldStore, LayerTolerance, LiveDiff, Row, compare_row
from coordinator.layermap import build, kind, load_override
from coordinator.layerview import LayerView, row_line
from coordinator.mapping import WeightMap
from coordinator.report_html import render

WMAP = WeightMap.from_dict({
    "rename": [{"pattern": r"\.layer\.", "replace": ".layers."},
               {"pattern": r"attn\.query\.", "replace": "attn.q_proj."},
               {"pattern": r"\.LayerNorm\.", "replace": ".norm1."},
               {"pattern": r"ffn\.dense\.", "replace": "linear1."}],
    "transform": [{"pattern": r"\.weight$", "ndim": 2, "op": "transpose"}]})


def m(name, typ, params=(), children=(), function=False):
    d = {"name": name, "type": typ, "params": list(params), "children": list(children)}
    if function:
        d["function"] = True
    return d


TORCH = [m("", "Model", children=["enc"]), m("enc", "Encoder", children=["layer"]),
         m("enc.layer", "ModuleList", children=["0"]),
         m("enc.layer.0", "Block", children=["attn", "LayerNorm", "ffn", "drop"]),
         m("enc.layer.0.attn", "Attention", children=["query", "dropout"]),
         m("enc.layer.0.attn.query", "Linear", ["weight", "bias"]),
         m("enc.layer.0.attn.dropout", "Dropout"),
         m("enc.layer.0.LayerNorm", "LayerNorm", ["weight", "bias"]),
         m("enc.layer.0.ffn", "FFN", children=["dense", "act"]),
         m("enc.layer.0.ffn.dense", "Linear", ["weight", "bias"]),
         m("enc.layer.0.ffn.act", "GELUActivation"),
         m("enc.layer.0.drop", "Dropout")]
PADDLE = [m("", "Model", children=["enc"]), m("enc", "Encoder", children=["layers"]),
          m("enc.layers", "LayerList", children=["0"]),
          m("enc.layers.0", "Block", children=["attn", "norm1", "linear1", "drop", "activation"]),
          m("enc.layers.0.attn", "MHA", children=["q_proj"]),
          m("enc.layers.0.attn.q_proj", "Linear", ["weight", "bias"]),
          m("enc.layers.0.norm1", "LayerNorm", ["weight", "bias"]),
          m("enc.layers.0.linear1", "Linear", ["weight", "bias"]),
          m("enc.layers.0.drop", "Dropout"),
          m("enc.layers.0.activation", "function:_gelu", function=True)]


def test_layer_map_rules_and_unmapped_listing():
    lm = build(TORCH, PADDLE, WMAP)
    got = {p.torch: (p.paddle, p.how) for p in lm.pairs}
    assert got["enc.layer.0.attn.query"] == ("enc.layers.0.attn.q_proj", "weights")
    assert got["enc.layer.0.LayerNorm"] == ("enc.layers.0.norm1", "weights")
    assert got["enc.layer.0"] == ("enc.layers.0", "params")
    assert got["enc"] == ("enc", "params") and got["enc.layer"] == ("enc.layers", "params")
    assert got["enc.layer.0.drop"] == ("enc.layers.0.drop", "position")      # same parent, one dropout each
    assert got["enc.layer.0.ffn.act"] == ("enc.layers.0.activation", "unique")  # HF module <-> paddle function
    un = {(u.side, u.name): u.reason for u in lm.unmapped}
    # negative controls: containers with no exact counterpart, and a dropout with no partner, are listed
    assert got["enc.layer.0.attn"] == ("enc.layers.0.attn", "params")        # same parameter set
    assert ("torch", "enc.layer.0.ffn") in un and "exactly its parameters" in un[("torch", "enc.layer.0.ffn")]
    assert "no dropout module on the paddle side" in un[("torch", "enc.layer.0.attn.dropout")]
    assert all(u.name not in ("enc.layer", "enc.layers") for u in lm.unmapped)  # list containers never run
    assert [p.torch for p in lm.mapped_ancestors("enc.layer.0.ffn.dense")] == ["enc.layer.0", "enc.layer", "enc", ""]


def test_activations_of_two_types_pair_by_type_not_by_registration_order():
    """torch registers act1 GELU then act2 Tanh, the port tanh then gelu (called in the same order):
    the pairs follow the types. Position pairs them when the types do not match one to one (the
    control: one ReLU and one GELU against two GELUs stays positional)."""
    torch = [m("", "Net", ["w"], children=["act1", "act2"]), m("act1", "GELU"), m("act2", "Tanh")]
    paddle = [m("", "Net", ["w"], children=["tanh", "gelu"]), m("tanh", "Tanh"), m("gelu", "GELU")]
    wmap = WeightMap.from_dict({})
    got = {p.torch: p.paddle for p in build(torch, paddle, wmap).pairs}
    assert got["act1"] == "gelu" and got["act2"] == "tanh"
    mixed = [m("", "Net", ["w"], children=["a", "b"]), m("a", "ReLU"), m("b", "GELU")]
    twin = [m("", "Net", ["w"], children=["x", "y"]), m("x", "GELU"), m("y", "GELU")]
    got = {p.torch: p.paddle for p in build(mixed, twin, wmap).pairs}
    assert got["a"] == "x" and got["b"] == "y"


def test_ambiguous_parameterless_modules_are_listed_not_guessed():
    torch = TORCH + [m("enc.layer.0.ffn.act2", "ReLU")]
    lm = build(torch, PADDLE, WMAP)
    assert "enc.layer.0.ffn.act" not in lm.t2p        # two activations vs one function: cannot tell
    reasons = [u.reason for u in lm.unmapped if u.name == "enc.layer.0.ffn.act"]
    assert reasons and "cannot tell which is which" in reasons[0]


def test_override_file_wins_and_bad_names_are_named(tmp_path):
    f = tmp_path / "layers.toml"
    f.write_text('[[layer]]\ntorch = "enc.layer.0.attn.dropout"\npaddle = "enc.layers.0.drop"\n'
                 '[ignore]\ntorch = ["ffn\\\\.act$"]\n')
    lm = build(TORCH, PADDLE, WMAP, load_override(f))
    assert lm.t2p["enc.layer.0.attn.dropout"].paddle == "enc.layers.0.drop"
    assert lm.t2p["enc.layer.0.attn.dropout"].how == "override"
    assert "enc.layer.0.ffn.act" not in lm.t2p
    assert any(u.name == "enc.layer.0.ffn.act" and "ignored" in u.reason for u in lm.unmapped)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[layer]]\ntorch = "enc.layer.9"\npaddle = "enc.layers.0"\n')
    with pytest.raises(UsageError, match=r"bad.toml.*'enc.layer.9' does not exist"):
        build(TORCH, PADDLE, WMAP, load_override(bad))


def test_kind_families():
    assert kind("GELUActivation") == kind("function:<lambda>") == kind("Tanh") == "activation"
    assert kind("Dropout") == kind("FusedDropout") == "dropout"
    assert kind("LayerNorm") == "layernorm"


def _diff(stop=False, budget=1 << 30, keep=None):
    lm = build(TORCH, PADDLE, WMAP)
    return LiveDiff(lm, lambda what, typ: LayerTolerance(5e-6), weight_map=WMAP, hold_budget=budget,
                    stop_at_first=stop, keep=keep)


def _events(side, x, q, ln, broken=False):
    """A forward as the workers stream it (the block's output is the LayerNorm's: sent as same_as)."""
    blk, qn, lnn = (("enc.layer.0", "enc.layer.0.attn.query", "enc.layer.0.LayerNorm") if side == "torch" else
                    ("enc.layers.0", "enc.layers.0.attn.q_proj", "enc.layers.0.norm1"))
    res = q + x + (1e-3 if broken else 0.0)
    return [{"ev": "in", "module": blk, "seq": 1, "tensor": x, "made_by": []},
            {"ev": "in", "module": qn, "seq": 2, "tensor": x, "made_by": []},
            {"ev": "out", "module": qn, "seq": 3, "tensor": q},
            {"ev": "in", "module": lnn, "seq": 4, "tensor": res.astype(np.float32), "made_by": []},
            {"ev": "out", "module": lnn, "seq": 5, "tensor": ln},
            {"ev": "out", "module": blk, "seq": 6, "same_as": [lnn]}]


@pytest.mark.parametrize("interleave", [False, True])
def test_live_pairs_compare_and_release(interleave):
    rng = np.random.RandomState(0)
    x, q, ln = (rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3))
    d = _diff()
    te, pe = _events("torch", x, q, ln), _events("paddle", x, q, ln)
    order = [e for pair in zip(te, pe) for e in pair] if interleave else te + pe
    for e in order:
        d.feed("torch" if e in te else "paddle", {k: v for k, v in e.items() if v is not None})
    stats = d.finish()
    keys = [(r.what, r.key) for r in d.ordered("forward")]
    assert ("output", "enc.layer.0.attn.query") in keys and ("input", "enc.layer.0.LayerNorm:input") in keys
    assert ("output", "enc.layer.0") in keys            # resolved from same_as without a second copy
    assert all(r.passed and r.max_abs == 0.0 for r in d.rows)
    assert not d.store.keys() and stats["only_torch"] == [] and stats["problems"] == []
    assert not d.first


def test_live_flags_a_broken_residual_at_the_exact_row():
    rng = np.random.RandomState(1)
    x, q, ln = (rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3))
    d = _diff(stop=True)
    for e in _events("torch", x, q, ln):
        d.feed("torch", {k: v for k, v in e.items() if v is not None})
    for e in _events("paddle", x, q, ln, broken=True):
        d.feed("paddle", {k: v for k, v in e.items() if v is not None})
    first = d.first["forward"]
    assert first.key == "enc.layer.0.LayerNorm:input" and first.what == "input"
    assert "of max|torch|" in first.reason
    assert d.stopped and not any(r.key == "enc.layer.0.LayerNorm" for r in d.rows)  # nothing after the stop
    assert d.tensors(first) is not None


def test_input_reference_suppresses_the_input_row():
    d = _diff()
    x = np.ones((2, 4), np.float32)
    d.feed("paddle", {"ev": "in", "module": "enc.layers.0.attn.q_proj", "seq": 1, "tensor": x})
    d.feed("torch", {"ev": "in", "module": "enc.layer.0.attn.query", "seq": 1, "ref": ["enc.layer.0"]})
    assert not d.rows and not d.store.keys()   # paddle's copy was released, no row made


def test_tolerance_is_relative_to_the_tensor_size_with_a_phase_floor():
    tol = LayerTolerance(5e-6, 1e-4)
    big = np.full((8,), 200.0, np.float32)
    r = compare_row(Row("forward", "output", "a", "a", "a"), big, big + np.float32(2e-4), tol)
    assert r.passed and r.norm_err < 5e-6                        # 1e-6 of its size
    small = np.full((8,), 0.5, np.float32)
    r = compare_row(Row("forward", "output", "b", "b", "b"), small, small + np.float32(2e-4), tol)
    assert not r.passed                                          # 4e-4 of its size: the negative control
    noise = np.full((8,), 1e-10, np.float32)                     # a mathematically-zero gradient
    r = compare_row(Row("backward", "param_grad", "c", "c", "c"), noise, -noise, LayerTolerance(1e-4), floor=1e-5)
    assert r.passed
    r = compare_row(Row("backward", "param_grad", "c", "c", "c"), noise, -noise, LayerTolerance(1e-4), floor=0.0)
    assert not r.passed


def test_nan_and_shape_mismatch_never_pass_but_broadcast_is_noted():
    tol = LayerTolerance()
    a = np.ones((2, 3), np.float32)
    b = a.copy()
    b[1, 2] = np.nan
    assert not compare_row(Row("forward", "output", "n", "n", "n"), a, b, tol).passed
    assert not compare_row(Row("forward", "output", "s", "s", "s"), a, np.ones((3, 2), np.float32), tol).passed
    r = compare_row(Row("forward", "output", "p", "p", "p"), np.ones((1, 3), np.float32), np.ones((4, 3), np.float32), tol)
    assert r.passed and "broadcast" in r.note
    g = compare_row(Row("backward", "grad", "p", "p", "p"), np.full((1, 3), 4.0, np.float32),
                    np.ones((4, 3), np.float32), tol)
    assert g.passed and "summed" in g.note                       # torch's broadcast gradient is the sum
    g = compare_row(Row("backward", "grad", "p", "p", "p"), np.full((1, 3), 3.0, np.float32),
                    np.ones((4, 3), np.float32), tol)
    assert not g.passed


def test_hold_store_spills_exactly_and_cleans_up(tmp_path):
    st = HoldStore(budget=100, spill_dir=tmp_path)
    arrs = {i: np.arange(40 * (i + 1), dtype=np.float32).reshape(-1, 2) + 0.5 for i in range(4)}
    arrs[4] = np.arange(60, dtype=np.float32).reshape(6, 10).T           # a transposed view (paddle layout)
    arrs[5] = np.arange(60, dtype=np.float64).reshape(6, 10)[:, ::3]     # strided, not a transpose
    for i, a in arrs.items():
        st.put(i, a)
    assert st.spilled > 0 and list(tmp_path.glob("layers-hold-*.bin"))
    for i in (4, 5):
        got = st.get(i)
        assert got.shape == arrs[i].shape and got.dtype == arrs[i].dtype and np.array_equal(got, arrs[i])
    assert np.array_equal(st.get(3), arrs[3])
    for i in (2, 0, 5, 3, 4, 1):
        assert np.array_equal(st.pop(i), arrs[i])
    st.close()
    assert not list(tmp_path.glob("layers-hold-*.bin"))


def test_param_grads_are_converted_to_paddle_layout():
    d = _diff()
    g = np.arange(12, dtype=np.float32).reshape(3, 4)           # torch [out, in]
    d.feed("torch", {"ev": "param_grad", "param": "enc.layer.0.attn.query.weight", "seq": 9, "tensor": g})
    d.feed("paddle", {"ev": "param_grad", "param": "enc.layers.0.attn.q_proj.weight", "seq": 9, "tensor": g.T.copy()})
    assert d.rows[0].passed and d.rows[0].paddle == "enc.layers.0.attn.q_proj.weight"
    d.feed("torch", {"ev": "param_grad", "param": "enc.layer.0.attn.query.bias", "seq": 10, "tensor": g[0]})
    d.feed("paddle", {"ev": "param_grad", "param": "enc.layers.0.attn.q_proj.bias", "seq": 10, "tensor": g[0] + 1})
    assert not d.rows[1].passed                                  # negative control


def test_advice_is_data_keyed_by_type():
    assert "epsilon" in " ".join(advice_for("LayerNorm")["causes"])
    assert "approximation" in " ".join(advice_for("nothing", "function:_gelu")["causes"])
    assert "transpose" in " ".join(advice_for("Linear")["causes"]).lower() or \
        "[out, in]" in " ".join(advice_for("Linear")["causes"])
    assert advice_for("NoSuchLayer") is None
    # torch's nn.Conv1d against paddle's nn.Conv1D is a convolution (padding first), while HF GPT-2's
    # Conv1D alone is a Linear with [in, out] weights: exact names first (Conv1d got Linear advice)
    assert "padding" in advice_for("Conv1d", "Conv1D")["causes"][0]
    assert advice_for("Conv1D")["kind"] == "Linear"
    assert "momentum" in " ".join(advice_for("BatchNorm2d", "BatchNorm2D")["causes"])
    assert "gate order" in " ".join(advice_for("GRU", "GRU")["causes"])


def _row(i, passed=True, err=1e-7):
    return {"phase": "forward", "what": "output", "key": f"l{i}", "torch": f"enc.l{i}", "paddle": f"enc.p{i}",
            "torch_type": "Linear", "paddle_type": "Linear", "seq": i, "shape": [2], "passed": passed,
            "max_abs": err, "norm_err": err, "reason": "" if passed else "over <tolerance> & more"}


def test_report_is_self_contained_and_marks_the_first_divergence():
    rows = [_row(0), _row(1, err=0.0), _row(2, False, 3e-5), _row(3, False, 1e-3)]
    first = dict(rows[2], isolation={"verdict": "own", "why": "the layer <itself>",
                                     "advice": {"causes": ["epsilon differs"]}}, top=[])
    data = {"status": "diverged", "exit_code": 1, "steps": [
        {"name": "layers", "status": "failed", "passed": False, "worst": 1e-3, "tolerance": "x <= 5e-06",
         "message": "first divergent layer", "seconds": 1.0, "diffs": [],
         "details": {"tolerance": {"forward": "max|diff|/max|torch| <= 5e-06", "backward": "<= 0.0001"},
                     "forward": {"rows": rows, "failed": 2, "first": first, "stats": {}},
                     "backward": {"skipped": "stopped at the first divergence"},
                     "map": {"n_pairs": 4, "n_unmapped": {"torch": 1, "paddle": 0},
                             "unmapped": [{"side": "torch", "name": "enc.x", "type": "Dropout", "count": 1,
                                           "reason": "no counterpart"}], "pairs": []}}}]}
    page = render(data)
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "first divergence: enc.l2" in page
    assert not re.search(r"(src|href)=['\"]?https?:", page) and "<script" not in page
    assert "the layer &lt;itself&gt;" in page and "epsilon differs" in page and "enc.x" in page
    assert "tolerance 5e-06" in page and "skipped: stopped at the first divergence" in page


def test_view_plain_lines_and_live_panel():
    out = io.StringIO()
    r_ok = Row("forward", "output", "a", "enc.a", "enc.p", "Linear", "Linear", seq=1, max_abs=1e-7, norm_err=1e-8)
    r_bad = Row("forward", "output", "b", "enc.b", "enc.q", "LayerNorm", "LayerNorm", seq=2, passed=False,
                max_abs=5e-4, norm_err=2e-5, reason="too far")
    with LayerView(lambda s: None, stream=out, live=False) as v:
        v.on_row(r_ok)
        v.on_row(r_bad)
    lines = out.getvalue().splitlines()
    assert lines[0].lstrip().startswith("ok") and "enc.a" in lines[0]
    assert lines[1].lstrip().startswith("FAIL") and "too far" in lines[1]
    assert row_line(r_bad).count("\n") == 0
    live = io.StringIO()
    with LayerView(lambda s: None, stream=live, live=True) as v:
        v.on_row(r_ok)
        v.on_row(r_bad)
    text = live.getvalue()
    assert "first divergence (forward): enc.b" in text and "1 over" in text


def test_summary_rows_are_json():
    """Strict JSON (no NaN/Infinity, which json.dumps writes by default): a passing row's max_rel is
    NaN until to_json(), a failing row on a NaN has an infinite normalized error."""
    ok = compare_row(Row("forward", "output", "a", "a", "a"), np.ones(3, np.float32), np.ones(3, np.float32),
                     LayerTolerance())
    assert np.isnan(ok.max_rel)
    bad = compare_row(Row("forward", "output", "b", "b", "b"), np.ones(3, np.float32),
                      np.array([1, np.nan, 1], np.float32), LayerTolerance())
    assert not bad.passed and not np.isfinite(bad.norm_err)
    assert json.loads(json.dumps(ok.to_json(), allow_nan=False))["max_rel"] is None
    assert json.loads(json.dumps(bad.to_json(), allow_nan=False))["norm_err"] is None


def test_chunked_statistics_match_the_one_pass_comparison(monkeypatch):
    import coordinator.layerdiff as ld
    from coordinator.compare import Tolerance, compare
    rng = np.random.RandomState(3)
    a = rng.standard_normal((5, 7, 3)).astype(np.float32)
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 1e-3
    monkeypatch.setattr(ld, "CHUNK", 8)                     # many chunks
    r = compare_row(Row("forward", "output", "x", "x", "x"), a, b, LayerTolerance(1e-6))   # fails
    d = compare("x", a, b, Tolerance(1.0, "max"))
    assert not r.passed and r.max_abs == d.max_abs and r.worst_index == list(d.worst_index)
    assert r.mean_abs == pytest.approx(d.mean_abs) and r.max_rel == pytest.approx(d.max_rel)
    assert r.scale == float(np.abs(a).max())
    ok = compare_row(Row("forward", "output", "x", "x", "x"), a, b, LayerTolerance(1.0))  # passes: same
    assert ok.passed and (ok.max_abs, ok.worst_index, ok.scale, ok.mean_abs, ok.rms_rel) == \
        (r.max_abs, r.worst_index, r.scale, r.mean_abs, r.rms_rel)
    assert np.isnan(ok.max_rel) and ok.to_json()["max_rel"] is None   # computed for failing rows only
    b[4, 6, 2] = np.inf                                     # in the last chunk: still never passes
    r = compare_row(Row("forward", "output", "x", "x", "x"), a, b, LayerTolerance(1.0))
    assert not r.passed and "inf in paddle output at index [4, 6, 2]" in r.reason


def test_chunked_statistics_in_float16_do_not_overflow(monkeypatch):
    """The sums run as float32 BLAS dots; float16 has no BLAS and its own accumulator would
    overflow at 65504, so it is summed in float64 (control: the float64 comparison)."""
    import coordinator.layerdiff as ld
    monkeypatch.setattr(ld, "CHUNK", 1 << 16)
    a = np.full(1 << 18, 300.0, np.float16)
    b = a + np.float16(2.0)
    r16 = compare_row(Row("forward", "output", "x", "x", "x"), a, b, LayerTolerance(1e-3))
    r64 = compare_row(Row("forward", "output", "x", "x", "x"), a.astype(np.float64), b.astype(np.float64),
                      LayerTolerance(1e-3))
    assert r16.mean_abs == pytest.approx(r64.mean_abs) == pytest.approx(2.0)
    assert r16.rms_rel == pytest.approx(r64.rms_rel, rel=1e-3) and np.isfinite(r16.rms_rel)
    assert r16.max_rel == pytest.approx(2.0 / 300.0, rel=1e-2)


def test_chunked_max_rel_ignores_exact_zeros_and_flags_zero_reference():
    from coordinator.layerdiff import _chunked_stats
    a = np.zeros(10, np.float32)
    assert _chunked_stats(a, a.copy())["max_rel"] == 0.0                 # 0/0 everywhere is no error
    r = compare_row(Row("forward", "output", "x", "x", "x"), a, a.copy(), LayerTolerance(1.0))
    assert r.max_abs == 0.0 and r.passed
    b = a.copy()
    b[3] = 1e-3
    r = compare_row(Row("forward", "output", "x", "x", "x"), a, b, LayerTolerance(1e-6))
    assert r.max_rel == float("inf") and r.to_json()["max_rel"] is None
    assert r.worst_index == [3]


def test_transposed_param_grad_rows_match_contiguous_copies():
    """A torch weight gradient compared in paddle's layout as a transposed view (tiled blocks)
    gives the very statistics and worst index of its contiguous copy."""
    rng = np.random.RandomState(5)
    t = rng.standard_normal((300, 257)).astype(np.float32)
    p = np.ascontiguousarray(t.T) + rng.standard_normal((257, 300)).astype(np.float32) * np.float32(1e-6)
    p[250, 7] += np.float32(0.5)
    rv = compare_row(Row("backward", "param_grad", "w", "w", "w"), t.T, p, LayerTolerance(1e-3))
    rc = compare_row(Row("backward", "param_grad", "w", "w", "w"), np.ascontiguousarray(t.T), p, LayerTolerance(1e-3))
    assert not rv.passed and rv.worst_index == rc.worst_index == [250, 7]
    assert (rv.max_abs, rv.scale, rv.max_rel) == (rc.max_abs, rc.scale, rc.max_rel)
    assert rv.mean_abs == pytest.approx(rc.mean_abs, rel=1e-6) and rv.rms_rel == pytest.approx(rc.rms_rel, rel=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_threaded_statistics_equal_one_pass(monkeypatch, layout):
    """One large tensor compared by several threads (many-core hosts) gives one pass's worst
    position (the first largest, even when it ties in two parts), max|ref| and max_rel; the
    sums differ only in rounding. A NaN in the last part still fails the row."""
    import coordinator.layerdiff as ld
    monkeypatch.setattr(ld, "CHUNK", 1024)
    monkeypatch.setattr(ld, "PART_MIN", 2048)
    rng = np.random.RandomState(11)
    base = rng.standard_normal((1280, 384)).astype(np.float32)
    other = base + rng.standard_normal(base.shape).astype(np.float32) * np.float32(1e-5)
    for r, c in ((70, 4), (1200, 8)):                  # an exact tie: the first (part 0) must win
        base[r, c], other[r, c] = 0.0, 0.25
    t, p = {"contiguous": (base, other), "transposed": (np.ascontiguousarray(base.T).T, other),
            "strided": (base[:, ::2], other[:, ::2])}[layout]
    one = ld._chunked_stats(t, p, rel=True, threads=1)
    assert ld.block_count(t, p, ld.CHUNK) >= 8
    parts_run: list[int] = []
    real_part = ld._part_stats
    monkeypatch.setattr(ld, "_part_stats", lambda *a: parts_run.append(a[3][1]) or real_part(*a))
    for threads in (2, 3, 8):
        parts_run.clear()
        many = ld._chunked_stats(t, p, rel=True, threads=threads)
        assert parts_run == [threads] * threads          # really cut into one part per thread
        assert many["worst"] == one["worst"] and many["worst"][0] == 70
        assert (many["max_abs"], many["scale"], many["max_rel"]) == (one["max_abs"], one["scale"], one["max_rel"])
        assert many["mean_abs"] == pytest.approx(one["mean_abs"], rel=1e-9)
        assert many["rms_rel"] == pytest.approx(one["rms_rel"], rel=1e-9)
    bad = np.array(p, copy=True)
    bad[-1, -1] = np.nan
    assert ld._chunked_stats(t, bad, rel=False, threads=4) is None
    row = compare_row(Row("forward", "output", "x", "x", "x"), t, p, LayerTolerance(1e-3), threads=4)
    assert not row.passed and row.worst_index == list(one["worst"])


def test_row_block_parts_cover_every_block_once():
    """Parts of ``row_blocks`` (one per comparing thread) are consecutive and together exactly the
    whole; control: the blocks of one pass."""
    from coordinator.compare import block_count, row_blocks
    rng = np.random.RandomState(2)
    for a, b in ((rng.standard_normal(10_001).astype(np.float32),) * 2,
                 (rng.standard_normal((513, 300)).astype(np.float32).T, rng.standard_normal((300, 513)))):
        whole = [(i, x.copy(), y.copy()) for i, x, y in row_blocks(a, b, 700)]
        assert len(whole) == block_count(a, b, 700)
        for n in (1, 2, 3, 7, len(whole) + 3):
            parts = [(i, x.copy(), y.copy()) for p in range(n) for i, x, y in row_blocks(a, b, 700, (p, n))]
            assert [i for i, _, _ in parts] == [i for i, _, _ in whole]
            assert all(np.array_equal(x, wx) and np.array_equal(y, wy)
                       for (_, x, y), (_, wx, wy) in zip(parts, whole))


def test_diff_threads_default_to_one_on_small_hosts():
    from coordinator.layerrun import diff_threads
    assert [diff_threads(0, c) for c in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 8]
    assert diff_threads(3, 2) == 3                      # --param layers_diff_threads=3 wins


def test_unmapped_reasons_are_kept_per_side_for_the_same_name():
    """A torch module and a paddle layer of the same name, both unpaired, each keep their own
    reason (one shared dict gave the paddle layer torch's)."""
    torch = [m("", "M", children=["blk"]), m("blk", "Block", children=["fc", "extra"]),
             m("blk.fc", "Linear", ["weight"]), m("blk.extra", "Linear", ["weight"])]
    paddle = [m("", "M", children=["blk"]), m("blk", "Block", children=["fc"]), m("blk.fc", "Linear", ["weight"])]
    lm = build(torch, paddle, WeightMap.from_dict({}))
    un = {(u.side, u.name): u.reason for u in lm.unmapped}
    assert "no paddle layer holds exactly its parameters" in un[("torch", "blk")]
    assert "no torch module holds exactly its parameters" in un[("paddle", "blk")]


def test_long_type_names_keep_their_kind_in_the_live_lines():
    from coordinator.layerview import short_type
    assert short_type("NonDynamicallyQuantizableLinear", 16) == "…antizableLinear"   # not "NonDynamicallyQu"
    assert short_type("Linear", 16) == "Linear"
    r = Row("forward", "output", "a", "a", "a", "NonDynamicallyQuantizableLinear", "Linear")
    r.passed, r.max_abs, r.norm_err = True, 0.0, 0.0
    assert "…antizableLinear" in row_line(r)


def test_debugger_names_reach_the_output_row_and_name_input_the_input_row():
    """`goto NAME` / `--at NAME` land on the layer's output row, not the input row listed first;
    `NAME:input` reaches the input row (control)."""
    from coordinator.layerdebug import Debugger, _Stop
    dbg = Debugger(rc=None, stdout=io.StringIO())
    dbg.rows = [Row("forward", "input", "ln:input", "ln", "norm", "LayerNorm"),
                Row("forward", "output", "ln", "ln", "norm", "LayerNorm")]
    assert dbg.find("ln") == 1 and dbg.find("norm") == 1 and dbg.find("ln:input") == 0
    names = {"ln", "norm"}
    stop = _Stop("ln", names)
    assert not stop.hit(dbg.rows[0]) and stop.hit(dbg.rows[1])
    assert _Stop("ln:input", names).hit(dbg.rows[0])


def test_an_ambiguous_name_part_says_which_layers_it_matches():
    from coordinator.layerdebug import Debugger
    out = io.StringIO()
    dbg = Debugger(rc=None, stdout=out)
    dbg.rows = [Row("forward", "output", "enc.0.fc", "enc.0.fc", "enc.0.fc", "Linear"),
                Row("forward", "output", "enc.1.fc", "enc.1.fc", "enc.1.fc", "Linear")]
    assert dbg.find("fc") == 0 and "'fc' is part of 2 layers' names (enc.0.fc, enc.1.fc)" in out.getvalue()
    out.truncate(0)
    assert dbg.find("1.fc") == 1 and out.getvalue() == ""     # unique: no note


def test_continue_own_stops_at_a_failing_replay_and_ctrl_c_ends_the_session(monkeypatch):
    """A replay that raises (a layer that cannot run alone) stops the walk at that row, logged; the
    control: an inherited row before it is passed over. Ctrl-C (Interrupted) during a walk ends
    the session as interrupted instead of printing an error and going on."""
    from coordinator import layerdebug
    from coordinator.errors import Interrupted
    out = io.StringIO()
    dbg = layerdebug.Debugger(rc=None, stdout=out)
    dbg.rows = [Row("forward", "output", n, n, n, "Linear", seq=i, passed=(i == 0)) for i, n in enumerate("abcd")]
    dbg.caps, dbg.inputs, dbg.labels, dbg.lmap = [], {}, None, None
    dbg.fwd_tol = dbg.bwd_tol = LayerTolerance()
    dbg.log = [{"command": "continue own"}]

    def fake_replay(rc, lmap, row, *a, **k):
        if row.key == "b":
            return {"verdict": "inherited", "replay_norm_err": 1e-7}
        raise RuntimeError("replay of c: no input recorded")
    from coordinator import layerrun
    monkeypatch.setattr(layerrun, "replay", fake_replay)
    dbg._continue_own()
    text = out.getvalue()
    assert "row 2 b: inherited (run alone it agrees: 1.0e-07" in text
    assert "cannot isolate this row: its replay failed: RuntimeError: replay of c" in text and dbg.pos == 2
    assert [r["verdict"] for r in dbg.log[-1]["replays"]] == ["inherited", "error"]
    assert ("forward", "b") in dbg.cleared

    def interrupted(*a, **k):
        raise Interrupted("Ctrl-C: stopping after the op in flight")
    monkeypatch.setattr(layerrun, "replay", interrupted)
    dbg.stdin = io.StringIO("continue own\nwhere\n")
    dbg.pos = 0
    dbg.repl()
    assert dbg.interrupted and "where" not in out.getvalue().rsplit("interrupted", 1)[1]


def test_report_names_the_model_itself_and_drops_terminal_colour_codes(tmp_path):
    """The root module (name "") shows as <model> in report.html and layers.tsv, as on the
    terminal; a worker log's colour codes in the error do not reach the page as raw bytes."""
    root = dict(_row(0, False, 1e-3), torch="", paddle="", torch_type="Net", paddle_type="Net")
    first = dict(root, isolation={"verdict": "own", "why": "w", "advice": {"causes": []}}, top=[])
    data = {"status": "error", "exit_code": 4, "error": "paddle worker died; log tail: \x1b[1mFatal\x1b[0m \x07end",
            "steps": [{"name": "layers", "status": "failed", "passed": False, "worst": 1e-3, "tolerance": "t",
                       "message": "m", "seconds": 1.0, "diffs": [],
                       "details": {"forward": {"rows": [_row(1), root], "failed": 1, "first": first, "stats": {}}}}]}
    page = render(data)
    assert "<code>&lt;model&gt;</code>" in page and "first divergence: &lt;model&gt;" in page
    assert "<code></code>" not in page
    assert "\x1b" not in page and "\x07" not in page and "Fatal end" in page
    from types import SimpleNamespace
    from coordinator.steps.layers import _write_tsv
    _write_tsv(SimpleNamespace(out=tmp_path), [_row(1), root])
    lines = (tmp_path / "layers.tsv").read_text().splitlines()
    assert lines[2].split("\t")[4:6] == ["<model>", "<model>"] and lines[1].split("\t")[4] == "enc.l1"


def test_replaying_a_container_whose_sublayer_already_failed_is_inherited_not_own():
    """The debugger can replay any row: replaying a block (or the model) runs its sublayers
    again, so with one of them already failing earlier the verdict is inherited, naming it,
    and nothing is sent to the workers. The control: an earlier failure outside the block, or
    the block's own input row, does not count, and the replay goes on to the workers."""
    from types import SimpleNamespace
    from coordinator.layerrun import replay
    lm = build(TORCH, PADDLE, WMAP)
    tol = LayerTolerance(5e-6, 1e-4)

    class Sent(Exception):
        pass

    def request(*a, **k):
        raise Sent
    rc = SimpleNamespace(session=SimpleNamespace(request=request))
    block = Row("forward", "output", "enc.layer.0", "enc.layer.0", "enc.layers.0", "Block", "Block", seq=9,
                passed=False)
    ln = Row("forward", "output", "enc.layer.0.LayerNorm", "enc.layer.0.LayerNorm", "enc.layers.0.norm1",
             "LayerNorm", "LayerNorm", seq=5, passed=False)
    iso = replay(rc, lm, block, {}, tol, set(), earlier=[ln])
    assert iso["verdict"] == "inherited" and "enc.layer.0.LayerNorm" in iso["why"] and "goto it" in iso["why"]
    own_input = Row("forward", "input", "enc.layer.0:in", "enc.layer.0", "enc.layers.0", "Block", "Block", seq=1,
                    passed=False)
    with pytest.raises(Sent):
        replay(rc, lm, block, {}, tol, set(), earlier=[own_input])
    with pytest.raises(Sent):
        replay(rc, lm, ln, {}, tol, set(), earlier=[block])
    # backward: a block's gradient row comes before its sublayers' (they are in `earlier` as every other
    # row), and its replay runs their forward too, so a failing forward sublayer row counts as well
    bblock = Row("backward", "grad", "enc.layer.0", "enc.layer.0", "enc.layers.0", "Block", "Block", seq=20,
                 passed=False)
    bln = Row("backward", "grad", "enc.layer.0.LayerNorm", "enc.layer.0.LayerNorm", "enc.layers.0.norm1",
              "LayerNorm", "LayerNorm", seq=25, passed=False)
    for suspect in (bln, ln):
        iso = replay(rc, lm, bblock, {}, tol, set(), earlier=[suspect])
        assert iso["verdict"] == "inherited" and f"({suspect.phase})" in iso["why"], iso
    with pytest.raises(Sent):   # the control: the block's forward output row is not inside it
        replay(rc, lm, bblock, {}, tol, set(), earlier=[block])


def test_a_named_row_is_resolved_the_same_way_by_the_live_stop_and_by_goto():
    """--at / goto: an exact layer name wins over a layer whose name contains it (the live view
    used to stop at blocks.0.norm for 'norm' while the prompt opened at 'norm'); NAME:grad and
    'NAME <grad>' reach a gradient row, NAME:input the input row, <model> the model itself; a
    part of a paddle name works live too."""
    from coordinator.layerdebug import Target, _Stop
    rows = [Row("forward", "output", "blocks.0.norm", "blocks.0.norm", "layers.0.ln", "LayerNorm", "LayerNorm", seq=1),
            Row("forward", "input", "norm:input", "norm", "ln", "LayerNorm", "LayerNorm", seq=2),
            Row("forward", "output", "norm", "norm", "ln", "LayerNorm", "LayerNorm", seq=3),
            Row("forward", "output", "", "", "", "Net", "Net", seq=4),
            Row("backward", "grad", "norm", "norm", "ln", "LayerNorm", "LayerNorm", seq=5),
            Row("backward", "param_grad", "norm.weight", "norm.weight", "ln.weight", "LayerNorm", "LayerNorm", seq=6)]
    names = {n for r in rows for n in (r.torch, r.paddle)}

    def first(text):
        stop = _Stop(text, names)
        return next((i for i, r in enumerate(rows) if stop.hit(r)), None)
    assert first("norm") == 2 and first("ln") == 2                      # exact torch / paddle names
    assert first("norm:input") == 1 and first("norm <input>") == 1
    assert first("norm:grad") == 4 and first("ln <grad>") == 4
    assert first("<model>") == 3 and first("norm.weight") == 5
    assert first("blocks") == 0 and first("layers.0") == 0               # a part of a name: the first such row
    assert first("nosuch") is None and Target("nosuch", names).exact is False
    assert _Stop(None, names).hit(Row("forward", "output", "x", "x", "x", "T", "T", passed=False))
