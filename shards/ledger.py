"""ledger.json: vtt-prep's commit point, one atomic file per shards folder.

It records every video vtt-prep has seen (fingerprints of video and sidecar, the settings and ffmpeg
version that made its sample or its failure, status, error, shard), the list of live shards, and the
retired shards: replaced by a rewrite, compact or rebuild, no longer in index.json, but kept on disk
until a retention period has passed, because a trainer that read an older index.json may still open
them. index.json is derived from it (live shards; retired urls under "vtt" -> "retired", so readers
can tell them from leftovers without reading the ledger). Whatever is on disk but in neither list
(temp files, a shard renamed just before a crash) is a leftover and is removed by the next run; so an
atomic ledger write is the single moment a run's work becomes real. The trainer never reads the ledger.
Size: one record per video ever seen (~0.5 KB), one entry per shard; every commit rewrites it whole.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .format import LEDGER_FILE, ShardFormatError, atomic_write_bytes, shard_number
from .index import ShardEntry, ShardIndex, index_bytes

LEDGER_VERSION = 1
STATUS_OK = "ok"
STATUS_FAILED = "failed"


@dataclass(frozen=True)
class Fingerprint:
    """What a file looked like: stat for the fast path, sha256 to decide when stat changed."""
    size: int
    mtime_ns: int
    sha256: str

    @classmethod
    def from_json(cls, raw: dict | None) -> "Fingerprint | None":
        return None if raw is None else cls(int(raw["size"]), int(raw["mtime_ns"]), str(raw["sha256"]))


@dataclass(frozen=True)
class VideoRecord:
    source: str                      # path relative to the data folder, POSIX separators
    status: str                      # ok | failed
    video_id: str | None = None
    key: str | None = None
    video: Fingerprint | None = None
    sidecar: Fingerprint | None = None
    settings_hash: str | None = None
    ffmpeg_version: str | None = None
    shard: str | None = None         # set iff status == ok
    nframes: int = 0
    nbytes: int = 0                  # tar bytes of the sample (headers and padding included)
    error: dict | None = None        # {"class", "reason", "stderr_tail"} iff status == failed
    # failed records: the per-call and per-video timeouts the attempt had ({"timeout", "video_timeout"})
    limits: dict | None = None

    def __post_init__(self):
        if self.status not in (STATUS_OK, STATUS_FAILED):
            raise ShardFormatError(f"{self.source}: ledger status {self.status!r} is not ok/failed")
        if self.status == STATUS_OK and not (self.shard and self.key and self.video):
            raise ShardFormatError(f"{self.source}: ok ledger record without shard/key/fingerprint")
        if self.status == STATUS_FAILED and not self.error:
            raise ShardFormatError(f"{self.source}: failed ledger record without error")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "VideoRecord":
        raw = dict(raw)
        raw["video"] = Fingerprint.from_json(raw.get("video"))
        raw["sidecar"] = Fingerprint.from_json(raw.get("sidecar"))
        return cls(**raw)


@dataclass(frozen=True)
class RetiredShard:
    """A shard no longer in index.json, kept for readers of an older one; deleted after retention."""
    url: str
    nsamples: int
    filesize: int
    sha256: str
    retired_at: str                  # ISO 8601 UTC, e.g. 2026-12-02T17:30:00Z

    @classmethod
    def of(cls, entry: ShardEntry, retired_at: str) -> "RetiredShard":
        return cls(entry.url, entry.nsamples, entry.filesize, entry.sha256, retired_at)


@dataclass
class Ledger:
    settings: dict = field(default_factory=dict)
    settings_hash: str | None = None
    records: dict[str, VideoRecord] = field(default_factory=dict)   # by source
    shards: dict[str, ShardEntry] = field(default_factory=dict)     # by url
    retired: dict[str, RetiredShard] = field(default_factory=dict)  # by url
    # new shards are numbered at least this: a deleted retired shard's number is never used again
    # (a reader of a very old index must fail on it, not read other samples under the same name)
    shard_floor: int = 0

    def ok_records(self) -> list[VideoRecord]:
        return [r for r in self.records.values() if r.status == STATUS_OK]

    def next_shard_number(self) -> int:
        used = max((shard_number(u) for u in (*self.shards, *self.retired)), default=-1) + 1
        return max(used, self.shard_floor)

    def index(self) -> ShardIndex:
        entries = tuple(self.shards[u] for u in sorted(self.shards))
        return ShardIndex(shards=entries, settings=self.settings, retired=tuple(sorted(self.retired)))

    def to_json(self) -> dict:
        return {
            "ledger_version": LEDGER_VERSION,
            "settings": self.settings,
            "settings_hash": self.settings_hash,
            "shards": [asdict(self.shards[u]) for u in sorted(self.shards)],
            "retired": [asdict(self.retired[u]) for u in sorted(self.retired)],
            "shard_floor": self.shard_floor,
            "videos": [self.records[s].to_json() for s in sorted(self.records)],
        }

    def index_bytes(self) -> bytes:
        """index.json's bytes: the live shards, and the retired urls (only when there are any)."""
        return index_bytes(self.index())

    def check(self) -> None:
        """Every ok record points at a listed shard and every shard's count matches its records."""
        counts: dict[str, int] = {}
        for r in self.ok_records():
            if r.shard not in self.shards:
                raise ShardFormatError(f"{LEDGER_FILE}: {r.source} points at unlisted shard {r.shard}")
            counts[r.shard] = counts.get(r.shard, 0) + 1
        both = sorted(set(self.shards) & set(self.retired))
        if both:
            raise ShardFormatError(f"{LEDGER_FILE}: {both[0]} is listed as live and as retired")
        for u, e in self.shards.items():
            if counts.get(u, 0) != e.nsamples:
                raise ShardFormatError(f"{LEDGER_FILE}: {u} lists {e.nsamples} samples, "
                                       f"{counts.get(u, 0)} videos point at it")


def ledger_bytes(ledger: Ledger) -> bytes:
    return json.dumps(ledger.to_json(), indent=1, sort_keys=True).encode() + b"\n"


def write_ledger(folder: str | os.PathLike, ledger: Ledger) -> None:
    ledger.check()
    atomic_write_bytes(Path(folder) / LEDGER_FILE, ledger_bytes(ledger))


def read_ledger(folder: str | os.PathLike) -> Ledger | None:
    """The ledger of `folder`, or None when there is none yet; a damaged one is a clear error."""
    path = Path(folder) / LEDGER_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("ledger_version") != LEDGER_VERSION:
            raise ShardFormatError(f"ledger_version {raw.get('ledger_version')!r}, "
                                   f"this vtt reads {LEDGER_VERSION}")
        shards = [ShardEntry(**e) for e in raw["shards"]]
        retired = [RetiredShard(**e) for e in raw.get("retired", [])]
        records = [VideoRecord.from_json(v) for v in raw["videos"]]
        ledger = Ledger(settings=raw.get("settings") or {}, settings_hash=raw.get("settings_hash"),
                        records={r.source: r for r in records}, shards={e.url: e for e in shards},
                        retired={e.url: e for e in retired}, shard_floor=int(raw.get("shard_floor", 0)))
        ledger.check()
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ShardFormatError(f"{path}: unreadable ledger: {e}") from e
    return ledger
