"""Tied weights the HF way (head.weight is emb.weight: the state dict lists both names), for
tests/test_models.py; its port, tied_paddle.py, multiplies by the embedding matrix directly."""
import torch
import torch.nn.functional as F
from torch import nn
B, T, V, D = 2, 5, 20, 16


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens, labels=None):
        return self.head(self.norm(torch.tanh(self.proj(self.emb(tokens)))))


def build(seed: int = 0):
    torch.manual_seed(seed)
    return {"model": TiedLM(),
            "inputs": [{"name": "tokens", "shape": [B, T], "dtype": "int64", "low": 0, "high": V},
                       {"name": "labels", "shape": [B, T], "dtype": "int64", "low": 0, "high": V}],
            "loss": lambda o, b: F.cross_entropy(o["output"].reshape(-1, V), b["labels"].reshape(-1)),
            "optimizer": {"type": "adam", "lr": 0.01}}
