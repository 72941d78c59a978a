"""Fault injection for the crash tests: a real SIGKILL at an exact instant of the commit protocol.

`VTT_PREP_CRASH_AT=point[:n]` makes the process kill itself (SIGKILL: no cleanup, no finally) the n-th
time (default: first) it passes `crash_point(point)`. Unset, it costs one environment lookup.
Points: sample-written, shard-renamed, ledger-written (the commit file exists, index.json not rewritten
yet), rewrite-committed (also after the --rebuild switch), purge-committed (retired shards dropped from the
ledger, files not yet deleted).
"""
from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "VTT_PREP_CRASH_AT"
_passed: Counter = Counter()


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point == name:
        _passed[name] += 1
        if _passed[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
