"""Mapping files as data: [keys], [[merge]] (fused qkv), split back, and errors that name key and shapes."""

from pathlib import Path

import numpy as np
import pytest

from coordinator.mapping import MappingError, WeightMap
from coordinator.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent

MERGE = {
    "name": "fuse",
    "merge": [{"pattern": r"attn\.(q|k|v)\.", "parts": ["q", "k", "v"], "into": "qkv", "axis": 0}],
    "rename": [{"pattern": r"attn\.qkv\.", "replace": "attn.qkv_proj."}],
    "transform": [{"pattern": r"\.weight$", "ndim": 2, "op": "transpose"}],
}


def torch_attn():
    rng = np.random.RandomState(1)
    sd = {f"attn.{p}.{w}": rng.standard_normal(s).astype(np.float32)
          for p in "qkv" for w, s in (("weight", (4, 6)), ("bias", (4,)))}
    sd["out.weight"] = rng.standard_normal((6, 4)).astype(np.float32)
    return sd


PADDLE_SPECS = {"attn.qkv_proj.weight": ([6, 12], "float32"), "attn.qkv_proj.bias": ([12], "float32"),
                "out.weight": ([4, 6], "float32")}


def test_merge_concatenates_parts_in_order_then_renames_and_transposes():
    wm = WeightMap.from_dict(MERGE)
    sd = torch_attn()
    out, records = wm.convert(sd, PADDLE_SPECS)
    fused = np.concatenate([sd["attn.q.weight"], sd["attn.k.weight"], sd["attn.v.weight"]], axis=0).T
    assert np.array_equal(out["attn.qkv_proj.weight"], fused)
    assert np.array_equal(out["attn.qkv_proj.bias"][4:8], sd["attn.k.bias"])
    rec = {r.target: r for r in records}
    assert rec["attn.qkv_proj.weight"].source == "attn.q.weight + attn.k.weight + attn.v.weight"
    # gradients (or any torch-layout dict) convert the same way
    assert np.array_equal(wm.convert_tensors(sd)["attn.qkv_proj.weight"], fused)


def test_split_is_the_inverse_of_merge():
    """paddle's fused qkv -> torch's three tensors, with split; merge then split gives the parts back."""
    sd = torch_attn()
    fused = WeightMap.from_dict(MERGE).convert_tensors(sd)
    back = WeightMap.from_dict({"transform": [
        {"pattern": r"qkv_proj\.weight$", "op": "transpose"},
        {"pattern": r"qkv_proj\.", "op": "split", "axis": 0, "target_pattern": r"qkv_proj", "targets": ["q", "k", "v"]}]})
    parts = back.convert_tensors({k: v for k, v in fused.items() if "qkv" in k})
    for p in "qkv":
        assert np.array_equal(parts[f"attn.{p}.weight"], sd[f"attn.{p}.weight"])
        assert np.array_equal(parts[f"attn.{p}.bias"], sd[f"attn.{p}.bias"])


def test_merge_with_a_missing_part_names_the_merge_and_what_exists():
    sd = torch_attn()
    del sd["attn.v.weight"]
    with pytest.raises(MappingError) as e:
        WeightMap.from_dict(MERGE).convert(sd, PADDLE_SPECS)
    msg = str(e.value)
    assert "merge #1 into torch 'attn.qkv.weight': part(s) ['v'] missing" in msg
    assert "'attn.q.weight' (4, 6)" in msg
    assert "paddle key 'attn.qkv_proj.weight' (6, 12) receives no torch tensor" in msg


def test_merge_parts_that_do_not_concatenate_are_named_with_shapes():
    sd = torch_attn()
    sd["attn.k.weight"] = np.zeros((4, 5), np.float32)
    with pytest.raises(MappingError) as e:
        WeightMap.from_dict(MERGE).convert(sd, PADDLE_SPECS)
    assert "cannot concatenate on axis 0: 'attn.q.weight' (4, 6), 'attn.k.weight' (4, 5)" in str(e.value)


def test_convert_one_refuses_a_lone_merge_part():
    with pytest.raises(MappingError, match="part 'k' of merge #1"):
        WeightMap.from_dict(MERGE).convert_one("attn.k.weight", np.zeros((4, 6), np.float32))


def test_exact_keys_and_per_key_transforms():
    wm = WeightMap.from_dict({"keys": {"classifier.weight": "fc.weight", "classifier.bias": "fc.bias"},
                              "transform": [{"keys": ["classifier.weight"], "op": "transpose"}]})
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    out, _ = wm.convert({"classifier.weight": w, "classifier.bias": np.zeros(2, np.float32)},
                        {"fc.weight": ([3, 2], "float32"), "fc.bias": ([2], "float32")})
    assert np.array_equal(out["fc.weight"], w.T)


def test_wrong_transforms_name_key_and_both_shapes_all_at_once():
    """A reshape to the wrong shape and a transpose of a 1-D tensor: both reported in one error."""
    wm = WeightMap.from_dict({"keys": {"a.weight": "b.weight", "a.bias": "b.bias"},
                              "transform": [{"keys": ["a.weight"], "op": "reshape", "shape": [3, 2]},
                                            {"keys": ["a.bias"], "op": "transpose"}]})
    with pytest.raises(MappingError) as e:
        wm.convert({"a.weight": np.zeros((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)},
                   {"b.weight": ([2, 3], "float32"), "b.bias": ([2], "float32")})
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "shape mismatch for torch 'a.weight' (2, 3) -> paddle 'b.weight': converted (3, 2) after " \
           "reshape(3, 2), paddle expects (2, 3)" in msg
    assert "transform #2 (transpose) on torch 'a.bias' (2,) -> paddle 'b.bias': a 1-D tensor has nothing to " \
           "transpose" in msg and "(paddle 'b.bias' expects (2,))" in msg


def test_impossible_reshape_and_split_are_named():
    wm = WeightMap.from_dict({"transform": [{"pattern": "^w$", "op": "reshape", "shape": [5]},
                                            {"pattern": "^v$", "op": "split", "axis": 0, "target_pattern": "v",
                                             "targets": ["v1", "v2"]}]})
    with pytest.raises(MappingError) as e:
        wm.convert({"w": np.zeros((2, 3), np.float32), "v": np.zeros(3, np.float32)},
                   {"w": ([6], "float32"), "v1": ([1], "float32"), "v2": ([2], "float32")})
    msg = str(e.value)
    assert "cannot reshape (2, 3) (6 values) to (5,) (paddle 'w' expects (6,))" in msg
    assert "cannot split axis 0 into 2 equal parts" in msg


def test_missing_keys_name_both_shapes():
    wm = WeightMap.from_dict({"keys": {"fc.weight": "fc.weight_typo"}})
    with pytest.raises(MappingError) as e:
        wm.convert({"fc.weight": np.zeros((2, 3), np.float32)}, {"fc.weight": ([2, 3], "float32")})
    msg = str(e.value)
    assert "torch key 'fc.weight' (2, 3) maps to 'fc.weight_typo', which the paddle model does not have " \
           "(closest: 'fc.weight' (2, 3))" in msg
    assert "paddle key 'fc.weight' (2, 3) receives no torch tensor" in msg


@pytest.mark.parametrize("bad,needle", [
    ({"merge": [{"pattern": "x", "parts": ["a"], "into": "b"}]}, "needs a group"),
    ({"merge": [{"pattern": "(x)"}]}, "merge #1 needs"),
    ({"keys": {"a": 1}}, "[keys] must map"),
    ({"transform": [{"keys": "a", "op": "transpose"}]}, "'keys' must be a list"),
])
def test_malformed_mapping_tables_are_usage_errors(bad, needle):
    with pytest.raises(UsageError) as e:
        WeightMap.from_dict(bad, "bad.toml")
    assert needle in str(e.value) and "bad.toml" in str(e.value)


@pytest.mark.parametrize("data, message", [
    ({"renames": [{"pattern": "a", "replace": "b"}]}, "unknown table or key 'renames'; did you mean 'rename'?"),
    ({"ignore": {"torh": ["x$"]}}, "unknown key in [ignore] 'torh'; did you mean 'torch'?"),
    ({"transform": [{"op": "transpose", "axs": [1, 0]}]}, "unknown key in transform #1 'axs'"),
    ({"ignore": {"torch": "position_ids$"}}, "[ignore]: 'torch' must be a list, e.g. torch = ['position_ids$']"),
    ({"rename": {"pattern": "a", "replace": "b"}}, "'rename' must be a list of tables: write [[rename]]"),
    ({"merge": [{"pattern": "(q|k)", "parts": "q,k", "into": "qk"}]}, "merge #1: 'parts' must be a list"),
])
def test_mapping_typos_are_named_not_ignored(data, message):
    with pytest.raises(UsageError) as exc:
        WeightMap.from_dict(data, "m.toml")
    assert message in str(exc.value)


def test_every_shipped_mapping_passes_the_schema():
    """The control for the typo checks: the built-in and test mappings load as they are."""
    for path in [*(ROOT / "coordinator/mappings").glob("*.toml"), *(ROOT / "tests/data").glob("*.toml")]:
        WeightMap.load(path)


def test_target_names_follow_renames_splits_and_merges_without_tensors():
    """Layer pairing and the decay groups name paddle's tensors without holding torch's: every
    part of a split, a merge part's merged key; the same names convert_one produces (control)."""
    wm = WeightMap.from_dict({
        "keys": {"attn.in_proj_weight": "attn.QKV_proj.weight"},
        "rename": [{"pattern": r"^enc\.", "replace": "encoder."}],
        "transform": [{"pattern": r"in_proj_weight$", "op": "split", "axis": 0, "target_pattern": "QKV",
                       "targets": ["q", "k", "v"]},
                      {"pattern": r"weight$", "op": "transpose", "ndim": 2}]})
    w = np.zeros((6, 2), np.float32)
    assert wm.target_names("attn.in_proj_weight", 2) == ["attn.q_proj.weight", "attn.k_proj.weight",
                                                         "attn.v_proj.weight"]
    assert wm.target_names("attn.in_proj_weight") == [k for k, _a, _o in wm.convert_one("attn.in_proj_weight", w)]
    assert wm.target_names("enc.fc.weight") == ["encoder.fc.weight"]
    merged = WeightMap.from_dict(MERGE)
    assert merged.target_names("attn.k.weight") == merged.target_names("attn.q.weight") == \
        [merged.target_name(merged.merge_part("attn.q.weight")[1])]


def test_exact_names_that_match_no_torch_key_are_named_with_the_closest(tmp_path):
    """A misspelled [keys] entry or transform `keys` name is a problem of its own, with the closest
    torch key (it used to show only as its consequences); control: the corrected file converts."""
    sd = {"features.1.running_mean": np.zeros(3, np.float32), "classifier.0.weight": np.zeros((2, 3), np.float32)}
    specs = {"bn1._mean": ([3], "float32"), "classifier.0.weight": ([3, 2], "float32")}
    bad = WeightMap.from_dict({"keys": {"features.1.running_mea": "bn1._mean"},
                               "transform": [{"keys": ["classifier.9.weight"], "op": "transpose"}]})
    with pytest.raises(MappingError) as exc:
        bad.convert(sd, specs)
    text = str(exc.value)
    assert "[keys] entry 'features.1.running_mea' matches no torch key (closest: 'features.1.running_mean')" in text
    assert "transform #1 (transpose) lists 'classifier.9.weight', which matches no torch key" in text
    good = WeightMap.from_dict({"keys": {"features.1.running_mean": "bn1._mean"},
                                "transform": [{"keys": ["classifier.0.weight"], "op": "transpose"}]})
    out, _ = good.convert(sd, specs)
    assert set(out) == set(specs)
