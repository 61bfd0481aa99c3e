"""The interactive layer debugger behind ``coordinator debug``: plain prompts on stdin/stdout.

It runs the forward (and with ``backward`` one backward pass) live like the ``layers``
step, keeping every compared pair (in memory up to ``layers_hold_mib``, then on disk), and
stops at the first divergent layer or at the layer named with ``--at``. There the user
looks at statistics and the largest differences, replays the layer alone, walks to the
next/previous layer or continues to the next divergence.
"""

from __future__ import annotations

import shlex
from typing import Any, Callable, TextIO

import numpy as np

from .compare import as_array
from .layerdiff import ROOT_NAME, Row
from .layerrun import (capture, describe_first, layer_map, own_walk, replay, seeded_labels, suspects, tolerances,
                       top)
from .layerview import LayerView, row_line
from .errors import Interrupted, ProtocolMismatch, UsageError, WorkerDied, WorkerHung
from .runner import RunContext, StepResult

HELP = """commands:
  stats          summary statistics of torch's and paddle's tensor and of their difference
  top [k]        the k positions with the largest absolute difference (default 5)
  replay         run this layer alone on torch's input on both sides: own error or inherited?
  next [k] | n   move k rows on (default 1)     prev [k] | p   move k rows back
  continue | c   go on to the next divergent layer (or the end)
  continue own   go on to the next layer that is wrong by itself: each divergent row on the
                 way is replayed, and those that agree run alone (inherited) are passed over
  goto NAME      jump to a layer by torch or paddle name (exact, else a part of one);
                 NAME:input its input row, NAME:grad its gradient row, <model> the model
  list [n]       the rows around the current one (default 5 each side)
  where          show the current row again
  help           this text              quit | q   leave (the run directory keeps the report)"""


def _short_why(iso: dict) -> str:
    """One clause for a passed-over row: how close its layer came run alone, or why it was not run."""
    if iso.get("replay_norm_err") is not None:
        return f"run alone it agrees: {iso['replay_norm_err']:.1e} of max|torch|"
    why = str(iso.get("why", ""))
    return why.split(":", 1)[0] if why else "not replayed"


TOP_MAX = 1000   # positions `top` prints at most (an embedding gradient has millions)


class Debugger:
    def __init__(self, rc: RunContext, at: str | None = None, backward: bool = False,
                 stdin: TextIO | None = None, stdout: TextIO | None = None):
        import sys
        self.rc, self.at, self.backward = rc, at, backward
        self.stdin, self.out = stdin or sys.stdin, stdout or sys.stdout
        self.rows: list[Row] = []
        self.caps: list[Any] = []
        self.pos = 0
        self.log: list[dict[str, Any]] = []
        self.interrupted = False   # Ctrl-C at the prompt
        self.cleared: set[tuple[str, str]] = set()   # (phase, key) of rows a replay found inherited

    # -- output ---------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- capture ----------------------------------------------------------------------------
    def run_captures(self) -> None:
        from .steps.common import ensure_converted, gen_inputs
        rc = self.rc
        ensure_converted(rc)
        self.lmap = layer_map(rc)
        self.fwd_tol, self.bwd_tol = tolerances(rc)
        self.inputs = gen_inputs(rc)
        self.labels = seeded_labels(rc, self.inputs)
        names = {n for p in self.lmap.pairs for n in (p.torch, p.paddle)}
        if self.at:   # a name nothing can match is refused before the capture, not after it
            target = Target(self.at, names)
            every = names | set(rc.cache.get("torch_weights") or ()) | set(rc.cache.get("converted") or ())
            if not target.exact and not any(target.base in n for n in every if n):
                shown = ", ".join(sorted(n or ROOT_NAME for n in names)[:8])
                raise UsageError(f"--at {self.at!r}: no layer or parameter has that name or a name containing it, "
                                 f"torch or paddle (layers: {shown}, ...)")
        stop = _Stop(self.at, names)
        with LayerView(lambda s: None, stream=self.out, live=False) as view:
            def on_row(row: Row) -> None:
                if not view.silenced:
                    view.on_row(row)
                    if stop.hit(row):
                        view.silenced = True
                        where = row.label if self.at else "the first divergence"
                        self.say(f"-- stopped at {where} (capture continues silently; 'next' / 'continue' "
                                 f"walk on) --")
            fwd = capture(rc, self.lmap, self.inputs, self.fwd_tol, on_row=on_row, keep=lambda r: True)
            self.caps.append(fwd)
            self.rows += fwd.diff.ordered("forward")
            if self.backward:
                bwd = capture(rc, self.lmap, self.inputs, self.bwd_tol, backward=True, labels=self.labels,
                              on_row=on_row, keep=lambda r: True)
                self.caps.append(bwd)
                self.rows += bwd.diff.ordered("backward")
        self.pos = self._initial_position()

    def _initial_position(self) -> int:
        if self.at:
            idx = self.find(self.at)
            if idx is None:
                names = ", ".join(dict.fromkeys(r.torch or ROOT_NAME for r in self.rows[:8]))
                raise UsageError(f"--at {self.at!r}: no compared layer by that name, torch or paddle (the rows "
                                 f"start with {names}, ...)")
            return idx
        bad = [i for i, r in enumerate(self.rows) if not r.passed]
        if not bad:
            self.say("no divergent layer: every compared tensor is within tolerance; at the last row")
            return max(0, len(self.rows) - 1)
        return bad[0]

    def find(self, name: str) -> int | None:
        """A layer's row (``Target``: its output row for a plain name, ``NAME:input`` its input
        row, ``NAME:grad`` its gradient row; an exact torch or paddle name first, else the first
        row whose names contain it)."""
        target = Target(name, {n for r in self.rows for n in (r.torch, r.paddle)})
        hits = [i for i, r in enumerate(self.rows) if target.matches(r)]
        if not target.exact:
            layers = list(dict.fromkeys(self.rows[i].torch or ROOT_NAME for i in hits))
            if len(layers) > 1:
                more = f" and {len(layers) - 3} more" if len(layers) > 3 else ""
                self.say(f"{target.base!r} is part of {len(layers)} layers' names ({', '.join(layers[:3])}{more}): "
                         f"taking the first; give more of the name to choose")
        return hits[0] if hits else None

    def tensors(self, row: Row) -> tuple[np.ndarray, np.ndarray] | None:
        for cap in self.caps:
            got = cap.diff.tensors(row)
            if got is not None:
                return got
        return None

    # -- the prompt -----------------------------------------------------------------------
    def repl(self) -> None:
        if not self.rows:
            self.say("nothing was compared")
            return
        self.show()
        cmds: dict[str, Callable[[list[str]], bool]] = {
            "help": self.c_help, "h": self.c_help, "?": self.c_help, "stats": self.c_stats, "top": self.c_top,
            "replay": self.c_replay, "next": self.c_next, "n": self.c_next, "prev": self.c_prev,
            "p": self.c_prev, "continue": self.c_continue, "c": self.c_continue, "goto": self.c_goto,
            "list": self.c_list, "l": self.c_list, "where": self.c_where, "quit": self.c_quit,
            "q": self.c_quit, "exit": self.c_quit}
        while True:
            self.out.write("(lockstep) ")
            self.out.flush()
            line = self._read_line()
            if line is None:              # Ctrl-C at the prompt: the session ends as interrupted
                self.say("\ninterrupted at the prompt")
                self.interrupted = True
                return
            if not line:                  # EOF: leave like quit
                self.say("")
                return
            if not _isatty(self.stdin):   # scripted: echo the command so the transcript reads well
                self.say(line.rstrip("\n"))
            try:
                words = shlex.split(line)
            except ValueError as exc:
                self.say(f"cannot parse {line.strip()!r}: {exc}")
                continue
            if not words:
                continue
            fn = cmds.get(words[0].lower())
            self.log.append({"command": line.strip(), "row": self.rows[self.pos].key,
                             "phase": self.rows[self.pos].phase})
            if fn is None:
                self.log[-1]["error"] = "unknown command"
                self.say(f"unknown command {words[0]!r}; type 'help'")
                continue
            try:
                done = fn(words[1:])
                # the row the command left the session at (goto, next: the new one)
                self.log[-1].update(row=self.rows[self.pos].key, phase=self.rows[self.pos].phase)
                if done:
                    return
            except Interrupted:           # Ctrl-C during a replay: the session ends as interrupted
                self.say("\ninterrupted")
                self.interrupted = True
                return
            except (WorkerDied, WorkerHung, ProtocolMismatch):
                raise                     # no worker to go on with: the run ends with that error
            except Exception as exc:  # a failed command must not end the session
                text = str(exc)
                self.say(f"error: {type(exc).__name__}: {text[:400]}{' ...' if len(text) > 400 else ''}")

    def _read_line(self) -> str | None:
        """One line from stdin; None on Ctrl-C. While the prompt waits, SIGINT interrupts the read
        (the run's own handler would only stop the next op, and the prompt would go on)."""
        import signal
        import threading

        class _Stop(Exception):
            pass

        def stop(signum: int, frame: Any) -> None:
            raise _Stop

        if threading.current_thread() is not threading.main_thread():
            return self.stdin.readline()
        old = signal.signal(signal.SIGINT, stop)
        try:
            return self.stdin.readline()
        except (_Stop, KeyboardInterrupt):
            return None
        finally:
            signal.signal(signal.SIGINT, old)

    def show(self) -> None:
        r = self.rows[self.pos]
        self.say(f"at row {self.pos + 1}/{len(self.rows)}:")
        self.say(row_line(r))   # (its reason included when it fails)
        layout = "; shape, positions and top in paddle's layout" if r.what == "param_grad" else ""
        self.say(f"  <-> paddle {r.paddle or ROOT_NAME} [{r.paddle_type}]{layout}")

    def c_help(self, args: list[str]) -> bool:
        self.say(HELP)
        return False

    def c_where(self, args: list[str]) -> bool:
        self.show()
        return False

    def c_quit(self, args: list[str]) -> bool:
        return True

    def c_stats(self, args: list[str]) -> bool:
        r = self.rows[self.pos]
        pair = self.tensors(r)
        if pair is None:
            self.say("tensors of this row were not kept")
            return False
        self.say(f"{r.label} <-> {r.paddle}  shape {r.shape}")
        for side, a in (("torch", pair[0]), ("paddle", pair[1])):
            self.say(f"  {side:6s} {_stats(as_array(a))}")
        self.say(f"  diff   max {r.max_abs:.4e}  mean {r.mean_abs:.4e}  max|diff|/max|torch| {r.norm_err:.3e}  "
                 f"rms rel {r.rms_rel:.3e}  worst at {r.worst_index if r.worst_index is not None else '-'}  ({r.tolerance}: "
                 f"{'pass' if r.passed else 'FAIL'})")
        return False

    def c_top(self, args: list[str]) -> bool:
        k = _count(args, 5)
        if k is None:
            self.say("usage: top [k]  (k a whole number >= 1, default 5)")
            return False
        if k > TOP_MAX:
            self.say(f"(showing the first {TOP_MAX}: top prints at most {TOP_MAX} positions)")
            k = TOP_MAX
        r = self.rows[self.pos]
        rows = top(self.tensors(r), k)
        if not rows:
            self.say("no differences to show (tensors not kept, or shapes differ)")
        for t in rows:
            self.say(f"  {str(t['index']):22s} torch {t['ref']:+.7e}  paddle {t['got']:+.7e}  |diff| {t['abs_diff']:.3e}")
        return False

    def c_replay(self, args: list[str]) -> bool:
        r = self.rows[self.pos]
        tol = self.bwd_tol if r.phase == "backward" else self.fwd_tol
        executed = set().union(*(c.diff.executed for c in self.caps))
        iso = replay(self.rc, self.lmap, r, self.inputs, tol, executed,
                     self.labels if r.phase == "backward" else None, earlier=self._suspects(self.pos),
                     floor=self._floor(r.phase))
        if iso.get("verdict") == "inherited" and iso.get("replay_norm_err") is not None:
            self.cleared.add((r.phase, r.key))
        for c in iso.get("checks", []):
            self.say(f"  replay {c['key']}: max {_fmt(c['max_abs'])}  max|diff|/max|torch| {_fmt(c['norm_err'])}  "
                     f"{'pass' if c['passed'] else 'FAIL ' + c['reason']}")
        self.say(describe_first(r, iso).split("\n", 1)[-1])
        self.log[-1]["replay"] = {k: iso.get(k) for k in ("verdict", "layer", "replay_norm_err", "why")}
        return False

    def _move(self, to: int) -> None:
        self.pos = max(0, min(len(self.rows) - 1, to))
        self.show()

    def c_next(self, args: list[str]) -> bool:
        k = _count(args, 1)
        if k is None:
            self.say("usage: next [k]  (k a whole number >= 1)")
            return False
        if self.pos >= len(self.rows) - 1:
            self.say("at the last row")
        self._move(self.pos + k)
        return False

    def c_prev(self, args: list[str]) -> bool:
        k = _count(args, 1)
        if k is None:
            self.say("usage: prev [k]  (k a whole number >= 1)")
            return False
        if self.pos == 0:
            self.say("at the first row")
        self._move(self.pos - k)
        return False

    def c_continue(self, args: list[str]) -> bool:
        if args and args[0].lower() == "own":
            return self._continue_own()
        if args:
            self.say("usage: continue [own]")
            return False
        for i in range(self.pos + 1, len(self.rows)):
            r = self.rows[i]
            if not r.passed:
                self.say("-- next divergence --")
                self._move(i)
                return False
            self.say(row_line(r))
        self.say("-- end of the compared rows: no further divergence --")
        self.pos = len(self.rows) - 1
        return False

    def _floor(self, phase: str) -> float:
        """The live comparison's floor for ``phase``: replays judge near-zero tensors the same way."""
        tol = self.bwd_tol if phase == "backward" else self.fwd_tol
        return tol.floor_frac * max([c.diff.phase_scale.get(phase, 0.0) for c in self.caps] or [0.0])

    def _suspects(self, i: int) -> list[Row]:
        forward = [e for e in self.rows if e.phase == "forward"]
        return suspects(self.rows, i, self.cleared, forward if self.rows[i].phase == "backward" else None)

    def _continue_own(self) -> bool:
        """The next divergent row whose layer differs run alone on torch's input (a second bug
        behind the first): every divergent row on the way is replayed (``own_walk``), one line
        each. A row whose replay fails stops the walk there, for the user to judge."""
        executed = set().union(*(c.diff.executed for c in self.caps))
        skipped, replays = 0, []
        self.log[-1]["replays"] = replays
        forward = [e for e in self.rows if e.phase == "forward"]
        tol_for = lambda phase: self.bwd_tol if phase == "backward" else self.fwd_tol  # noqa: E731
        for i, r, iso in own_walk(self.rc, self.lmap, self.rows, self.pos, self.inputs, tol_for, self.labels,
                                  executed, self.cleared, forward, self._floor):
            if isinstance(iso, Exception):   # this row's replay failed: stop here
                replays.append({"row": r.key, "phase": r.phase, "verdict": "error"})
                self.say(f"-- cannot isolate this row: its replay failed: {type(iso).__name__}: {str(iso)[:300]} "
                         f"({skipped} inherited row(s) passed over) --")
                self._move(i)
                return False
            replays.append({"row": r.key, "phase": r.phase, "verdict": iso.get("verdict")})
            if iso.get("verdict") == "inherited":
                skipped += 1
                self.say(f"  row {i + 1} {r.label}: inherited ({_short_why(iso)})")
                continue
            head = "-- next own error --" if iso.get("verdict") == "own" else "-- cannot isolate this row; stopped --"
            self.say(f"{head} ({skipped} inherited row(s) passed over)")
            self._move(i)
            self.say(describe_first(r, iso).split("\n", 1)[-1])
            return False
        self.say(f"-- end of the compared rows: no further own error ({skipped} inherited row(s) passed over) --")
        self.pos = len(self.rows) - 1
        return False

    def c_goto(self, args: list[str]) -> bool:
        if not args:
            self.say("goto NAME")
            return False
        idx = self.find(args[0])
        if idx is None:
            self.say(f"no compared layer matches {args[0]!r}")
        else:
            self._move(idx)
        return False

    def c_list(self, args: list[str]) -> bool:
        n = _count(args, 5)
        if n is None:
            self.say("usage: list [n]  (n rows either side, a whole number >= 1, default 5)")
            return False
        for i in range(max(0, self.pos - n), min(len(self.rows), self.pos + n + 1)):
            self.say(("> " if i == self.pos else "  ") + row_line(self.rows[i], i + 1)[2:])
        return False

    def close(self) -> None:
        for c in self.caps:
            c.diff.close()


class Target:
    """A row named on the command line (``--at``, ``goto``): ``NAME`` is the layer's output row,
    ``NAME:input`` / ``NAME <input>`` its input row, ``NAME:grad`` / ``NAME <grad>`` its gradient
    row (``--backward``); ``<model>`` is the model itself. NAME is a torch or paddle module name,
    matched exactly when some layer has that name, else as a part of one (the first such row)."""

    SUFFIXES = ((":input", "input"), (" <input>", "input"), (":grad", "grad"), (" <grad>", "grad"))

    def __init__(self, text: str, names: set[str]):
        self.base, self.what = text.strip(), None
        for suffix, what in self.SUFFIXES:
            if self.base.endswith(suffix):
                self.base, self.what = self.base[:-len(suffix)].strip(), what
                break
        if self.base == ROOT_NAME:
            self.base = ""
        self.exact = self.base in names

    def matches(self, row: Row) -> bool:
        if row.what != (self.what or "output") and not (self.what is None and row.what == "param_grad"):
            return False
        names = (row.torch, row.paddle)
        return self.base in names if self.exact else any(self.base and self.base in n for n in names)


class _Stop:
    """Where the live view stops: the named layer (resolved as ``goto`` resolves it), else the
    first divergent one."""

    def __init__(self, at: str | None, names: set[str]):
        self.target = Target(at, names) if at else None

    def hit(self, row: Row) -> bool:
        return self.target.matches(row) if self.target else not row.passed


def _isatty(f: Any) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):
        return False


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3e}"


def _stats(a: np.ndarray) -> str:
    if a.size == 0:
        return f"{a.dtype} empty"
    f = a.astype(np.float64)
    return (f"{str(a.dtype):8s} mean {f.mean():+.5e}  std {f.std():.5e}  min {f.min():+.5e}  max {f.max():+.5e}  "
            f"|max| {np.abs(f).max():.5e}")


def _count(args: list[str], default: int) -> int | None:
    """A command's optional count: ``default`` without one, None when it is not a whole number >= 1."""
    if not args:
        return default
    try:
        n = int(args[0])
    except ValueError:
        return None
    return n if n >= 1 else None


def debug_step(at: str | None, backward: bool, stdin: TextIO | None = None,
               stdout: TextIO | None = None) -> Callable[[RunContext], StepResult]:
    """The debugger as a runner step (so workers start, stop and report like any run)."""
    def step(rc: RunContext) -> StepResult:
        dbg = Debugger(rc, at, backward, stdin, stdout)
        try:
            dbg.run_captures()
            dbg.repl()
            bad = [r for r in dbg.rows if not r.passed]
            first = bad[0] if bad else None
            details = {"rows": len(dbg.rows), "failed": len(bad), "at": at, "backward": backward,
                       "first": first.to_json() if first else None, "session": dbg.log,
                       "interrupted": dbg.interrupted}   # the runner then ends the run as interrupted
            # what report.html draws for a layers step: per phase the rows, the first divergence
            # (with the verdict of a replay the session ran on it) and the layer map
            # keyed by phase too: a gradient row has its forward row's key
            replays = {(e.get("phase"), e.get("row")): e["replay"] for e in dbg.log if e.get("replay")}
            details["tolerance"] = {"forward": dbg.fwd_tol.describe(), "backward": dbg.bwd_tol.describe()}
            details["map"] = dbg.lmap.to_json()
            for phase in ("forward", "backward") if backward else ("forward",):
                rows = [r for r in dbg.rows if r.phase == phase]
                failed = [r for r in rows if not r.passed]
                ph: dict[str, Any] = {"rows": [r.to_json() for r in rows], "failed": len(failed)}
                if failed:
                    ph["first"] = dict(failed[0].to_json(), isolation=replays.get((phase, failed[0].key)) or {})
                details[phase] = ph
            msg = (f"first divergent layer: {first.label} ({first.phase}): {first.reason}" if first
                   else f"{len(dbg.rows)} layer tensors within tolerance")
            return StepResult("debug", not bad, max((r.norm_err for r in dbg.rows), default=None),
                              dbg.fwd_tol.describe(), msg, [], details)
        finally:
            dbg.close()
    return step
