"""Start-of-run repair of a shards folder: make it match its ledger after whatever happened.

Runs first under the folder lock (extract and compact): the ledger's commit log (vtt.shards.ledger) is the
only truth, so anything a crash left that no commit lists is a leftover, and a listed shard that is gone or
damaged is dropped (its videos are planned again).
"""
from __future__ import annotations

from vtt.shards.folder import out_folder
from vtt.shards.format import INDEX_FILE, LEDGER_FILE, ShardFormatError
from vtt.shards.ledger import Ledger, clean_log, write_ledger
from vtt.shards.store import LEDGER_DIR

from .commit import sync_index


def reconcile(folder, ledger: Ledger | None) -> tuple[Ledger, list[str]]:
    """Make the shards folder (a path or an OutFolder: local or a URL) match its ledger after whatever
    happened (crash, kill -9, manual deletes).

    Upgrades a legacy ledger.json to the log (one checkpoint), removes temp files (of shards, in the
    folder or a URL's local scratch folder, and of the log) and shards the ledger lists neither as
    live nor as retired (published just before a crash), drops ledger shards that are missing or have
    the wrong size (their videos are re-extracted) and retired shards someone already deleted, and
    rewrites index.json from the ledger when it differs. Returns the ledger and what was repaired.
    Cost: one listing of the folder (local: a scandir; a URL: one request per ~1000 objects) and one of
    the log; nothing per shard.
    """
    out = out_folder(folder)
    notes = [f"removed temp file {n} (an interrupted run's)" for n in out.clean_scratch()]
    listed = out.listing()
    files = {n: size for n, size in listed.items() if n.startswith("shard-") and n.endswith(".tar")}
    fresh = ledger is None
    if fresh:
        if INDEX_FILE in listed:
            raise ShardFormatError(f"{out}: has {INDEX_FILE} but no ledger ({LEDGER_DIR}/ or {LEDGER_FILE}): "
                                   f"not a vtt-prep shards folder (or its ledger was deleted); use an empty folder")
        ledger = Ledger()
    elif ledger.legacy:
        write_ledger(out, ledger)
        notes.append(f"upgraded {LEDGER_FILE} to {LEDGER_DIR}/ (a commit log: each commit writes only what it changes)")
    notes += clean_log(out, ledger)
    broken = [u for u, e in ledger.shards.items() if files.get(u) != e.filesize]
    gone = sorted(u for u in ledger.retired if u not in files)
    for u in gone:
        notes.append(f"retired {u} is already gone (deleted by hand?): dropped from the ledger")
        del ledger.retired[u]
    if broken:
        for u in broken:
            notes.append(f"{u} is missing or has the wrong size: its videos will be extracted again")
            del ledger.shards[u]
        for s in [s for s, r in ledger.records.items() if r.shard in broken]:
            del ledger.records[s]
    if broken or gone:
        write_ledger(out, ledger)
    if not fresh:  # a fresh folder gets its index with its first ledger, never before
        sync_index(out, ledger)  # before deleting: the index must never list a missing shard
    for name in sorted(files):
        if name not in ledger.shards and name not in ledger.retired:
            out.delete(name)
            notes.append(f"removed {name}: not in the ledger (written by an interrupted run, or damaged)")
    return ledger, notes
