"""Errors that cross the wire as plain text (never as pickled exceptions)."""

from __future__ import annotations

import traceback as _tb
from typing import Any


class ProtocolError(Exception):
    """A message broke the wire format: bad frame, unknown dtype, size mismatch, bad version."""


class RemoteError(Exception):
    """An exception raised inside a worker, carried back as text.

    ``etype``, ``message`` and ``traceback`` are the worker's words; ``worker`` and
    ``op`` say where it happened, so the coordinator can name both.
    """

    def __init__(self, etype: str, message: str, traceback: str = "", worker: str = "?", op: str = "?"):
        self.etype = etype
        self.message = message
        self.traceback = traceback
        self.worker = worker
        self.op = op
        super().__init__(f"[{worker} worker, op {op!r}] {etype}: {message}")

    def to_body(self) -> dict[str, Any]:
        return {"type": self.etype, "message": self.message, "traceback": self.traceback,
                "worker": self.worker, "op": self.op}

    @classmethod
    def from_body(cls, body: Any) -> "RemoteError":
        if not isinstance(body, dict):
            return cls("ProtocolError", f"malformed error body: {body!r:.200}")
        return cls(str(body.get("type", "Error")), str(body.get("message", "")),
                   str(body.get("traceback", "")), str(body.get("worker", "?")), str(body.get("op", "?")))

    @classmethod
    def from_exception(cls, exc: BaseException, worker: str, op: str) -> "RemoteError":
        tb = "".join(_tb.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__name__, str(exc), tb, worker, op)
