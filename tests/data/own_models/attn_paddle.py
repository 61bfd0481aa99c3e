"""The paddle port of attn_torch.py (separate q_proj/k_proj/v_proj, out_proj called as a layer)."""
import paddle.nn.functional as F
from paddle import nn

E, H, C = 16, 2, 3
NORM_EPS = 1e-5


class TinyEncoder(nn.Layer):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, E)
        self.layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, activation="relu")
        self.layer.norm1._epsilon = NORM_EPS
        self.head = nn.Linear(E, C)

    def forward(self, x, labels=None):
        h = self.layer(self.proj(x))
        return self.head(h.mean(axis=1))


def build():
    return {"model": TinyEncoder(),
            "loss": lambda o, b: F.cross_entropy(o["output"], b["labels"])}
