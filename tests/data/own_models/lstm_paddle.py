"""The paddle port of lstm_torch.py: nn.LSTM (fused; its cell repeats the weights under a second name).

LSTM_ARGS lets tests/test_models.py build a buggy port (time_major=True) from the same file."""
import paddle.nn.functional as F
from paddle import nn

V, D, HID, C = 30, 12, 16, 5
LSTM_ARGS: dict = {}


class LSTMClassifier(nn.Layer):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.rnn = nn.LSTM(D, HID, **LSTM_ARGS)   # paddle default time_major=False, as torch batch_first
        self.out = nn.Linear(HID, C)

    def forward(self, tokens, labels=None):
        out, (h, c) = self.rnn(self.embed(tokens))
        return self.out(out[:, -1])


def build():
    return {"model": LSTMClassifier(),
            "loss": lambda o, b: F.cross_entropy(o["output"], b["labels"])}
