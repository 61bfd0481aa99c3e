"""A BERT-base-shaped stack for benchmarks of own-model (factory) pairs, torch side.

No tokenizer, no attention: ``blocks`` x (Linear 768->3072, GELU, Linear 3072->768, residual,
LayerNorm) over float inputs [batch, seq, 768], then a 2-way classifier on token 0. Each block's
parameters and its per-layer outputs are BERT-base's feed-forward half, so a capture of every
layer streams about as many bytes per forward as BERT-base does (~110 MiB per side at 4 x 128)
on ~2/3 of its FLOPs: a harsher test of per-layer overhead than BERT itself. It needs only
torch and paddle, so it also runs where paddlenlp is not installed (bench/layers_overhead.py
--factory; scripts/device_bench.sh).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ffn_shape import HIDDEN, INTER, shape


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, INTER)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(INTER, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class FFNStack(nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x[:, 0])


def build(seed: int = 0) -> dict:
    blocks, batch, seq = shape()
    torch.manual_seed(seed)
    model = FFNStack(blocks)
    for m in model.modules():   # BERT's initializer range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    model.eval()
    return {"model": model,
            "inputs": [{"name": "x", "shape": [batch, seq, HIDDEN], "dtype": "float32"},
                       {"name": "labels", "shape": [batch], "dtype": "int64", "low": 0, "high": 2}],
            "loss": lambda outputs, b: F.cross_entropy(outputs["output"], b["labels"])}
