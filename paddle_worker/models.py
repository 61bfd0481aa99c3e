"""Models for the paddle side: the PaddleNLP twin of a HF BERT (built from torch's config),
or a user factory ``module.path:function`` (contract: ``protocol/factory.py``).

``inject`` applies deliberate porting bugs (negative controls for tests and demos):
``ln_eps:<layer>:<eps>`` sets one encoder LayerNorm's epsilon, ``gelu_tanh:<layer>``
switches one layer's GELU to the tanh approximation. (PaddleNLP itself copies
``layer_norm_eps`` from the config into every encoder LayerNorm, verified on 2.8.1.)
"""

from __future__ import annotations

from typing import Any

import paddle
import paddle.nn.functional as F

from protocol import factory as FF
from protocol.shared import InjectError

HF_TO_PADDLE_CONFIG = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                       "max_position_embeddings", "type_vocab_size", "initializer_range", "pad_token_id",
                       "layer_norm_eps")


# Injects that ops (not the model builder) apply, e.g. ``adamw_eps`` in ops_train.py; each
# ops_*.py module adds its own names here at import.
OP_INJECTS: set[str] = set()
BUILDER_INJECTS = ("ln_eps", "gelu_tanh")   # applied by build_bert itself


def build_bert(config: dict[str, Any], num_labels: int, inject: list[str]) -> paddle.nn.Layer:
    from paddlenlp.transformers import BertConfig, BertForSequenceClassification
    kwargs = {k: config[k] for k in HF_TO_PADDLE_CONFIG if k in config}
    cfg = BertConfig(num_labels=num_labels, **kwargs)
    model = BertForSequenceClassification(cfg)
    layers = model.bert.encoder.layers
    for item in inject:
        parts = item.split(":")
        if parts[0] in BUILDER_INJECTS:
            layer, eps = _builder_inject(item, parts, len(layers))
            if parts[0] == "ln_eps":
                layers[layer].norm1._epsilon = eps
            else:
                layers[layer].activation = lambda x: F.gelu(x, approximate=True)
        elif parts[0] in OP_INJECTS:
            continue  # applied by the op that owns it (ops_*.py modules register their names)
        else:
            raise InjectError(f"unknown inject {item!r} (known: ln_eps:L:EPS, gelu_tanh:L, "
                             f"{', '.join(sorted(OP_INJECTS))})")
    return model


def _builder_inject(item: str, parts: list[str], n_layers: int) -> tuple[int, float]:
    """(encoder layer, epsilon) of ``ln_eps:L:EPS`` / ``gelu_tanh:L``; a malformed one or a layer the
    model does not have is the command line's fault (InjectError: exit 2), not the op's."""
    form = "ln_eps:L:EPS" if parts[0] == "ln_eps" else "gelu_tanh:L"
    want = 3 if parts[0] == "ln_eps" else 2
    try:
        if len(parts) != want:
            raise ValueError
        layer = int(parts[1])
        eps = float(parts[2]) if want == 3 else 0.0
    except ValueError:
        raise InjectError(f"inject {item!r} is malformed (form: {form}, e.g. "
                          f"{'ln_eps:3:1e-5' if want == 3 else 'gelu_tanh:2'})") from None
    if not 0 <= layer < n_layers:
        raise InjectError(f"inject {item!r}: the model has encoder layers 0..{n_layers - 1}")
    if want == 3 and not 0 < eps <= 1e-3:   # paddle's LayerNorm refuses more than 1e-3 when it runs
        raise InjectError(f"inject {item!r}: the epsilon must be in (0, 1e-3] (paddle's LayerNorm limit)")
    return layer, eps


# The factory result of the model loaded last (one model per worker): see factory_extras.
_FACTORY: FF.Loaded | None = None


def load_factory(body: dict[str, Any]) -> tuple[paddle.nn.Layer, dict]:
    """Import and call a user factory inside this (the paddle) environment."""
    global _FACTORY
    import numpy as np
    spec, seed = str(body["preset"]), int(body.get("seed", 0))
    bad = [i for i in body.get("inject") or [] if i.split(":")[0] not in OP_INJECTS]
    if bad:
        raise InjectError(f"inject {bad} applies to the BERT presets only, not to factory model {spec!r}")
    fn = FF.import_factory(spec, list(body.get("sys_path") or []))
    paddle.seed(seed)
    loaded = FF.normalize(spec, FF.call_factory(fn, seed), lambda m: isinstance(m, paddle.nn.Layer),
                          "paddle.nn.Layer", lambda x: x.numpy() if isinstance(x, paddle.Tensor) else np.asarray(x))
    _FACTORY = loaded
    return loaded.model, FF.model_info(spec, loaded, sum(int(p.numel()) for p in loaded.model.parameters()))


def factory_extras(model: Any) -> FF.Loaded | None:
    """The loss / optimizer a factory returned with ``model`` (None for presets)."""
    return _FACTORY if _FACTORY is not None and _FACTORY.model is model else None


def factory_loss(model: Any, info: dict, batch: dict[str, Any]) -> Any:
    """The factory's ``loss(outputs, batch)`` on this batch (outputs named as the forward op names them).

    For training ops on factory models (``info['supports']['loss']``); raises if the factory gave no loss.
    """
    extras = factory_extras(model)
    if extras is None or extras.loss is None:
        raise ValueError(f"model {info.get('factory', info.get('kind'))!r} has no loss: return "
                         f"{{'model': m, 'loss': fn(outputs, batch)}} from the factory")
    return extras.loss(forward(model, info, batch), batch)


def load(body: dict[str, Any]) -> tuple[paddle.nn.Layer, dict]:
    preset = body.get("preset", "minilm")
    inject = list(body.get("inject") or [])
    if FF.is_factory_spec(preset):
        return load_factory(body)
    if preset in ("minilm", "bert"):
        config = body.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"paddle preset {preset!r} is built from the torch side's config; none was sent")
        num_labels = int(body.get("num_labels", config.get("num_labels", 2)))
        paddle.seed(int(body.get("seed", 0)))
        model = build_bert(config, num_labels, inject)
        return model, {"kind": "bert", "config": config, "inject": inject,
                       "n_params": int(sum(int(p.numel()) for p in model.parameters()))}
    raise ValueError(f"unknown paddle model preset {preset!r} (known: minilm, bert, or module.path:function)")


def forward(model: paddle.nn.Layer, info: dict, inputs: dict[str, Any]) -> dict[str, Any]:
    if info.get("kind") == "factory":
        return FF.name_outputs(model(**inputs), lambda x: isinstance(x, paddle.Tensor))
    ids = inputs["input_ids"]
    seq, pooled = model.bert(ids, token_type_ids=inputs.get("token_type_ids"),
                             attention_mask=inputs.get("attention_mask"))
    logits = model.classifier(model.dropout(pooled))
    return {"logits": logits, "pooled": pooled, "last_hidden": seq}
