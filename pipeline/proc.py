"""Subprocess runner for ffmpeg/ffprobe: hard timeout, whole process group killed, stderr tail kept.

Decoders can hang on broken input (dmlc/decord#373 is the classic), so every external call goes through
`run`, which starts the child in its own session and SIGKILLs the group when the deadline passes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass

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
    exit status is returned, not raised: callers classify failures themselves.
    """
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        raise ProcMissing(f"cannot run {cmd[0]!r}: {exc}") from exc
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise ProcTimeout(list(cmd), timeout, err) from None
    except BaseException:  # KeyboardInterrupt etc.: never leave a decoder running
        _kill_group(proc)
        proc.wait()
        raise
    return ProcResult(list(cmd), proc.returncode, out, err, time.monotonic() - start)
