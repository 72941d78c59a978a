"""The ledger: vtt-prep's truth about a shards folder, kept as a commit log in `_ledger/`.

It records every video vtt-prep has seen (fingerprints of video and sidecar, the settings and ffmpeg
version that made its sample or its failure, status, error, shard), the live shards, and the retired
shards: replaced by a rewrite, compact or rebuild, no longer in index.json, but kept on disk until a
retention period has passed, because a trainer that read an older index.json may still open them.
index.json is derived from it (live shards; retired urls under "vtt" -> "retired"). The trainer never
reads the ledger.

Layout (Delta Lake's and Iceberg's idea, JSON instead of Parquet/Avro, see ARCHITECTURE.md):
  _ledger/00000000000000000042.json                  commit 42: only what it changed (records put or
                                                     dropped, shards added/dropped/retired, settings)
  _ledger/00000000000000000040.checkpoint.jsonl.gz   the whole state after commit 40 (header line, then
                                                     one record per line, sorted by source)
State = newest checkpoint + the commits after it, in order. A commit is created with create-if-absent
(vtt.shards.store), which is THE commit point, on local disk and on object storage: kill -9 leaves
the old state (no file) or the new one (the whole file). Whatever is on disk but in no list (temp
files, a shard renamed just before a crash) is a leftover the next run removes. A checkpoint is
written once the commits after the previous one hold half as many records as the state (so reading
costs at most ~1.5x the checkpoint and writing checkpoints costs O(1) per changed record, amortised),
or after CHECKPOINT_MAX_COMMITS commits; files older than the newest checkpoint are then pruned.
A folder with the old single-file `ledger.json` (rewritten whole at every commit) is read as is and
upgraded by the first run that commits: it becomes checkpoint 0, and ledger.json is removed after.
Cost: a commit is O(records it changed) + O(shards) for checks; reading is O(records).
"""
from __future__ import annotations

import gc
import gzip
import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from .folder import OutFolder
from .format import LEDGER_FILE, ShardFormatError, shard_number
from .index import ShardEntry, ShardIndex, index_bytes
from .storage import is_url
from .store import LEDGER_DIR, LedgerStore, store_for

LEDGER_VERSION = 1       # the legacy single-file ledger.json (still read, and what ledger_bytes renders)
LOG_VERSION = 2          # commit and checkpoint files
STATUS_OK = "ok"
STATUS_FAILED = "failed"
COMMIT_SUFFIX = ".json"
CHECKPOINT_SUFFIX = ".checkpoint.jsonl.gz"
CHECKPOINT_MIN_RECORDS = 1000     # below this a checkpoint is cheap anyway: don't count, just bound files
CHECKPOINT_MAX_COMMITS = 200      # bounds the number of files a reader opens (a GET each on S3)
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a file looked like: stat for the fast path, sha256 to decide when stat changed.

    A local file's fast path is (size, mtime_ns); an object's in a URL data folder is (size, etag) from the
    listing, with mtime_ns 0 (an object store's ETag changes with the content, its time with every upload).
    `etag` is written to JSON only when set, so local records keep their bytes and older ledgers read."""
    size: int
    mtime_ns: int
    sha256: str
    etag: str | None = None

    @classmethod
    def from_json(cls, raw: dict | None) -> "Fingerprint | None":
        return _fingerprint(raw)

    def to_json(self) -> dict:
        d = {"size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256}
        if self.etag is not None:
            d["etag"] = self.etag
        return d


def _fingerprint(raw: dict | None) -> Fingerprint | None:
    if raw is None:
        return None
    etag = raw.get("etag")
    return Fingerprint(int(raw["size"]), int(raw["mtime_ns"]), str(raw["sha256"]), None if etag is None else str(etag))


@dataclass(frozen=True, slots=True)
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
        d = {f: getattr(self, f) for f in _RECORD_FIELDS}
        d["video"] = None if self.video is None else self.video.to_json()
        d["sidecar"] = None if self.sidecar is None else self.sidecar.to_json()
        return d

    @classmethod
    def from_json(cls, raw: dict) -> "VideoRecord":
        """Cost: ~3 us; a 1M-video ledger builds a million of these when it is opened."""
        unknown = raw.keys() - _FIELD_SET
        if unknown:
            raise ShardFormatError(f"{raw.get('source')}: unknown ledger record fields {sorted(unknown)}")
        g, v, s = raw.get, raw.get("video"), raw.get("sidecar")
        # the same few values in a million records: keep one copy of each
        ffv, sh, shard = g("ffmpeg_version"), g("settings_hash"), g("shard")
        return cls(raw["source"], _intern(raw["status"]), g("video_id"), g("key"),
                   _fingerprint(v), _fingerprint(s),
                   sh if sh is None else _intern(sh), ffv if ffv is None else _intern(ffv),
                   shard if shard is None else _intern(shard), g("nframes", 0), g("nbytes", 0), g("error"),
                   g("limits"))


_RECORD_FIELDS = tuple(VideoRecord.__dataclass_fields__)
_FIELD_SET = frozenset(_RECORD_FIELDS)
_intern = sys.intern


@dataclass(frozen=True, slots=True)
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


class _Tracked(dict):
    """A dict that remembers the first value of every key changed since the last commit, so a commit
    writes only what really changed. `on_change(old, new)` keeps derived counts current."""

    def __init__(self, data=(), on_change=None):
        super().__init__(data)
        self.before: dict = {}
        self.on_change = on_change

    def __setitem__(self, k, v):
        old = self.get(k, _MISSING)
        self.before.setdefault(k, old)
        if self.on_change:
            self.on_change(old, v)
        super().__setitem__(k, v)

    def __delitem__(self, k):
        old = self[k]
        self.before.setdefault(k, old)
        if self.on_change:
            self.on_change(old, _MISSING)
        super().__delitem__(k)

    def pop(self, k, *default):
        if k in self:
            v = self[k]
            del self[k]
            return v
        if default:
            return default[0]
        raise KeyError(k)

    def update(self, other=(), **kw):
        for k, v in dict(other, **kw).items():
            self[k] = v

    def setdefault(self, k, v=None):
        if k not in self:
            self[k] = v
        return self[k]

    def popitem(self):
        raise TypeError("a ledger table does not support popitem")

    def clear(self):
        for k in list(self):
            del self[k]

    def changed(self) -> tuple[list, list]:
        """(keys put, keys dropped) since the last commit, sorted; a key set back to its value is neither."""
        put, drop = [], []
        for k, old in self.before.items():
            now = self.get(k, _MISSING)
            if now is _MISSING:
                if old is not _MISSING:
                    drop.append(k)
            elif old is _MISSING or old != now:
                put.append(k)
        return sorted(put), sorted(drop)

    def set_quiet(self, k, v):
        """Apply a committed change (reading the log): counted, not tracked."""
        if self.on_change:
            self.on_change(self.get(k, _MISSING), v)
        super().__setitem__(k, v)

    def del_quiet(self, k):
        if k in self:
            if self.on_change:
                self.on_change(self[k], _MISSING)
            super().__delitem__(k)


class Ledger:
    """The state: records by source, live shards and retired shards by url, settings, shard floor.

    Mutate the three tables like dicts; write_ledger then commits exactly what changed."""

    def __init__(self, settings: dict | None = None, settings_hash: str | None = None,
                 records: dict | None = None, shards: dict | None = None, retired: dict | None = None,
                 shard_floor: int = 0):
        self.counts: dict[str, int] = {}        # shard url -> ok records pointing at it
        self._records = _Tracked((), self._count)
        for k, v in (records or {}).items():
            self._records.set_quiet(k, v)
        self._shards = _Tracked(shards or {})
        self._retired = _Tracked(retired or {})
        self.settings, self.settings_hash = settings or {}, settings_hash
        # new shards are numbered at least this: a deleted retired shard's number is never used again
        # (a reader of a very old index must fail on it, not read other samples under the same name)
        self.shard_floor = shard_floor
        self.version = -1          # the last commit this state includes (-1: nothing committed yet)
        self.legacy = False        # read from ledger.json, not upgraded to the log yet
        self.checkpoint = -1       # number of the newest checkpoint
        self.log_records = 0       # records changed in the commits after that checkpoint
        self.log_commits = 0
        self._head = self._head_now()

    def _count(self, old, new) -> None:
        if old is not _MISSING and old.status == STATUS_OK:
            self.counts[old.shard] -= 1
        if new is not _MISSING and new.status == STATUS_OK:
            self.counts[new.shard] = self.counts.get(new.shard, 0) + 1

    def _head_now(self) -> dict:
        return {"settings": self.settings, "settings_hash": self.settings_hash, "shard_floor": self.shard_floor}

    @staticmethod
    def _assign(table: _Tracked, new: dict) -> None:
        for k in [k for k in table if k not in new]:
            del table[k]
        for k, v in new.items():
            if table.get(k, _MISSING) != v:
                table[k] = v

    records = property(lambda self: self._records, lambda self, new: self._assign(self._records, new))
    shards = property(lambda self: self._shards, lambda self, new: self._assign(self._shards, new))
    retired = property(lambda self: self._retired, lambda self, new: self._assign(self._retired, new))

    def ok_records(self) -> list[VideoRecord]:
        """Cost: O(records); for once-per-run work (plan, rewrite), not per commit."""
        return [r for r in self._records.values() if r.status == STATUS_OK]

    def next_shard_number(self) -> int:
        used = max((shard_number(u) for u in (*self._shards, *self._retired)), default=-1) + 1
        return max(used, self.shard_floor)

    def index(self) -> ShardIndex:
        entries = tuple(self._shards[u] for u in sorted(self._shards))
        return ShardIndex(shards=entries, settings=self.settings, retired=tuple(sorted(self._retired)))

    def index_bytes(self) -> bytes:
        """index.json's bytes: the live shards, and the retired urls (only when there are any)."""
        return index_bytes(self.index())

    def head_json(self) -> dict:
        return {**self._head_now(), "shards": [asdict(self._shards[u]) for u in sorted(self._shards)],
                "retired": [asdict(self._retired[u]) for u in sorted(self._retired)]}

    def to_json(self) -> dict:
        """The whole state in the legacy ledger.json layout (version 1). Cost: O(records)."""
        return {"ledger_version": LEDGER_VERSION, **self.head_json(),
                "videos": [self._records[s].to_json() for s in sorted(self._records)]}

    def check(self) -> None:
        """Every ok record points at a listed shard and every shard's count matches. Cost: O(records)."""
        self._check_shards(self._shards, set(self.counts) | set(self._shards), set(self._retired))

    def _check_shards(self, live: dict, urls: Iterable[str], retired: set[str]) -> None:
        for u in sorted(urls):
            n = self.counts.get(u, 0)
            if u not in live and n:
                raise ShardFormatError(f"ledger: {n} videos point at unlisted shard {u}")
            if u in live and live[u].nsamples != n:
                raise ShardFormatError(f"ledger: {u} lists {live[u].nsamples} samples, {n} videos point at it")
            if u in live and u in retired:
                raise ShardFormatError(f"ledger: {u} is listed as live and as retired")

    def delta(self) -> dict | None:
        """What changed since the last commit (None: nothing), as a commit file's content, after checking
        the shards it touches. Cost: O(changed records + changed shards)."""
        rec_put, rec_drop = self._records.changed()
        sh_put, sh_drop = self._shards.changed()
        rt_put, rt_drop = self._retired.changed()
        head = self._head_now()
        if not (rec_put or rec_drop or sh_put or sh_drop or rt_put or rt_drop) and head == self._head:
            return None
        touched = set(sh_put) | set(sh_drop) | set(rt_put)
        for k in (*rec_put, *rec_drop):
            for r in (self._records.before[k], self._records.get(k, _MISSING)):
                if r is not _MISSING and r.status == STATUS_OK:
                    touched.add(r.shard)
        self._check_shards(self._shards, touched, set(self._retired))
        return {"log_version": LOG_VERSION, "commit": self.version + 1, **head,
                "records_put": [self._records[k].to_json() for k in rec_put], "records_drop": rec_drop,
                "shards_put": [asdict(self._shards[u]) for u in sh_put], "shards_drop": sh_drop,
                "retired_put": [asdict(self._retired[u]) for u in rt_put], "retired_drop": rt_drop}

    def mark_committed(self, version: int, changed: int) -> None:
        for t in (self._records, self._shards, self._retired):
            t.before = {}
        self._head = self._head_now()
        self.version = version
        self.log_records += changed
        self.log_commits += 1

    def apply(self, delta: dict) -> None:
        """Replay one commit file (reading the log). Cost: O(its records)."""
        self.settings, self.settings_hash = delta["settings"], delta["settings_hash"]
        self.shard_floor = int(delta["shard_floor"])
        for s in delta["records_drop"]:
            self._records.del_quiet(s)
        for raw in delta["records_put"]:
            r = VideoRecord.from_json(raw)
            self._records.set_quiet(r.source, r)
        for table, put, drop, cls in ((self._shards, "shards_put", "shards_drop", ShardEntry),
                                      (self._retired, "retired_put", "retired_drop", RetiredShard)):
            for u in delta[drop]:
                table.del_quiet(u)
            for raw in delta[put]:
                table.set_quiet(raw["url"], cls(**raw))
        self.version = int(delta["commit"])
        self._head = self._head_now()
        self.log_records += len(delta["records_put"]) + len(delta["records_drop"])
        self.log_commits += 1

    def wants_checkpoint(self) -> bool:
        big = self.log_records >= max(CHECKPOINT_MIN_RECORDS, len(self._records) // 2)
        return big or self.log_commits >= CHECKPOINT_MAX_COMMITS


def ledger_bytes(ledger: Ledger) -> bytes:
    """The whole state, canonical (the legacy ledger.json layout): what two runs must agree on byte
    for byte, whatever their commit history. Cost: O(records)."""
    return json.dumps(ledger.to_json(), indent=1, sort_keys=True).encode() + b"\n"


def commit_name(n: int) -> str:
    return f"{n:020d}{COMMIT_SUFFIX}"


def checkpoint_name(n: int) -> str:
    return f"{n:020d}{CHECKPOINT_SUFFIX}"


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def checkpoint_bytes(ledger: Ledger) -> bytes:
    """gzip JSONL: the header (settings, shards, retired), then one record per line, sorted by source.
    Deterministic (gzip mtime 0, no file name). Cost: O(records), streamed through the compressor."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=buf, mode="wb", compresslevel=1, mtime=0) as z:
        z.write(_dumps({"log_version": LOG_VERSION, "commit": ledger.version, **ledger.head_json()}) + b"\n")
        chunk = []
        for s in sorted(ledger.records):
            chunk.append(_dumps(ledger.records[s].to_json()))
            if len(chunk) >= 4096:
                z.write(b"\n".join(chunk) + b"\n")
                chunk = []
        if chunk:
            z.write(b"\n".join(chunk) + b"\n")
    return buf.getvalue()


def _read_checkpoint(store: LedgerStore, name: str) -> Ledger:
    with store.open(name) as f, gzip.GzipFile(fileobj=f, mode="rb") as z:
        head = json.loads(z.readline())
        _check_version(head, name)
        ledger = Ledger(settings=head["settings"], settings_hash=head["settings_hash"],
                        shards={e["url"]: ShardEntry(**e) for e in head["shards"]},
                        retired={e["url"]: RetiredShard(**e) for e in head["retired"]},
                        shard_floor=int(head["shard_floor"]))
        while True:  # one json.loads per ~16 MB of lines, not per line (its per-call cost dominates)
            chunk = z.readlines(1 << 24)
            if not chunk:
                break
            for raw in json.loads(b"[" + b",".join(chunk) + b"]"):
                r = VideoRecord.from_json(raw)
                ledger.records.set_quiet(r.source, r)
    ledger.version = ledger.checkpoint = int(head["commit"])
    ledger._head = ledger._head_now()
    return ledger


def _check_version(raw: dict, name: str) -> None:
    if raw.get("log_version") != LOG_VERSION:
        raise ShardFormatError(f"{name}: ledger log_version {raw.get('log_version')!r}, this vtt reads {LOG_VERSION}")


def _numbers(names: list[str], suffix: str) -> list[int]:
    return sorted(int(n[:20]) for n in names if n.endswith(suffix) and n[:20].isdigit() and len(n) == 20 + len(suffix))


def _read_log(store: LedgerStore, names: list[str]) -> Ledger:
    checkpoints = _numbers(names, CHECKPOINT_SUFFIX)
    base = checkpoints[-1] if checkpoints else -1
    ledger = _read_checkpoint(store, checkpoint_name(base)) if checkpoints else Ledger()
    for n in (n for n in _numbers(names, COMMIT_SUFFIX) if n > base):
        if n != ledger.version + 1:
            raise ShardFormatError(f"{LEDGER_DIR}/{commit_name(ledger.version + 1)} is missing "
                                   f"(the log jumps to {commit_name(n)}): the ledger is damaged")
        with store.open(commit_name(n)) as f:
            delta = json.loads(f.read())
        _check_version(delta, commit_name(n))
        ledger.apply(delta)
    ledger.log_commits = ledger.version - base
    ledger.check()
    return ledger


def _store(folder, store: LedgerStore | None) -> LedgerStore:
    """The ledger store of `folder`: a path, a URL, or a shards/folder.py OutFolder (with its options)."""
    if store is not None:
        return store
    return folder.ledger_store() if isinstance(folder, OutFolder) else store_for(folder)


def _legacy_file(folder) -> Path | None:
    """Where a pre-log ledger.json would be: local folders only (object storage never had one)."""
    root = folder.root if isinstance(folder, OutFolder) else str(folder)
    return None if is_url(root) else Path(root) / LEDGER_FILE


def has_ledger(folder) -> bool:
    """Whether `folder` (a path, URL or OutFolder) has a ledger. Cost: one listing of the log."""
    legacy = _legacy_file(folder)
    return bool(_store(folder, None).names()) or (legacy is not None and legacy.is_file())


def read_ledger(folder: str | os.PathLike, store: LedgerStore | None = None) -> Ledger | None:
    """The ledger of `folder` (its log, else a legacy ledger.json), or None when there is none yet;
    a damaged one is a clear error naming the file. Cost: O(records) (checkpoint + later commits)."""
    store = _store(folder, store)
    for attempt in range(3):
        names = store.names()
        if not names:
            legacy = _legacy_file(folder)
            return None if legacy is None else _read_legacy(legacy)
        was_enabled = gc.isenabled()
        gc.disable()  # a million small objects that live on: the cyclic collector would rescan them
        try:
            return _read_log(store, names)
        except FileNotFoundError:  # a writer pruned files after a new checkpoint: list again
            if attempt == 2:
                raise
        except (OSError, EOFError, json.JSONDecodeError, KeyError, TypeError, ValueError, StopIteration) as e:
            raise ShardFormatError(f"{getattr(store, 'root', folder)}: unreadable ledger: {e}") from e
        finally:
            if was_enabled:
                gc.enable()


def _read_legacy(path: Path) -> Ledger | None:
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("ledger_version") != LEDGER_VERSION:
            raise ShardFormatError(f"ledger_version {raw.get('ledger_version')!r}, "
                                   f"this vtt reads {LEDGER_VERSION}")
        records = [VideoRecord.from_json(v) for v in raw["videos"]]
        ledger = Ledger(settings=raw.get("settings") or {}, settings_hash=raw.get("settings_hash"),
                        records={r.source: r for r in records},
                        shards={e["url"]: ShardEntry(**e) for e in raw["shards"]},
                        retired={e["url"]: RetiredShard(**e) for e in raw.get("retired", [])},
                        shard_floor=int(raw.get("shard_floor", 0)))
        ledger.check()
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ShardFormatError(f"{path}: unreadable ledger: {e}") from e
    ledger.legacy = True
    return ledger


def write_ledger(folder: str | os.PathLike, ledger: Ledger, store: LedgerStore | None = None) -> bool:
    """Commit what changed since the last commit: one new commit file holding only that, created
    with create-if-absent (the commit point). Returns False when nothing changed (nothing written).
    A legacy ledger is upgraded first: its whole state becomes checkpoint 0 (the commit point), then
    ledger.json is removed. Raises CommitConflict when another writer took the number.
    Cost: O(changed records + shards), plus an O(records) checkpoint every so often (amortised O(1)
    per changed record)."""
    store = _store(folder, store)
    if ledger.legacy:
        return _upgrade(folder, ledger, store)
    delta = ledger.delta()
    if delta is None:
        return False
    store.put_if_absent(commit_name(delta["commit"]), _dumps(delta) + b"\n")
    ledger.mark_committed(delta["commit"], len(delta["records_put"]) + len(delta["records_drop"]))
    if ledger.wants_checkpoint():
        write_checkpoint(ledger, store)
    return True


def _upgrade(folder, ledger: Ledger, store: LedgerStore) -> bool:
    ledger.check()
    ledger.version = 0
    store.put_if_absent(checkpoint_name(0), checkpoint_bytes(ledger))
    ledger.legacy = False
    ledger.mark_committed(0, 0)
    ledger.checkpoint, ledger.log_records, ledger.log_commits = 0, 0, 0
    _legacy_file(folder).unlink(missing_ok=True)  # legacy ledgers are local only
    return True


def write_checkpoint(ledger: Ledger, store: LedgerStore) -> None:
    """Snapshot the committed state as checkpoint `ledger.version` and prune the files it makes
    redundant. Not a commit point: the log already holds this state; a crash leaves extra files."""
    if ledger.checkpoint == ledger.version:
        return
    store.put_if_absent(checkpoint_name(ledger.version), checkpoint_bytes(ledger))
    ledger.checkpoint, ledger.log_records, ledger.log_commits = ledger.version, 0, 0
    prune(store, ledger.version)


def prune(store: LedgerStore, checkpoint: int) -> list[str]:
    """Delete commits and checkpoints older than checkpoint `checkpoint`: the state no longer needs them."""
    old = [n for n in store.names() if n[:20].isdigit() and int(n[:20]) <= checkpoint
           and n != checkpoint_name(checkpoint)]
    for n in old:
        store.delete(n)
    return old


def clean_log(folder: str | os.PathLike, ledger: Ledger, store: LedgerStore | None = None) -> list[str]:
    """Remove what interrupted writes left in the ledger's files: temp files, files a checkpoint made
    redundant, a ledger.json already upgraded. Needs the writer's lock. Returns notes."""
    store = _store(folder, store)
    notes = [f"removed temp file {LEDGER_DIR}/{n} (an interrupted run's)" for n in store.remove_temp()]
    if ledger.legacy:
        return notes
    notes += [f"removed {LEDGER_DIR}/{n} (older than the newest checkpoint)" for n in
              (prune(store, ledger.checkpoint) if ledger.checkpoint >= 0 else [])]
    stray = [n for n in store.names() if not (n[:20].isdigit() and int(n[:20]) <= ledger.version)]
    for n in stray:  # not part of the log that was read (a damaged name, or a checkpoint past the log)
        store.delete(n)
        notes.append(f"removed {LEDGER_DIR}/{n}: not part of the ledger's log")
    legacy = _legacy_file(folder)
    if legacy is not None and legacy.is_file():
        legacy.unlink()
        notes.append(f"removed {LEDGER_FILE}: already upgraded to {LEDGER_DIR}/")
    return notes
