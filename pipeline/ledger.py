"""Incremental planning against the ledger, and start-of-run repair of a shards folder.

The ledger (vtt.shards.ledger) is the only truth; `reconcile` makes the folder match it after a crash,
`make_plan` compares the data folder with it. Fingerprints take the stat fast path and hash only when
stat differs, so a touched-but-unchanged file costs a hash, never an ffmpeg call.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from vtt.shards.format import INDEX_FILE, LEDGER_FILE, TMP_PREFIX, ShardFormatError, sha256_file
from vtt.shards.index import index_bytes
from vtt.shards.ledger import STATUS_OK, Fingerprint, Ledger, VideoRecord, write_ledger

from .discover import Video
from .report import Plan


class SettingsChanged(ShardFormatError):
    """The shards were made with other extraction settings; --rebuild is needed."""


def stat_of(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def fingerprint(path: Path | None, known: Fingerprint | None = None) -> Fingerprint | None:
    """Fingerprint of `path`; reuses `known`'s hash when size and mtime are unchanged."""
    if path is None:
        return None
    size, mtime = stat_of(path)
    if known is not None and known.size == size and known.mtime_ns == mtime:
        return known
    return Fingerprint(size, mtime, sha256_file(path))


def _needs_hash(path: Path | None, known: Fingerprint | None) -> bool:
    """Same size, other mtime: only the content hash can tell (a different size already does)."""
    if path is None or known is None:
        return False
    size, mtime = stat_of(path)
    return size == known.size and mtime != known.mtime_ns


def _same(path: Path | None, known: Fingerprint | None, hashes: dict) -> tuple[bool, Fingerprint | None]:
    """(content unchanged?, fresh fingerprint when only stat changed). Hashes only when it must."""
    if path is None or known is None:
        return path is None and known is None, None
    size, mtime = stat_of(path)
    if (size, mtime) == (known.size, known.mtime_ns):
        return True, None
    if size != known.size:
        return False, None
    fresh = Fingerprint(size, mtime, hashes.get(path) or sha256_file(path))
    return fresh.sha256 == known.sha256, fresh


def prehash(videos: list[Video], ledger: Ledger, workers: int) -> dict[Path, str]:
    """sha256 of every touched file, in threads (hashlib releases the GIL): after a copy that lost
    mtimes, every file needs its hash and one core would be the bottleneck."""
    todo = []
    for v in videos:
        rec = ledger.records.get(v.source)
        if rec is not None and rec.status == STATUS_OK:
            todo += [p for p, fp in ((v.path, rec.video), (v.sidecar_path, rec.sidecar)) if _needs_hash(p, fp)]
    if not todo:
        return {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip(todo, pool.map(sha256_file, todo)))


@dataclass
class Work:
    """What the run has to do, derived from the plan."""
    extract: list[Video] = field(default_factory=list)       # valid videos to run ffmpeg on, sorted
    invalid: list[Video] = field(default_factory=list)       # recorded as failed without ffmpeg
    remove: set[str] = field(default_factory=set)            # sources whose samples must leave the shards
    # video unchanged, only its sidecar changed: the sample is rebuilt from its old frames, no ffmpeg
    residecar: dict[str, tuple[Video, Fingerprint]] = field(default_factory=dict)
    # touched but unchanged: source -> (video, sidecar) fingerprints with the new stat
    refreshed: dict[str, tuple[Fingerprint, Fingerprint | None]] = field(default_factory=dict)

    def apply_refreshed(self, ledger: Ledger) -> None:
        """Store new stats of touched files (the record itself may have moved shards meanwhile)."""
        for source, (video, sidecar) in self.refreshed.items():
            rec = ledger.records.get(source)
            if rec is not None and rec.status == STATUS_OK:
                ledger.records[source] = replace(rec, video=video, sidecar=sidecar)


def _classify(v: Video, rec: VideoRecord | None, rebuild: bool, work: Work, hashes: dict) -> str:
    if rec is None:
        kind = "new"
    elif rec.status != STATUS_OK:
        kind = "failed"
    elif rebuild:
        kind = "changed"
    else:
        same_v, fresh_v = _same(v.path, rec.video, hashes)
        same_s, fresh_s = _same(v.sidecar_path, rec.sidecar, hashes) if same_v else (False, None)
        same_id = v.key == rec.key
        kind = "unchanged" if same_v and same_s and same_id and v.ok else "changed"
        if kind == "unchanged" and (fresh_v or fresh_s):
            work.refreshed[v.source] = (fresh_v or rec.video, fresh_s or rec.sidecar)
        if kind == "changed" and same_v and v.ok:
            work.remove.add(v.source)
            work.residecar[v.source] = (v, fresh_v or rec.video)
            return kind
    if kind == "changed":
        work.remove.add(v.source)
    if kind != "unchanged":
        (work.extract if v.ok else work.invalid).append(v)
    return kind


def make_plan(videos: list[Video], ledger: Ledger, settings_hash: str, rebuild: bool,
              workers: int = 1) -> tuple[Plan, Work]:
    """Compare the data folder with the ledger. Raises SettingsChanged unless `rebuild`."""
    has_samples = bool(ledger.ok_records())
    if has_samples and ledger.settings_hash != settings_hash and not rebuild:
        raise SettingsChanged(
            f"the shards were made with other extraction settings ({ledger.settings}); "
            f"rerun with the same settings, or add --rebuild to re-extract every video")
    rebuild = rebuild and has_samples
    plan, work = Plan(rebuild=rebuild), Work()
    hashes = {} if rebuild else prehash(videos, ledger, workers)
    seen = set()
    for v in videos:
        seen.add(v.source)
        kind = _classify(v, ledger.records.get(v.source), rebuild, work, hashes)
        getattr(plan, kind).append(v.source)
        if not v.ok:
            plan.invalid.append(v.source)
    for source, rec in sorted(ledger.records.items()):
        if source not in seen:
            plan.deleted.append(source)
            if rec.status == STATUS_OK:
                work.remove.add(source)
    return plan, work


def reconcile(folder: Path, ledger: Ledger | None) -> tuple[Ledger, list[str]]:
    """Make `folder` match its ledger after whatever happened (crash, kill -9, manual deletes).

    Removes temp files and shards the ledger does not list (renamed just before a crash), drops
    ledger shards that are missing or have the wrong size (their videos are re-extracted), and
    rewrites index.json from the ledger when it differs. Returns the ledger and what was repaired.
    """
    notes = []
    for p in sorted(folder.glob(TMP_PREFIX + "*")):
        p.unlink()
        notes.append(f"removed temp file {p.name} (an interrupted run's)")
    fresh = ledger is None
    if fresh:
        if (folder / INDEX_FILE).exists():
            raise ShardFormatError(f"{folder}: has {INDEX_FILE} but no {LEDGER_FILE}: not a vtt-prep "
                                   f"shards folder (or its ledger was deleted); use an empty folder")
        ledger = Ledger()
    broken = [u for u, e in ledger.shards.items()
              if not (folder / u).is_file() or (folder / u).stat().st_size != e.filesize]
    if broken:
        for u in broken:
            notes.append(f"{u} is missing or has the wrong size: its videos will be extracted again")
            del ledger.shards[u]
        ledger.records = {s: r for s, r in ledger.records.items() if r.shard not in broken}
        write_ledger(folder, ledger)
    if not fresh:  # a fresh folder gets its index with its first ledger, never before
        sync_index(folder, ledger)  # before deleting: the index must never list a missing shard
    for p in sorted(folder.glob("shard-*.tar")):
        if p.name not in ledger.shards:
            p.unlink()
            notes.append(f"removed {p.name}: not in {LEDGER_FILE} (written by an interrupted run, "
                         f"or damaged)")
    return ledger, notes


def sync_index(folder: Path, ledger: Ledger) -> None:
    """index.json = f(ledger); written only when it differs, so a no-op run touches nothing."""
    from vtt.shards.format import atomic_write_bytes
    data = index_bytes(ledger.index())
    path = folder / INDEX_FILE
    if not path.is_file() or path.read_bytes() != data:
        atomic_write_bytes(path, data)
