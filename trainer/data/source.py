"""Which shards a reader reads: index snapshots, pinned once per process, and the split of one snapshot.

A Snapshot is the shard list of one index.json as read at one moment (url, nsamples, filesize, sha256 of
every shard, and the sha256 of the index bytes as its name). The trainer pins one per shards folder when it
starts (`pin`), all ranks adopt rank 0's (`agree`), and every loader of the run - training, every eval,
a resume - reads that snapshot, never index.json again. vtt-prep may meanwhile commit, rewrite or compact
the folder: it writes new shards under new names and keeps retired ones on disk for a retention period, so
a pinned shard stays readable; unlisted tars on disk are none of the reader's business. A pinned shard
that is gone or has another size is an error naming it (SnapshotError), never a skip.

Costs: pinning reads index.json once and stats every listed shard (O(shards)); with
verify_checksums it reads every byte once per process. A loader build on a pinned snapshot stats its
shards again (O(shards), no reads) so a deleted shard fails before training. eval_fraction needs the
keys of every shard: their member headers are read once per process and shard (cached by path, size
and mtime; a resume takes the counts from the checkpoint).
"""
from __future__ import annotations

import hashlib
import logging
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache

from vtt.shards.format import INDEX_FILE, ShardFormatError, split_member
from vtt.shards.index import ShardEntry, check_index, read_index_bytes
from vtt.shards.storage import Store

log = logging.getLogger(__name__)
PIN_RETRIES = 3  # index.json re-read when vtt-prep committed between reading it and statting its shards
RESTART_HINT = ("to drop the rest of the saved epoch and go on with the next epoch on the current "
                "index.json, resume with --data-resume next_epoch (data.resume=next_epoch)")


class SnapshotError(ShardFormatError):
    """A shard of the pinned snapshot is gone or changed on disk (vtt-prep retired it and its retention
    period passed, or someone edited the folder). Not a corrupt sample: never skipped."""


class DataResumeError(ShardFormatError):
    """A saved data position that cannot continue exactly on what is on disk now."""


@dataclass(frozen=True)
class Snapshot:
    folder: str  # resolved path or URL (Store.root)
    digest: str  # sha256 of the index.json bytes
    shards: tuple[ShardEntry, ...]
    # fsspec storage options of a URL folder (may hold credentials: never saved with a checkpoint)
    options: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def store(self) -> Store:
        return Store(self.folder, self.options)

    @property
    def num_samples(self) -> int:
        return sum(s.nsamples for s in self.shards)

    def to_dict(self) -> dict:
        return {"folder": self.folder, "digest": self.digest,
                "shards": [[s.url, s.nsamples, s.filesize, s.sha256] for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict, options: dict | None = None) -> Snapshot:
        return cls(d["folder"], d["digest"], tuple(ShardEntry(u, int(n), int(b), h) for u, n, b, h in d["shards"]),
                   dict(options or {}))

    def problems(self) -> list[str]:
        """Shards of this snapshot that are not on disk as listed (one stat each; a URL: one listing)."""
        store = self.store
        sizes = store.sizes([s.url for s in self.shards])
        out = []
        for s in self.shards:
            p, size = store.join(s.url), sizes[s.url]
            if size is None:
                out.append(f"{p}: gone")
            elif size != s.filesize:
                out.append(f"{p}: {size} bytes on disk, {s.filesize} when pinned")
        return out


def read_snapshot(folder: str, verify_checksums: bool = False, options: dict | None = None) -> Snapshot:
    """index.json as a Snapshot, checked against the tars (listed ones only); re-read when vtt-prep
    committed in between, so a commit never fails a start. `folder` may be a URL (options: fsspec's)."""
    for attempt in range(PIN_RETRIES):
        index, data = read_index_bytes(folder, options)
        snap = Snapshot(Store.of(folder).root, hashlib.sha256(data).hexdigest(), index.shards, dict(options or {}))
        problems = check_index(folder, index, checksums=False, unlisted=False, options=options)
        if not problems:
            break
        _, again = read_index_bytes(folder, options)
        if again == data or attempt == PIN_RETRIES - 1:
            raise ShardFormatError(f"{folder}: {INDEX_FILE} disagrees with the tars on disk (rerun vtt-prep "
                                   "extract or vtt-prep verify):\n  " + "\n  ".join(problems))
    if not snap.shards or snap.num_samples == 0:
        raise ShardFormatError(f"{folder}: {INDEX_FILE} lists no samples")
    if verify_checksums:
        _verify(snap, index)
    return snap


_VERIFIED: set[tuple] = set()


def _verify(snap: Snapshot, index) -> None:
    # sha256 of every tar is slow: once per process and snapshot
    if (snap.folder, snap.digest) in _VERIFIED:
        return
    problems = check_index(snap.folder, index, checksums=True, unlisted=False, options=snap.options)
    if problems:
        raise ShardFormatError(f"{snap.folder}: {INDEX_FILE} disagrees with the tars on disk (rerun vtt-prep "
                               "extract or vtt-prep verify):\n  " + "\n  ".join(problems))
    _VERIFIED.add((snap.folder, snap.digest))


# ---------------------------------------------------------------- pinning

_PINNED: dict[str, Snapshot] = {}


def _key(folder: str) -> str:
    return Store.of(folder).root


def pin(folders: list[str], verify_checksums: bool = False, options: dict | None = None) -> dict[str, Snapshot]:
    """Read each folder's index once; every later `snapshot(folder)` in this process returns it."""
    for folder in dict.fromkeys(folders):
        _PINNED[_key(folder)] = read_snapshot(folder, verify_checksums, options)
    return {f: _PINNED[_key(f)] for f in folders}


def unpin() -> None:
    _PINNED.clear()


def snapshot(folder: str, verify_checksums: bool = False, options: dict | None = None) -> Snapshot:
    """The pinned snapshot of folder (its shards must still be on disk), or a fresh read if none is pinned."""
    snap = _PINNED.get(_key(folder))
    if snap is None:
        return read_snapshot(folder, verify_checksums, options)
    problems = snap.problems()
    if problems:
        raise SnapshotError(f"{folder}: shards of the index this run pinned at its start (sha256 "
                            f"{snap.digest[:12]}) are no longer on disk as they were:\n  " + "\n  ".join(problems)
                            + "\nvtt-prep deletes retired shards after its retention period; restart the run "
                            "(--resume continues from the last checkpoint; " + RESTART_HINT + ")")
    return snap


def agree(folders: list[str]) -> bool:
    """Collective when torch.distributed is up (every rank calls it): every rank takes rank 0's pinned
    snapshots. True on a rank whose own differed (vtt-prep committed while the ranks started)."""
    # heavy: torch; this module loads without it
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    keys = [_key(f) for f in dict.fromkeys(folders)]
    mine = [_PINNED[k].to_dict() for k in keys]
    box = [mine]
    dist.broadcast_object_list(box, src=0)
    changed = False
    for k, theirs in zip(keys, box[0]):
        if theirs["digest"] != _PINNED[k].digest:
            log.warning("%s: index.json changed while the ranks started; using rank 0's (sha256 %s)",
                        k, theirs["digest"][:12])
            _PINNED[k] = Snapshot.from_dict(theirs, _PINNED[k].options)
            changed = True
    return changed


# ---------------------------------------------------------------- one split of one snapshot

def in_eval_slice(key: str, fraction: float) -> bool:
    """Deterministic held-out slice: same answer in every process and run (no Python hash())."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0 ** 64


@lru_cache(maxsize=4096)
def _scan_keys(store: Store, name: str, size: int, tag) -> tuple[str, ...]:
    """Sample keys of one tar from its member headers only (no member data is read; remotely the headers
    come in READ_BLOCK ranged reads). Cached by (folder, name, size, mtime or ETag)."""
    keys: list[str] = []
    path = store.join(name)
    try:
        with store.open(name, size) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                parts = split_member(member.name)
                if member.isreg() and parts and (not keys or keys[-1] != parts[0]):
                    keys.append(parts[0])
    except (OSError, tarfile.TarError) as e:
        raise ShardFormatError(f"{path}: unreadable tar: {e}") from e
    return tuple(keys)


@dataclass(frozen=True)
class Source:
    """The shards of one split of one snapshot: paths, sizes, per-shard sample counts, the key filter."""
    snap: Snapshot
    counts: tuple[int, ...]
    fraction: float  # eval_fraction slice; 0 = keep every key
    want_eval: bool

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def store(self) -> Store:
        return self.snap.store

    def name(self, j: int) -> str:
        return self.snap.shards[j].url

    def path(self, j: int) -> str:
        return self.snap.store.join(self.snap.shards[j].url)

    def size(self, j: int) -> int:
        return self.snap.shards[j].filesize

    def keep(self, key: str) -> bool:
        return self.fraction <= 0 or in_eval_slice(key, self.fraction) == self.want_eval


def split_source(snap: Snapshot, fraction: float, want_eval: bool, counts: tuple[int, ...] | None = None) -> Source:
    """The split's Source; `counts` (saved with a checkpoint) spares the header scan eval_fraction needs."""
    if counts is None:
        if fraction <= 0:
            counts = tuple(s.nsamples for s in snap.shards)
        else:
            counts = tuple(sum(in_eval_slice(k, fraction) == want_eval for k in _keys(snap, j))
                           for j in range(len(snap.shards)))
    if len(counts) != len(snap.shards):
        raise ShardFormatError(f"{snap.folder}: {len(counts)} shard counts for {len(snap.shards)} shards")
    return Source(snap, tuple(counts), fraction, want_eval)


def _keys(snap: Snapshot, j: int) -> tuple[str, ...]:
    store, name = snap.store, snap.shards[j].url
    try:
        size, tag = store.stat(name)
    except OSError as e:
        raise SnapshotError(f"{store.join(name)}: shard of the pinned index is gone: {e}") from e
    return _scan_keys(store, name, size, tag)
