"""Subprocess runner for ffmpeg/ffprobe: hard timeout, whole process group killed, stderr tail kept.

Decoders can hang on broken input (dmlc/decord#373 is the classic), so every external call goes through
`run`, which starts the child in its own session and SIGKILLs the group when the deadline passes.
Besides each call's own timeout, `budget(seconds)` bounds all calls made inside it together: one
video's dozen chained calls (probe, passes, retries, a full decode) then cannot add up to hours.
Whatever vtt keeps of a tool's output goes through `normalise` (in `tail`, the one place it is
captured), so the same inputs give the same recorded bytes in every process, engine and storage.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

STDERR_TAIL_CHARS = 2000

# "[h264 @ 0x55ebfbe7f300] error ..." -> "[h264] error ...": the log context's heap address differs
# in every process (ffmpeg 6+ prefixes look like "[vist#0:0/h264 @ 0x..]", same rule).
_ADDRESS = re.compile(r"\[([^\[\]\n]*?) @ (?:0x[0-9a-fA-F]+|\(nil\))\]")
# vtt's temp folders (tempfile: prefix + 8 random characters), wherever $TMPDIR is on this node.
_TEMP_DIR = re.compile(r"/(?:[^\s'\"/]+/)*(vtt-(?:frames|prep))-[a-z0-9_]{8}(?=/)")
# progress/benchmark figures, should a wrapper or an ffmpeg build print them despite -nostats
_TIMING = re.compile(r"\b(speed|elapsed|rtime|utime|stime)=\s*[0-9.:]+x?s?")
# (the local temp copy of a downloaded video, the name the user knows it by)
_SHOWN: ContextVar[tuple[str, str] | None] = ContextVar("vtt_proc_shown", default=None)


@contextmanager
def shown_as(local, name) -> Iterator[None]:
    """Inside, `normalise` writes `name` (a URL) wherever a tool's output names the file `local`
    (the temp copy a worker downloaded): the record then names the user's file, the same on every run."""
    token = _SHOWN.set((str(local), str(name)))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def normalise(text: str) -> str:
    """Tool output as vtt records it: decoder context addresses, timings and temp-folder names, which
    differ from run to run, taken out, so the same inputs give byte-identical ledgers and shards."""
    shown = _SHOWN.get()
    if shown is not None:
        text = text.replace(*shown)
    text = _ADDRESS.sub(r"[\1]", text)
    text = _TEMP_DIR.sub(r"<tmp>/\1", text)
    return _TIMING.sub(lambda m: f"{m.group(1)}=?", text)


# what a tool says when something is wrong (decoders and demuxers at any log level)
_TELLING = re.compile(r"error|invalid|not found|corrupt|missing|unsupported|not supported|no such|denied|"
                        r"partial file|truncat|failed|cannot|could not|unable|no decoder", re.I)


def telling_line(stderr: str, limit: int = 200) -> str:
    """The tool's own words for what went wrong: the first complaining line of a (normalised) stderr
    text, without its log context ("[mov,mp4,...] ") and file name ("file:/x.mp4: "); "" if none."""
    for line in stderr.splitlines():
        text = re.sub(r"^(?:\[[^\]]*\]\s*)+", "", line.strip())
        text = re.sub(r"^file:.*?: ", "", text)
        if _TELLING.search(text):
            return text[:limit]
    return ""


def tail(data: bytes | str, limit: int = STDERR_TAIL_CHARS) -> str:
    """Last `limit` characters of a process stream, decoded leniently (ffmpeg may print any bytes) and
    normalised: every stderr text vtt keeps (failure records, warnings, report) is made here."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    if len(text) > 4 * limit:  # from a line's start: an address cut in half would escape `normalise`
        text = text[-4 * limit:].partition("\n")[2]
    text = normalise(text)
    if len(text) > limit:
        text = text[-limit:]
        _, nl, rest = text.partition("\n")
        text = rest if nl and rest else text  # whole lines, unless one line is all there is
    return text


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
