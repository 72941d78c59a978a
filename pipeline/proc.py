"""Subprocess runner for ffmpeg/ffprobe: hard timeout, whole process group killed, stderr tail kept.

Decoders can hang on broken input (dmlc/decord#373 is the classic), so every external call goes through
`run`, which starts the child in its own session and SIGKILLs the group when the deadline passes.
Besides each call's own timeout, `budget(seconds)` bounds all calls made inside it together: one
video's dozen chained calls (probe, passes, retries, a full decode) then cannot add up to hours.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

STDERR_TAIL_CHARS = 2000


def tail(data: bytes | str, limit: int = STDERR_TAIL_CHARS) -> str:
    """Last `limit` characters of a process stream, decoded leniently (ffmpeg may print any bytes)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text[-limit:]


@dataclass
class ProcResult:
    args: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    elapsed_s: float

    @property
    def stderr_tail(self) -> str:
        return tail(self.stderr)


class ProcTimeout(Exception):
    """The command ran past its deadline; its process group was killed."""

    def __init__(self, args: list[str], timeout: float, stderr: bytes):
        super().__init__(f"{args[0]} timed out after {timeout:g}s")
        self.args_list = args
        self.timeout = timeout
        self.stderr_tail = tail(stderr)


class BudgetExceeded(Exception):
    """The calls inside one `budget` together ran past it; the running one (if any) was killed.

    Deliberately not a ProcTimeout: callers that turn a call's timeout into a retry or an error class
    of their own must let this one through to whoever set the budget."""

    def __init__(self, seconds: float, calls: int, stderr: bytes = b""):
        super().__init__(f"the {calls} ffmpeg/ffprobe call(s) for one video ran past its budget of {seconds:g}s")
        self.seconds, self.calls, self.stderr_tail = seconds, calls, tail(stderr)


@dataclass
class _Budget:
    deadline: float      # time.monotonic()
    seconds: float
    calls: int = 0


_BUDGET: ContextVar[_Budget | None] = ContextVar("vtt_proc_budget", default=None)


@contextmanager
def budget(seconds: float | None) -> Iterator[None]:
    """Every `run` inside shares one wall-clock deadline `seconds` from now (None: no shared limit)."""
    token = _BUDGET.set(_Budget(time.monotonic() + seconds, seconds) if seconds else None)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _limit(timeout: float) -> tuple[float, _Budget | None]:
    """(seconds this call may run, the budget when it, not `timeout`, is the tighter limit)."""
    b = _BUDGET.get()
    if b is None:
        return timeout, None
    b.calls += 1
    left = b.deadline - time.monotonic()
    if left <= 0:
        raise BudgetExceeded(b.seconds, b.calls - 1)
    return (left, b) if left < timeout else (timeout, None)


class ProcMissing(Exception):
    """The executable does not exist or cannot be run."""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def run(cmd: list[str], timeout: float, stdin: bytes | None = None) -> ProcResult:
    """Run `cmd` (no shell) and capture its output; raise ProcTimeout after `timeout` seconds.

    The child leads a new session, so killing its group also kills anything it spawned. A non-zero
    exit status is returned, not raised: callers classify failures themselves. Inside `budget`, the
    call gets at most what is left of it and raises BudgetExceeded when that runs out.
    """
    limit, by_budget = _limit(timeout)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        raise ProcMissing(f"cannot run {cmd[0]!r}: {exc}") from exc
    try:
        out, err = proc.communicate(stdin, timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        if by_budget is not None:
            raise BudgetExceeded(by_budget.seconds, by_budget.calls, err) from None
        raise ProcTimeout(list(cmd), timeout, err) from None
    except BaseException:  # KeyboardInterrupt etc.: never leave a decoder running
        _kill_group(proc)
        proc.wait()
        raise
    return ProcResult(list(cmd), proc.returncode, out, err, time.monotonic() - start)
