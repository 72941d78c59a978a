"""The commit stage: the ledger's next commit file (the one commit point), then index.json derived from it.

A shard the writer finished is not live until a commit lists it; a crash before the commit file exists
leaves the old state (the shard is a leftover repair.py removes), after it the new one (index.json is
made to match by `sync_index`, here or at the next run's repair).
"""
from __future__ import annotations

from vtt.shards.folder import out_folder
from vtt.shards.format import INDEX_FILE
from vtt.shards.ledger import Ledger, write_ledger

from .faults import crash_point


def commit_ledger(folder, ledger: Ledger) -> None:
    """Commit what changed in `ledger` since its last commit, then the index. A no-op writes nothing.
    Cost: O(records changed + shards)."""
    if write_ledger(folder, ledger):  # only what changed
        crash_point("ledger-written")
    sync_index(folder, ledger)


def sync_index(folder, ledger: Ledger) -> None:
    """index.json = f(ledger); written only when it differs, so a no-op run touches nothing (a URL:
    one GET to compare)."""
    out = out_folder(folder)
    data = ledger.index_bytes()
    try:
        same = out.read_bytes(INDEX_FILE) == data
    except FileNotFoundError:
        same = False
    if not same:
        out.put_bytes(INDEX_FILE, data)
