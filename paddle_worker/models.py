"""Model presets for the paddle side: the PaddleNLP twin of a HF BERT, built from its config.

``inject`` applies deliberate porting bugs (negative controls for tests and demos):
``ln_eps:<layer>:<eps>`` sets one encoder LayerNorm's epsilon, ``gelu_tanh:<layer>``
switches one layer's GELU to the tanh approximation. (PaddleNLP itself copies
``layer_norm_eps`` from the config into every encoder LayerNorm, verified on 2.8.1.)
"""

from __future__ import annotations

from typing import Any

import paddle
import paddle.nn.functional as F

HF_TO_PADDLE_CONFIG = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                       "max_position_embeddings", "type_vocab_size", "initializer_range", "pad_token_id",
                       "layer_norm_eps")


def build_bert(config: dict[str, Any], num_labels: int, inject: list[str]) -> paddle.nn.Layer:
    from paddlenlp.transformers import BertConfig, BertForSequenceClassification
    kwargs = {k: config[k] for k in HF_TO_PADDLE_CONFIG if k in config}
    cfg = BertConfig(num_labels=num_labels, **kwargs)
    model = BertForSequenceClassification(cfg)
    layers = model.bert.encoder.layers
    for item in inject:
        parts = item.split(":")
        if parts[0] == "ln_eps":
            layers[int(parts[1])].norm1._epsilon = float(parts[2])
        elif parts[0] == "gelu_tanh":
            layers[int(parts[1])].activation = lambda x: F.gelu(x, approximate=True)
        else:
            raise ValueError(f"unknown inject {item!r} (known: ln_eps:L:EPS, gelu_tanh:L)")
    return model


def load(body: dict[str, Any]) -> tuple[paddle.nn.Layer, dict]:
    preset = body.get("preset", "minilm")
    inject = list(body.get("inject") or [])
    if preset in ("minilm", "bert"):
        config = body.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"paddle preset {preset!r} is built from the torch side's config; none was sent")
        num_labels = int(body.get("num_labels", config.get("num_labels", 2)))
        paddle.seed(int(body.get("seed", 0)))
        model = build_bert(config, num_labels, inject)
        return model, {"kind": "bert", "config": config, "inject": inject,
                       "n_params": int(sum(int(p.numel()) for p in model.parameters()))}
    raise ValueError(f"unknown paddle model preset {preset!r} (known: minilm, bert)")


def forward(model: paddle.nn.Layer, info: dict, inputs: dict[str, Any]) -> dict[str, Any]:
    ids = inputs["input_ids"]
    seq, pooled = model.bert(ids, token_type_ids=inputs.get("token_type_ids"),
                             attention_mask=inputs.get("attention_mask"))
    logits = model.classifier(model.dropout(pooled))
    return {"logits": logits, "pooled": pooled, "last_hidden": seq}
