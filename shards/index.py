"""index.json: the list of shards with sample counts, sizes and checksums.

It follows wids' `wids-shard-index-v1` (so `wids.ShardListDataset` can read the folder too) and
adds `sha256` per shard plus a `vtt` block with the format version and the prep settings.
The trainer takes its epoch size from here and never lists the folder itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .format import FORMAT_VERSION, INDEX_FILE, ShardFormatError, atomic_write_bytes, shard_number
from .storage import Store

WIDS_KIND = "wids-shard-index-v1"


class NoIndex(ShardFormatError):
    """Not a shards folder at all: the folder is missing, is a file, or holds no index.json (a usage error,
    unlike an index that is there but damaged)."""


@dataclass(frozen=True)
class ShardEntry:
    url: str  # file name relative to the shards folder
    nsamples: int
    filesize: int
    sha256: str

    def __post_init__(self):
        shard_number(self.url)  # validates the name
        if self.nsamples < 0 or self.filesize < 0:
            raise ShardFormatError(f"{self.url}: negative nsamples/filesize in index")


@dataclass(frozen=True)
class ShardIndex:
    shards: tuple[ShardEntry, ...] = ()
    settings: dict = field(default_factory=dict)  # the prep settings that made every sample
    # shards vtt-prep replaced but keeps on disk for its retention period (readers of an older index may
    # still read them); not part of this index's samples
    retired: tuple[str, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(s.nsamples for s in self.shards)

    def to_json(self) -> dict:
        return {
            "__kind__": WIDS_KIND,
            "wids_version": 1,
            "shardlist": [
                {"url": s.url, "nsamples": s.nsamples, "filesize": s.filesize, "sha256": s.sha256}
                for s in self.shards
            ],
            "vtt": {"format_version": FORMAT_VERSION, "settings": self.settings,
                    **({"retired": sorted(self.retired)} if self.retired else {})},
        }


def index_bytes(index: ShardIndex) -> bytes:
    return json.dumps(index.to_json(), indent=1, sort_keys=True).encode() + b"\n"


def write_index(folder: str | os.PathLike, index: ShardIndex) -> None:
    atomic_write_bytes(Path(folder) / INDEX_FILE, index_bytes(index))


def read_index(folder: str | os.PathLike, options: dict | None = None) -> ShardIndex:
    """Read and structurally validate `folder/index.json`; errors name the file and the problem."""
    return read_index_bytes(folder, options)[0]


def read_index_bytes(folder: str | os.PathLike, options: dict | None = None) -> tuple[ShardIndex, bytes]:
    """(index, the exact bytes it was parsed from): one read, so a digest of the bytes names this index
    even while vtt-prep replaces the file (it renames a new one into place, never edits it). `folder` may
    be a URL (shards/storage.py; `options` are its fsspec storage options): StorageError when it cannot be
    reached at all."""
    store = Store.of(folder, options)
    path = store.join(INDEX_FILE)
    if not store.remote and not Path(folder).is_dir():
        raise NoIndex(not_a_folder(folder))
    try:
        data = store.read_bytes(INDEX_FILE)
    except (FileNotFoundError, IsADirectoryError):
        raise NoIndex(f"{path}: no index (run `vtt-prep extract VIDEOS {folder}` first)") from None
    except OSError as e:
        raise ShardFormatError(f"{path}: unreadable index: {e}") from e
    return parse_index(data, path), data


def not_a_folder(folder: str | os.PathLike) -> str:
    """Why a local path that should be a shards folder is not one, in one line."""
    p = Path(folder)
    expected = "expected a folder written by vtt-prep extract: index.json + shard-*.tar"
    if not p.exists():
        return f"{folder}: shards folder does not exist ({expected})"
    what = "a shard tar" if p.suffix == ".tar" else "a file"
    hint = f"; give its folder, {p.parent}" if p.suffix == ".tar" and (p.parent / INDEX_FILE).is_file() else ""
    return f"{folder}: is {what}, not a shards folder ({expected}){hint}"


def parse_index(data: bytes, path: str | os.PathLike = INDEX_FILE) -> ShardIndex:
    """Validate index.json bytes (path only names the file in errors)."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{path}: unreadable index: {e}") from e
    if not isinstance(raw, dict) or raw.get("__kind__") != WIDS_KIND:
        kind = raw.get("__kind__") if isinstance(raw, dict) else None
        raise ShardFormatError(f"{path}: __kind__ is {kind!r}, expected {WIDS_KIND!r}")
    version = (raw.get("vtt") or {}).get("format_version")
    if version != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: shard format version {version!r}, this vtt reads {FORMAT_VERSION}")
    try:
        shards = tuple(ShardEntry(e["url"], int(e["nsamples"]), int(e["filesize"]), e["sha256"])
                       for e in raw["shardlist"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardFormatError(f"{path}: malformed shardlist entry: {e}") from e
    retired = raw["vtt"].get("retired") or []
    if not isinstance(retired, list) or not all(isinstance(u, str) for u in retired):
        raise ShardFormatError(f"{path}: vtt.retired must be a list of shard names")
    return ShardIndex(shards=shards, settings=raw["vtt"].get("settings", {}), retired=tuple(sorted(retired)))


def check_index(folder: str | os.PathLike, index: ShardIndex | None = None,
                checksums: bool = False, unlisted: bool = True, options: dict | None = None) -> list[str]:
    """Problems between the index and the tars in the folder (missing file, size, checksum); [] if none.

    unlisted: also report tars in the folder that the index lists neither as live nor as retired (vtt-prep
    verify). Readers pass
    False: vtt-prep writes new shards before its commit and keeps retired ones for a while.
    Cost: one stat per listed shard (a URL: one listing), + one folder listing with `unlisted`, + reading
    every byte with `checksums`."""
    store = Store.of(folder, options)
    index = index or read_index(folder, options)
    problems = []
    sizes = store.sizes([s.url for s in index.shards])

    def where(name: str) -> str:  # names as the caller gave the folder
        return store.join(name) if store.remote else str(Path(folder) / name)
    for s in index.shards:
        p, size = where(s.url), sizes[s.url]
        if size is None:
            problems.append(f"{p}: listed in {INDEX_FILE} but missing")
        elif size != s.filesize:
            problems.append(f"{p}: {size} bytes on disk, {s.filesize} in {INDEX_FILE}")
        elif checksums and store.sha256(s.url) != s.sha256:
            problems.append(f"{p}: sha256 differs from {INDEX_FILE}")
    listed = {s.url for s in index.shards} | set(index.retired)
    for name in [] if not unlisted else store.names("shard-*.tar"):
        if name not in listed:
            problems.append(f"{where(name)}: shard on disk but not in {INDEX_FILE}")
    return problems
