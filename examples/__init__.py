"""Worked examples: a torch model, its paddle port, and the command that checks them (README.md).

Nothing here imports a framework at package level: each worker imports only its own side.
"""
