"""A small LSTM classifier (torch.nn.LSTM, batch_first) for tests/test_models.py; its port is lstm_paddle.py."""
import torch
import torch.nn.functional as F
from torch import nn

B, T, V, D, HID, C = 4, 7, 30, 12, 16, 5


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.lstm = nn.LSTM(D, HID, batch_first=True)
        self.fc = nn.Linear(HID, C)

    def forward(self, tokens, labels=None):
        out, (h, c) = self.lstm(self.emb(tokens))
        return self.fc(out[:, -1])


def build(seed: int = 0):
    torch.manual_seed(seed)
    return {"model": LSTMClassifier(),
            "inputs": [{"name": "tokens", "shape": [B, T], "dtype": "int64", "low": 0, "high": V},
                       {"name": "labels", "shape": [B], "dtype": "int64", "low": 0, "high": C}],
            "loss": lambda o, b: F.cross_entropy(o["output"], b["labels"]),
            "optimizer": {"type": "adam", "lr": 0.001}}
