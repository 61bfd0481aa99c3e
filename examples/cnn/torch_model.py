"""The original: a small CNN classifier in PyTorch.

``build`` is the factory lockstep calls inside the torch worker:
``coordinator run --torch-model examples.cnn.torch_model:build --paddle-model examples.cnn.paddle_model:build``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE = [4, 3, 32, 32]   # batch, channels, height, width
CLASSES = 10


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, kernel_size=3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.features(images)
        return self.classifier(torch.flatten(x, 1))   # NCHW flatten


def build(seed: int = 0) -> dict:
    """The model with realistic BatchNorm statistics (a few training-mode passes), inputs and loss."""
    torch.manual_seed(seed)
    model = SmallCNN()
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32, generator=g) * 2.0 + 0.5)
    model.eval()
    return {
        "model": model,
        "inputs": [{"name": "images", "shape": IMAGE, "dtype": "float32"},
                   {"name": "labels", "shape": IMAGE[:1], "dtype": "int64", "low": 0, "high": CLASSES}],
        "loss": lambda outputs, batch: F.cross_entropy(outputs["output"], batch["labels"]),
        "optimizer": {"type": "sgd", "lr": 0.01},
    }
