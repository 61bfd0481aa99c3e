"""The CNN port with a classic migration bug: the first BatchNorm's epsilon is 1e-3, not 1e-5.

Every weight still maps and the model runs; only the numbers drift (about 1e-3 relative),
which a forward comparison at 1e-5 must catch and name. Check with the torch original:
``--torch-model examples.cnn.torch_model:build --paddle-model examples.cnn_buggy.paddle_model:build``.
"""

from __future__ import annotations

from examples.cnn.paddle_model import SmallCNN


def build() -> dict:
    return {"model": SmallCNN(bn1_epsilon=1e-3)}
