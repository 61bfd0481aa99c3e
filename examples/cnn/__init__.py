"""A small CNN image classifier (Conv2d + BatchNorm + ReLU + MaxPool + Linear) and its paddle port."""
