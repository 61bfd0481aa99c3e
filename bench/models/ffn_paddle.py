"""The paddle port of ``ffn_torch`` (same names, Linear weights stored [in, out])."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn

from ffn_shape import HIDDEN, INTER, shape


class Block(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, INTER)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(INTER, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, epsilon=1e-12)

    def forward(self, x):
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class FFNStack(nn.Layer):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.LayerList([Block() for _ in range(blocks)])
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x, labels=None):
        for b in self.blocks:
            x = b(x)
        return self.head(x[:, 0])


def build(seed: int = 0) -> dict:
    blocks, _, _ = shape()
    paddle.seed(seed)
    model = FFNStack(blocks)
    model.eval()
    return {"model": model, "loss": lambda outputs, b: F.cross_entropy(outputs["output"], b["labels"])}
