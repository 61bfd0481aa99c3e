"""A tiny transformer encoder (torch.nn.TransformerEncoderLayer: packed q/k/v, out_proj applied
functionally) for tests/test_models.py; its paddle port is attn_paddle.py, mapped by attn_map.toml."""
import torch
import torch.nn.functional as F
from torch import nn

B, T, E, H, V, C = 2, 6, 16, 2, 50, 3


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, E)
        self.layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, C)

    def forward(self, x, labels=None):
        h = self.layer(self.proj(x))
        return self.head(h.mean(dim=1))


def build(seed: int = 0):
    torch.manual_seed(seed)
    return {"model": TinyEncoder(),
            "inputs": [{"name": "x", "shape": [B, T, 8], "dtype": "float32"},
                       {"name": "labels", "shape": [B], "dtype": "int64", "low": 0, "high": C}],
            "loss": lambda o, b: F.cross_entropy(o["output"], b["labels"]),
            "optimizer": {"type": "sgd", "lr": 0.01, "weight_decay": 0.01}}
