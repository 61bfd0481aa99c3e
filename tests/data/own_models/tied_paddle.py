"""The paddle port of tied_torch.py: logits = h @ embed.weight^T."""
import paddle
import paddle.nn.functional as F
from paddle import nn
V, D = 20, 16
UNTIE = False   # tests set it: a separate output matrix, the port not tied (a bug)


class TiedLM(nn.Layer):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.dense = nn.Linear(D, D)
        self.ln = nn.LayerNorm(D)
        if UNTIE:   # deliberate bug: a separate (untied) output matrix
            self.out = nn.Linear(D, V, bias_attr=False)

    def forward(self, tokens, labels=None):
        h = self.ln(paddle.tanh(self.dense(self.embed(tokens))))
        if UNTIE:
            return self.out(h)
        return paddle.matmul(h, self.embed.weight, transpose_y=True)

def build():
    return {"model": TiedLM(),
            "loss": lambda o, b: F.cross_entropy(o["output"].reshape([-1, V]), b["labels"].reshape([-1]))}
