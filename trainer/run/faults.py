"""Fault injection for the checkpoint crash tests: a real SIGKILL at an exact step of the save protocol.

`VTT_TRAIN_CRASH_AT=point[:n][@rank]` makes the process kill itself (SIGKILL: no cleanup, no finally) the n-th
time (default: first) it passes `crash_point(point)`, on the given global rank only (default: every rank).
Unset, it costs one environment lookup. Points (trainer/run/checkpoint.py): save-begin, rank-files, rank-done,
marker, latest.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "VTT_TRAIN_CRASH_AT"
_passed: Counter = Counter()


def crash_point(name: str, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    spec, _, only_rank = spec.partition("@")
    point, _, nth = spec.partition(":")
    if point != name or (only_rank and int(only_rank) != rank):
        return
    _passed[name] += 1
    if _passed[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
