"""The port: the same CNN in PaddlePaddle, with its own layer names (conv1, bn1, ..., fc2).

lockstep maps the weights automatically (``coordinator map --suggest`` prints the pairing):
``features.0`` -> ``conv1``, ``features.1.running_mean`` -> ``bn1._mean``, the Linear weights
transposed ([out, in] in torch, [in, out] in paddle).
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn

CLASSES = 10


class SmallCNN(nn.Layer):
    def __init__(self, num_classes: int = CLASSES, bn1_epsilon: float = 1e-5) -> None:
        super().__init__()
        # paddle's BatchNorm momentum is torch's (1 - momentum): 0.9 <-> 0.1
        self.conv1 = nn.Conv2D(3, 8, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2D(8, momentum=0.9, epsilon=bn1_epsilon)
        self.conv2 = nn.Conv2D(8, 16, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2D(16, momentum=0.9, epsilon=1e-5)
        self.pool = nn.MaxPool2D(2)
        self.fc1 = nn.Linear(16 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, images: paddle.Tensor, labels: paddle.Tensor | None = None) -> paddle.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(images))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = paddle.flatten(x, start_axis=1)             # NCHW flatten, as torch does
        return self.fc2(F.relu(self.fc1(x)))


def build() -> dict:
    """Weights are random here: lockstep overwrites them with the torch model's, converted."""
    return {"model": SmallCNN(),
            "loss": lambda outputs, batch: F.cross_entropy(outputs["output"], batch["labels"]),
            "optimizer": {"type": "sgd", "lr": 0.01}}
