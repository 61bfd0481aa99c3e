"""The PaddlePaddle side: serves ops over ZeroMQ from the paddle environment. Imports no torch."""
