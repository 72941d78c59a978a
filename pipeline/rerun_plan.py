"""The plan stage of `vtt-prep extract`: the discovered videos compared with the ledger (RerunPlan + Work).

The ledger (vtt.shards.ledger) is the only truth; `make_plan` compares the data folder with it (repair.py
makes the shards folder match it first). Fingerprints take the stat fast path and hash only when
stat differs, so a touched-but-unchanged file costs a hash, never an ffmpeg call. Failed videos keep
their fingerprints too: an unchanged broken file is not tried again (with all its timeouts) on every
run, only when its file, sidecar, key, the settings, the ffmpeg version or a timeout that stopped it
changed, or with --retry-failed.
Cost: one stat per video and ledger record (a URL data folder: none, the listing has size and ETag);
a hash per touched file; no ffmpeg for unchanged videos
(one `ffmpeg -version` when unchanged failures exist, to see whether ffmpeg changed).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from vtt.shards.format import ShardFormatError, sha256_file
from vtt.shards.ledger import STATUS_OK, Fingerprint, Ledger, VideoRecord

from .config import settings_conflict
from .discover import Video
from .discover_remote import RemoteFile, sha256_of


class SettingsChanged(ShardFormatError):
    """The shards were made with other extraction settings; --rebuild is needed."""


def _remote(path) -> bool:
    return isinstance(path, RemoteFile)


def stat_of(path) -> tuple[int, int | str | None]:
    """The fast path: (size, mtime_ns) of a local file, (size, ETag) of an object from its listing (no request)."""
    if _remote(path):
        return path.size, path.etag
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _known(path, known: Fingerprint) -> tuple[int, int | str | None]:
    """What the record says about the same fast path (a local record's etag is None: never equal)."""
    return (known.size, known.etag) if _remote(path) else (known.size, known.mtime_ns)


def hash_of(path) -> str:
    """sha256 of a local file, or of an object (streamed; a sidecar's is known from discovery: no GET)."""
    if _remote(path):
        return sha256_of(path)
    return sha256_file(path)


def _fresh(path, sha256: str) -> Fingerprint:
    size, tag = stat_of(path)
    return Fingerprint(size, 0, sha256, tag) if _remote(path) else Fingerprint(size, tag, sha256)


def fingerprint(path, known: Fingerprint | None = None) -> Fingerprint | None:
    """Fingerprint of `path`; reuses `known`'s hash when the fast path (size + mtime or ETag) is unchanged."""
    if path is None:
        return None
    if known is not None and stat_of(path) == _known(path, known):
        return known
    return _fresh(path, hash_of(path))


def _needs_hash(path, known: Fingerprint | None) -> bool:
    """Same size, other mtime/ETag: only the content hash can tell (a different size already does)."""
    if path is None or known is None:
        return False
    size, tag = stat_of(path)
    return size == known.size and (size, tag) != _known(path, known)


def _same(path, known: Fingerprint | None, hashes: dict) -> tuple[bool, Fingerprint | None]:
    """(content unchanged?, fresh fingerprint when only stat changed). Hashes only when it must."""
    if path is None or known is None:
        return path is None and known is None, None
    size, tag = stat_of(path)
    if (size, tag) == _known(path, known):
        return True, None
    if size != known.size:
        return False, None
    fresh = _fresh(path, hashes.get(path) or hash_of(path))
    return fresh.sha256 == known.sha256, fresh


def sidecar_fp(v: Video) -> Fingerprint | None:
    """What stands for the video's sidecar in its record: the sidecar file's fingerprint, or an
    annotation entry's (a hash of its canonical JSON)."""
    return v.entry if v.entry is not None else fingerprint(v.sidecar_path)


def _same_sidecar(v: Video, known: Fingerprint | None, hashes: dict) -> tuple[bool, Fingerprint | None]:
    if v.entry is not None:
        return known is not None and known.sha256 == v.entry.sha256, None
    return _same(v.sidecar_path, known, hashes)


def prehash(videos: list[Video], ledger: Ledger, workers: int) -> dict[Path, str]:
    """sha256 of every touched file, in threads (hashlib releases the GIL): after a copy that lost
    mtimes, every file needs its hash and one core would be the bottleneck. A touched object (same size,
    other ETag) is streamed from the store once; an object with the same size and ETag is never read."""
    todo = []
    for v in videos:
        rec = ledger.records.get(v.source)
        if rec is not None and rec.video is not None:
            todo += [p for p, fp in ((v.path, rec.video), (v.sidecar_path, rec.sidecar)) if _needs_hash(p, fp)]
    todo = list(dict.fromkeys(todo))   # many annotation entries share one video: hash it once
    if not todo:
        return {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip(todo, pool.map(hash_of, todo)))


@dataclass
class RerunPlan:
    """What a run will do, by source path (the report's `plan`); `failed` are earlier failures that are tried again,
    `failed_unchanged` earlier failures that nothing gives a reason to retry (--retry-failed does)."""
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    # sidecar problems found now (no ffmpeg needed), whatever the video was before (new, or a sample that
    # now leaves the shards): listed here only, so every video is in exactly one list
    invalid: list[str] = field(default_factory=list)
    failed_unchanged: list[str] = field(default_factory=list)
    rebuild: bool = False
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        return {k: len(getattr(self, k)) for k in ("new", "changed", "deleted", "unchanged", "failed", "invalid",
                                                   "failed_unchanged")}

    def text(self) -> str:
        lines = [f"{k:>9}: {v}" for k, v in self.counts().items()]
        for k in ("new", "changed", "deleted", "failed", "invalid", "failed_unchanged"):
            lines += [f"  {k} {s}" for s in getattr(self, k)[:50]]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass
class Work:
    """What the run has to do, derived from the plan."""
    extract: list[Video] = field(default_factory=list)       # valid videos to run ffmpeg on, sorted
    invalid: list[Video] = field(default_factory=list)       # recorded as failed without ffmpeg
    remove: set[str] = field(default_factory=set)            # sources whose samples must leave the shards
    # video unchanged, only its sidecar changed: the sample is rebuilt from its old frames, no ffmpeg
    residecar: dict[str, tuple[Video, Fingerprint]] = field(default_factory=dict)
    # annotation entries new to an unchanged, extracted video: source -> (entry, source of a sample of
    # the same video whose frames it takes); packaged without ffmpeg
    from_frames: dict[str, tuple[Video, str]] = field(default_factory=dict)
    # touched but unchanged: source -> (video, sidecar) fingerprints with the new stat
    refreshed: dict[str, tuple[Fingerprint, Fingerprint | None]] = field(default_factory=dict)

    def apply_refreshed(self, ledger: Ledger) -> None:
        """Store new stats of touched files (the record itself may have moved shards meanwhile)."""
        for source, (video, sidecar) in self.refreshed.items():
            rec = ledger.records.get(source)
            if rec is not None and rec.video is not None:
                ledger.records[source] = replace(rec, video=video, sidecar=sidecar)


@dataclass
class RetryPolicy:
    """When an earlier failure is tried again; `ffmpeg_version` is called at most once, lazily."""
    settings_hash: str
    limits: dict                                  # {"timeout": s, "video_timeout": s} of this run
    ffmpeg_version: Callable[[], str | None] = lambda: None
    always: bool = False                          # --retry-failed
    _version: list = field(default_factory=list)

    def version(self) -> str | None:
        if not self._version:
            self._version.append(self.ffmpeg_version())
        return self._version[0]

    def retry(self, v: Video, rec: VideoRecord, work: Work, hashes: dict) -> bool:
        """Whether anything that decided the failure changed (records from before ffmpeg ran, e.g.
        sidecar problems or no ffmpeg at all, carry no ffmpeg version and are always retried)."""
        if self.always or rec.video is None or rec.ffmpeg_version is None:
            return True
        same_v, fresh_v = _same(v.path, rec.video, hashes)
        same_s, fresh_s = _same_sidecar(v, rec.sidecar, hashes) if same_v else (False, None)
        if not (same_v and same_s) or v.key != rec.key or rec.settings_hash != self.settings_hash:
            return True
        if rec.error["class"] in ("timeout", "video_timeout") and any(
                self.limits[k] > (rec.limits or {}).get(k, 0) for k in self.limits):
            return True
        if self.version() != rec.ffmpeg_version:
            return True
        if fresh_v or fresh_s:
            work.refreshed[v.source] = (fresh_v or rec.video, fresh_s or rec.sidecar)
        return False


def _classify(v: Video, rec: VideoRecord | None, rebuild: bool, work: Work, hashes: dict,
              policy: RetryPolicy) -> str:
    if rec is None:
        kind = "new"
    elif rec.status != STATUS_OK:
        if v.ok and not rebuild and not policy.retry(v, rec, work, hashes):
            return "failed_unchanged"
        kind = "failed"
    elif rebuild:
        kind = "changed"
    else:
        same_v, fresh_v = _same(v.path, rec.video, hashes)
        same_s, fresh_s = _same_sidecar(v, rec.sidecar, hashes) if same_v else (False, None)
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
              workers: int = 1, policy: RetryPolicy | None = None, settings: dict | None = None
              ) -> tuple[RerunPlan, Work]:
    """Compare the data folder with the ledger. Raises SettingsChanged unless `rebuild`, naming each
    setting that differs from the ledger's (`settings`: this run's, whose hash is `settings_hash`).

    Cost: O(videos + records) stats, plus hashes of touched files (in `workers` threads)."""
    policy = policy or RetryPolicy(settings_hash, {}, always=True)
    has_samples = bool(ledger.ok_records())
    if has_samples and ledger.settings_hash != settings_hash and not rebuild:
        raise SettingsChanged(settings_conflict(ledger.settings, settings or {}))
    rebuild = rebuild and has_samples
    plan, work = RerunPlan(rebuild=rebuild), Work()
    hashes = {} if rebuild else prehash(videos, ledger, workers)
    seen = set()
    for v in videos:
        seen.add(v.source)
        kind = _classify(v, ledger.records.get(v.source), rebuild, work, hashes, policy)
        getattr(plan, kind if v.ok else "invalid").append(v.source)  # each video in one list
    for source, rec in sorted(ledger.records.items()):
        if source not in seen:
            plan.deleted.append(source)
            if rec.status == STATUS_OK:
                work.remove.add(source)
    if not rebuild:
        _reuse_frames(ledger, work, hashes)
    return plan, work


def _video_of(source: str, video_id: str | None) -> str | None:
    """The video part of an annotation entry's identity `<video source>#<video_id>`."""
    tail = f"#{video_id}"
    return source[:-len(tail)] if video_id and source.endswith(tail) else None


def _reuse_frames(ledger: Ledger, work: Work, hashes: dict) -> None:
    """New annotation entries of a video that a sample already holds, unchanged: taken out of
    `work.extract`, packaged from that sample's frames (also when that sample itself is being edited
    or deleted in this run: its shard is read before the rewrite). Cost: O(records), only when there
    are entries to extract."""
    new = [v for v in work.extract if v.entry is not None]
    if not new:
        return
    wanted = {_video_of(v.source, v.video_id) for v in new}
    donors = {}
    for source, rec in ledger.records.items():
        video = _video_of(source, rec.video_id)
        if video in wanted and rec.status == STATUS_OK:
            donors.setdefault(video, (source, rec))
    taken = set()
    for v in new:
        donor = donors.get(_video_of(v.source, v.video_id))
        if donor is not None and donor[0] != v.source and _same(v.path, donor[1].video, hashes)[0]:
            work.from_frames[v.source] = (v, donor[0])
            taken.add(v.source)
    work.extract = [v for v in work.extract if v.source not in taken]
