"""Failures the coordinator reports, each with the exit code it ends the run with."""

from __future__ import annotations


class ExitCode:
    ALIGNED = 0
    DIVERGED = 1
    USAGE = 2
    ENVIRONMENT = 3
    WORKER_DIED = 4
    WORKER_HUNG = 5
    PROTOCOL = 6
    WORKER_ERROR = 7
    INTERNAL = 8
    INTERRUPTED = 130

    DESCRIPTIONS = {
        0: "aligned: every step passed",
        1: "diverged: at least one step failed its comparison",
        2: "usage: bad command line, input file or mapping",
        3: "environment / start-up: a worker environment is missing or broken, or a worker did not start",
        4: "worker died: a worker process exited or was killed during the run",
        5: "worker hung: an op passed its deadline; the worker was stopped",
        6: "protocol / version: a malformed message or a protocol version mismatch",
        7: "worker error: an op raised an exception inside a worker (traceback in the report)",
        8: "internal error: a step raised an unexpected exception in the coordinator (a lockstep bug: "
           "traceback in summary.json; later steps still ran)",
        130: "interrupted: Ctrl-C or SIGTERM; a partial report was written",
    }


class LockstepError(Exception):
    exit_code = ExitCode.USAGE


class UsageError(LockstepError):
    exit_code = ExitCode.USAGE


class EnvironmentProblem(LockstepError):
    exit_code = ExitCode.ENVIRONMENT


class WorkerStartupError(LockstepError):
    exit_code = ExitCode.ENVIRONMENT


class WorkerDied(LockstepError):
    exit_code = ExitCode.WORKER_DIED


class WorkerHung(LockstepError):
    exit_code = ExitCode.WORKER_HUNG


class ProtocolMismatch(LockstepError):
    exit_code = ExitCode.PROTOCOL


class WorkerFailed(LockstepError):
    """An op raised inside a worker; carries the worker's traceback text."""

    exit_code = ExitCode.WORKER_ERROR

    def __init__(self, remote):
        self.remote = remote
        super().__init__(f"{remote.worker} worker failed in op {remote.op!r}: {remote.etype}: {remote.message}")


class Interrupted(LockstepError):
    """Ctrl-C: no new op was started; the one in flight finished or ran out of its grace period."""

    exit_code = ExitCode.INTERRUPTED
