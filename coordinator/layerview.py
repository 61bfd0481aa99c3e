"""The live terminal view of the layers step: rows tick by as both sides' tensors meet.

On a terminal it is a ``rich.live.Live`` panel (the latest rows, counts, the first
divergence); otherwise (a pipe, a CI log) one plain line per row, so logs stay greppable.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any, Callable, TextIO

from .layerdiff import ROOT_NAME, Row

PHASE = {"forward": "fwd", "backward": "bwd"}


def short_type(typ: str, width: int) -> str:
    """A class name in ``width`` characters keeping its end (the kind: ``…QuantizableLinear``)."""
    return typ if len(typ) <= width else "…" + typ[-(width - 1):]


def row_line(row: Row, index: int | None = None) -> str:
    """One plain line: mark, phase, row, type, max abs, normalized error, and the reason when failing."""
    mark = "ok  " if row.passed else "FAIL"
    num = f"{index:4d} " if index is not None else ""
    what = {"input": " <input>", "grad": " <grad>", "param_grad": ""}.get(row.what, "")
    name = (row.torch or ROOT_NAME) + what
    typ = row.torch_type or row.paddle_type
    err = "" if row.passed else f"  {row.reason}"
    note = f"  ({row.note})" if row.note else ""
    return (f"  {mark} {num}{PHASE.get(row.phase, row.phase)} {name:<62s} {short_type(typ, 16):<16s} "
            f"max {row.max_abs:9.3e}  rel {row.norm_err:8.2e}{err}{note}")


class LayerView:
    """``on_row`` for ``LiveDiff``: live panel on a TTY, plain lines otherwise."""

    def __init__(self, say: Callable[[str], None], stream: TextIO | None = None, live: bool | None = None,
                 quiet_after_first: bool = False, max_lines: int | None = None):
        self.say = say
        self.stream = stream or sys.stdout
        self.live_mode = self.stream.isatty() if live is None else live
        self.count = {"forward": 0, "backward": 0}
        self.failed = {"forward": 0, "backward": 0}
        self.first: dict[str, Row] = {}
        self.recent: deque[tuple[int, Row]] = deque(maxlen=14)
        self.quiet_after_first = quiet_after_first   # the debugger stops printing at its stop point
        self.silenced = False
        self.max_lines = max_lines
        self.printed = 0
        self._live: Any = None

    def __enter__(self) -> "LayerView":
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live
            self._live = Live(self._render(), console=Console(file=self.stream, highlight=False, emoji=False),
                              refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    def line(self, text: str) -> None:
        """Plain lines go straight to the stream: no wrapping at 80 columns, one row per line."""
        self.stream.write(text + "\n")
        self.stream.flush()

    def on_row(self, row: Row) -> None:
        self.count[row.phase] = self.count.get(row.phase, 0) + 1
        if not row.passed:
            self.failed[row.phase] = self.failed.get(row.phase, 0) + 1
            cur = self.first.get(row.phase)
            if cur is None or row.seq < cur.seq:
                self.first[row.phase] = row
        self.recent.append((self.count[row.phase], row))
        if self._live is not None:
            self._live.update(self._render())
            return
        if self.silenced:
            return
        if self.max_lines is None or self.printed < self.max_lines or not row.passed:
            # no row number: rows are shown as they are compared, while report.html, layers.tsv and
            # the debugger number them in torch's execution order, which can differ (paddle's order)
            self.line(row_line(row))
            self.printed += 1
        if not row.passed and self.quiet_after_first:
            self.silenced = True

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text
        t = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        for col, just in (("", "left"), ("", "left"), ("layer", "left"), ("type", "left"),
                          ("max abs", "right"), ("max rel", "right")):
            t.add_column(col, justify=just, no_wrap=True)
        for _n, r in self.recent:
            mark = Text("✓", style="green") if r.passed else Text("✗", style="bold red")
            name = (r.paddle if r.what == "param_grad" else r.torch) + \
                {"input": " <input>", "grad": " <grad>"}.get(r.what, "")
            t.add_row(mark, PHASE.get(r.phase, r.phase), name[-70:], short_type(r.torch_type or r.paddle_type, 18),
                      f"{r.max_abs:.3e}", f"{r.norm_err:.2e}", style=None if r.passed else "red")
        head = Text(f"layers: forward {self.count.get('forward', 0)} compared, {self.failed.get('forward', 0)} over "
                    f"tolerance · backward {self.count.get('backward', 0)} compared, "
                    f"{self.failed.get('backward', 0)} over tolerance", style="bold")
        parts: list[Any] = [head, t]
        for phase, r in self.first.items():
            parts.append(Text(f"first divergence ({phase}): {r.label}  {r.reason}", style="bold red"))
        return Group(*parts)
