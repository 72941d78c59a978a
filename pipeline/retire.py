"""Retired shards: shards replaced by a rewrite, compact or rebuild, kept a while for running trainers.

A trainer reads index.json once and opens the listed shards for as long as it runs. If a rewrite
deleted a replaced shard at once, that trainer's next epoch would meet a missing file (a `bad_shard`
skip). So the commit that takes a shard out of index.json lists it as retired in the ledger, with the
time, and the file stays. The first extract or compact run that starts more than `retention_hours`
later deletes it: one ledger commit first, then the files (a crash in between leaves unlisted files,
which reconcile removes as leftovers). retention_hours=0 deletes right after the commit, as before.
Cost per run: one pass over the retired list (a few entries per rewrite), one delete per due shard.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from vtt.shards.folder import out_folder
from vtt.shards.ledger import Ledger, RetiredShard, write_ledger

from .commit import sync_index
from .faults import crash_point

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def stamp(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime(_TIME_FORMAT)


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=timezone.utc)


def retire(ledger: Ledger, urls: list[str], retention_hours: float, now: datetime | None = None) -> list[str]:
    """Take `urls` out of the live list (the caller commits). Returns the files to delete once that
    commit is done: all of them with retention 0, else none (they are listed as retired)."""
    ledger.shard_floor = ledger.next_shard_number()  # their numbers are never handed out again
    entries = [ledger.shards.pop(u) for u in urls]
    if retention_hours == 0:
        return list(urls)
    when = stamp(now or utc_now())
    ledger.retired.update({e.url: RetiredShard.of(e, when) for e in entries})
    return []


def due(ledger: Ledger, retention_hours: float, now: datetime | None = None) -> list[str]:
    """Retired shards whose retention has passed (all of them with retention 0)."""
    limit = (now or utc_now()) - timedelta(hours=retention_hours)
    return sorted(u for u, r in ledger.retired.items() if parse_stamp(r.retired_at) <= limit)


def purge(folder, ledger: Ledger, retention_hours: float, now: datetime | None = None) -> list[str]:
    """Delete the retired shards past retention: commit the ledger without them, then delete the files
    (`folder`: a path or an OutFolder)."""
    out = out_folder(folder)
    urls = due(ledger, retention_hours, now)
    if not urls:
        return []
    ledger.shard_floor = ledger.next_shard_number()
    for u in urls:
        del ledger.retired[u]
    write_ledger(out, ledger)
    sync_index(out, ledger)
    crash_point("purge-committed")
    for u in urls:
        out.delete(u)
    return urls


def age_hours(shard: RetiredShard, now: datetime | None = None) -> float:
    return ((now or utc_now()) - parse_stamp(shard.retired_at)).total_seconds() / 3600
