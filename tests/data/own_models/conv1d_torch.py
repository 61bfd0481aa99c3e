"""Conv1d + BatchNorm1d + GELU on [B, C, L] (tests/test_models.py); its port is conv1d_paddle.py."""
import torch
import torch.nn.functional as F
from torch import nn

B, C, L, K = 4, 6, 20, 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(C, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.act = nn.GELU()
        self.conv2 = nn.Conv1d(16, 8, 3, padding=1)
        self.act2 = nn.GELU()
        self.head = nn.Linear(8, K)

    def forward(self, x, labels=None):
        h = self.act(self.bn(self.conv(x)))
        h = self.act2(self.conv2(h))
        return self.head(h.mean(-1))


def build(seed: int = 0):
    torch.manual_seed(seed)
    m = Net()
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, C, L) * 2 + 0.5)
    m.eval()
    return {"model": m,
            "inputs": [{"name": "x", "shape": [B, C, L], "dtype": "float32"},
                       {"name": "labels", "shape": [B], "dtype": "int64", "low": 0, "high": K}],
            "loss": lambda o, b: F.cross_entropy(o["output"], b["labels"]),
            "optimizer": {"type": "sgd", "lr": 0.01}}
