"""Automatic weight mapping on synthetic parameter lists (framework-free)."""

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import numpy as np
import pytest

from coordinator.automap import Param, automap, type_class
from coordinator.mapping import MappingError, WeightMap


def P(name: str, shape, module_type: str, buffer: bool = False) -> Param:
    return Param(name, tuple(shape), "float32", name.rpartition(".")[0], module_type, buffer)


def torch_cnn(bn1_channels: int = 8) -> list[Param]:
    return [P("features.0.weight", (8, 3, 3, 3), "Conv2d"), P("features.0.bias", (8,), "Conv2d"),
            P("features.1.weight", (bn1_channels,), "BatchNorm2d"), P("features.1.bias", (bn1_channels,), "BatchNorm2d"),
            P("features.1.running_mean", (bn1_channels,), "BatchNorm2d", True),
            P("features.1.running_var", (bn1_channels,), "BatchNorm2d", True),
            P("features.1.num_batches_tracked", (), "BatchNorm2d", True),
            P("classifier.0.weight", (32, 1024), "Linear"), P("classifier.0.bias", (32,), "Linear"),
            P("classifier.2.weight", (10, 32), "Linear"), P("classifier.2.bias", (10,), "Linear")]


def paddle_cnn() -> list[Param]:
    return [P("conv1.weight", (8, 3, 3, 3), "Conv2D"), P("conv1.bias", (8,), "Conv2D"),
            P("bn1.weight", (8,), "BatchNorm2D"), P("bn1.bias", (8,), "BatchNorm2D"),
            P("bn1._mean", (8,), "BatchNorm2D", True), P("bn1._variance", (8,), "BatchNorm2D", True),
            P("fc1.weight", (1024, 32), "Linear"), P("fc1.bias", (32,), "Linear"),
            P("fc2.weight", (32, 10), "Linear"), P("fc2.bias", (10,), "Linear")]


def arrays(params):
    rng = np.random.RandomState(0)
    return {p.name: np.asarray(rng.standard_normal(p.shape), dtype=np.float32) for p in params}


def specs(params):
    return {p.name: (list(p.shape), "float32") for p in params}


def test_type_classes_are_framework_neutral():
    assert type_class("Conv2d") == type_class("Conv2D") == "conv2d"
    assert type_class("ConvTranspose2d") == type_class("Conv2DTranspose") == "convtranspose2d"
    assert type_class("BatchNorm2d") == type_class("BatchNorm2D") == type_class("BatchNorm") == "batchnorm"
    assert type_class("NonDynamicallyQuantizableLinear") == "linear"
    assert type_class("MyBlock").startswith("other:")


def test_cnn_maps_batchnorm_buffers_and_transposes_linears():
    result = automap(torch_cnn(), paddle_cnn())
    assert result.complete, result.problems()
    pairs = {p.torch.name: (p.paddle.name, p.ops) for p in result.pairs}
    assert pairs["features.1.running_mean"] == ("bn1._mean", [])
    assert pairs["features.1.running_var"] == ("bn1._variance", [])
    assert pairs["classifier.0.weight"] == ("fc1.weight", ["transpose"])
    assert pairs["features.0.weight"] == ("conv1.weight", [])
    assert [p.name for p in result.ignored_torch] == ["features.1.num_batches_tracked"]
    # the suggested TOML is a working mapping file
    wm = WeightMap.from_dict(tomllib.loads(result.to_toml("test")), "suggested.toml")
    sd = arrays(torch_cnn())
    out, records = wm.convert(sd, specs(paddle_cnn()))
    assert np.array_equal(out["fc1.weight"], sd["classifier.0.weight"].T)
    assert np.array_equal(out["bn1._variance"], sd["features.1.running_var"])
    assert len(records) == 10


def test_square_linear_is_transposed_by_type_not_by_shape():
    t = [P("proj.weight", (4, 4), "Linear"), P("proj.bias", (4,), "Linear")]
    p = [P("dense.weight", (4, 4), "Linear"), P("dense.bias", (4,), "Linear")]
    result = automap(t, p)
    assert {x.torch.name: x.ops for x in result.pairs} == {"proj.weight": ["transpose"], "proj.bias": []}
    # negative control: a square embedding table is not a Linear and stays as it is
    t = [P("emb.weight", (4, 4), "Embedding")]
    p = [P("table.weight", (4, 4), "Embedding")]
    assert automap(t, p).pairs[0].ops == []


def test_unmatched_modules_are_named_on_both_sides():
    t = torch_cnn(bn1_channels=6)      # a port mistake: bn1 has 6 channels on one side only
    result = automap(t, paddle_cnn())
    assert not result.complete
    text = "\n".join(result.problems())
    assert "torch module features.1 (BatchNorm2d: weight[6]" in text
    assert "paddle module bn1 (BatchNorm2D: weight[8]" in text
    # the rest still pairs
    assert {p.torch.name for p in result.pairs} >= {"features.0.weight", "classifier.2.bias"}
    # the suggested file lists them as comments, and its mapping refuses to convert without them
    assert "# NOT MAPPED" in result.to_toml() and "#   torch module features.1" in result.to_toml()
    with pytest.raises(MappingError, match="paddle key 'bn1.weight' \\(8,\\) receives no torch tensor"):
        result.to_weight_map().convert(arrays(t), specs(paddle_cnn()))


def bert_like(layers: int, torch_side: bool) -> list[Param]:
    out = []
    for k in range(layers):
        if torch_side:
            spec = [("attn.q", "Linear", (4, 4)), ("attn.o", "Linear", (4, 4)), ("ln1", "LayerNorm", (4,)),
                    ("inter", "Linear", (8, 4)), ("out", "Linear", (4, 8)), ("ln2", "LayerNorm", (4,))]
        else:  # paddle registers both norms after the feed-forward
            spec = [("self_attn.q_proj", "Linear", (4, 4)), ("self_attn.out_proj", "Linear", (4, 4)),
                    ("linear1", "Linear", (4, 8)), ("linear2", "Linear", (8, 4)),
                    ("norm1", "LayerNorm", (4,)), ("norm2", "LayerNorm", (4,))]
        prefix = f"encoder.layer.{k}" if torch_side else f"encoder.layers.{k}"
        for name, kind, shape in spec:
            out.append(P(f"{prefix}.{name}.weight", shape, kind))
            bias = shape[0] if (torch_side or kind != "Linear") else shape[1]
            out.append(P(f"{prefix}.{name}.bias", (bias,), kind))
    return out


def test_registration_order_ambiguity_is_reported_not_guessed():
    result = automap(bert_like(2, True), bert_like(2, False))
    assert not result.complete
    text = "\n".join(result.problems())
    assert "encoder.layer.0.ln1" in text and "encoder.layer.0.ln2" in text
    assert "encoder.layers.0.norm1" in text and "encoder.layers.0.norm2" in text
    assert not any("ln" in p.torch.name for p in result.pairs)   # no guessed LayerNorm pair
    assert len(result.pairs) == 16                                # every Linear paired


def test_call_order_resolves_what_registration_order_cannot():
    tcalls = [f"encoder.layer.{k}.{n}" for k in range(2) for n in ("attn.q", "attn.o", "ln1", "inter", "out", "ln2")]
    pcalls = [f"encoder.layers.{k}.{n}" for k in range(2)
              for n in ("self_attn.q_proj", "self_attn.out_proj", "norm1", "linear1", "linear2", "norm2")]
    result = automap(bert_like(2, True), bert_like(2, False), tcalls, pcalls)
    assert result.complete and result.order == "call"
    pairs = {p.torch.name: p.paddle.name for p in result.pairs}
    assert pairs["encoder.layer.1.ln1.weight"] == "encoder.layers.1.norm1.weight"
    assert pairs["encoder.layer.1.ln2.bias"] == "encoder.layers.1.norm2.bias"
    assert pairs["encoder.layer.0.inter.weight"] == "encoder.layers.0.linear1.weight"


def test_out_of_order_module_with_a_unique_counterpart_is_paired_and_noted():
    t = [P("head.weight", (3, 5), "Linear"), P("head.bias", (3,), "Linear"),
         P("emb.weight", (7, 5), "Embedding")]
    p = [P("embed.weight", (7, 5), "Embedding"), P("cls.weight", (5, 3), "Linear"), P("cls.bias", (3,), "Linear")]
    result = automap(t, p)
    assert result.complete
    assert {x.torch.name: x.paddle.name for x in result.pairs} == \
        {"head.weight": "cls.weight", "head.bias": "cls.bias", "emb.weight": "embed.weight"}


def test_interchangeable_modules_paired_by_order_alone_are_noted():
    """Two 16x16 Linears (value, gate) can only be told apart by order: the pairing stands, a note
    says which were paired that way (in the TOML and for the console); a model without such twins
    gets none (the control)."""
    t = [P("proj_a.weight", (16, 16), "Linear"), P("proj_a.bias", (16,), "Linear"),
         P("proj_b.weight", (16, 16), "Linear"), P("proj_b.bias", (16,), "Linear"),
         P("head.weight", (3, 16), "Linear"), P("head.bias", (3,), "Linear")]
    p = [P("gate.weight", (16, 16), "Linear"), P("gate.bias", (16,), "Linear"),
         P("value.weight", (16, 16), "Linear"), P("value.bias", (16,), "Linear"),
         P("cls.weight", (16, 3), "Linear"), P("cls.bias", (3,), "Linear")]
    found = automap(t, p, ["proj_a", "proj_b", "head"], ["gate", "value", "cls"])
    assert found.complete and found.order_notes == [
        "2 x Linear of the same shapes paired by call order only: proj_a -> gate, proj_b -> value"]
    assert "#   2 x Linear of the same shapes paired by call order only" in found.to_toml("test")
    assert automap(torch_cnn(), paddle_cnn()).order_notes == []
