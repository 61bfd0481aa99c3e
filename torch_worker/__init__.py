"""The PyTorch side: serves ops over ZeroMQ from the torch environment. Imports no paddle."""
