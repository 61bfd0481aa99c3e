"""The paddle port of conv1d_torch.py with its own layer names. GELU_ARGS lets tests build the
classic bug (the tanh approximation, approximate=True) from the same file."""
import paddle.nn.functional as F
from paddle import nn

C, K = 6, 3
GELU_ARGS: dict = {}


class Net(nn.Layer):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1D(C, 16, 3, padding=1)
        self.n1 = nn.BatchNorm1D(16, momentum=0.9, epsilon=1e-5)
        self.a1 = nn.GELU()
        self.c2 = nn.Conv1D(16, 8, 3, padding=1)
        self.a2 = nn.GELU(**GELU_ARGS)
        self.fc = nn.Linear(8, K)

    def forward(self, x, labels=None):
        h = self.a1(self.n1(self.c1(x)))
        h = self.a2(self.c2(h))
        return self.fc(h.mean(-1))


def build():
    return {"model": Net(), "loss": lambda o, b: F.cross_entropy(o["output"], b["labels"])}
