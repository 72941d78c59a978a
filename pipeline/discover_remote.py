"""Videos and sidecars in a URL data folder (s3://bucket/videos, any fsspec scheme): the same rules as
discover.py (extensions, dot-files, sidecar next to its video, ids and keys), from one recursive listing.

An object is a `RemoteFile`: its URL with the listing's size and ETag, which are its fingerprint's fast
path (an unchanged object costs no GET and no hash on a rerun). Sidecars are small and are read here (one
GET each), except those whose size and ETag equal their ledger record's: their meta is an `UnreadSidecar`
(the record's video_id only), read later by `read_sidecars` only for the videos that get extracted again.
Videos are downloaded by the worker that extracts them (task.py), never here.
Cost: one listing (one request per ~1000 objects), one GET per new or changed sidecar (a no-op rerun of a
million clips makes no GET at all).
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Mapping

from vtt.shards.storage import StorageError, Store, _problem, _tag, op_timeout, retry

from .sidecar import VIDEO_EXTS, missing_sidecar, parse_sidecar


@dataclass(frozen=True)
class RemoteFile:
    """One object of a URL data folder as the listing saw it. Picklable: it travels to the worker with the
    storage options (kept out of equality and repr: they may hold credentials)."""
    url: str
    size: int
    etag: str | None
    sha256: str | None = field(default=None, compare=False)   # sidecars: hashed from the bytes read here
    options: dict = field(default_factory=dict, compare=False, repr=False)

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def store(self) -> tuple[Store, str]:
        parent, _, name = self.url.rpartition("/")
        return Store.of(parent, self.options), name


def check_data_url(url: str, options: dict) -> None:
    """StorageError (one line naming the URL) unless the folder can be listed: scheme installed, endpoint
    reachable, credentials accepted, bucket there, something under the prefix. Cost: two requests."""
    store = Store.of(url, options)
    fs = store.fs()
    try:
        fs.invalidate_cache(store.root)
        fs.ls(store.root)  # exists() would answer False for a dead endpoint; ls raises what went wrong
        return
    except FileNotFoundError:
        pass
    except Exception as e:
        raise StorageError(f"{store.root}: {_problem(e)}") from e
    store._check_bucket(fs)
    raise StorageError(f"{store.root}: no such folder (no objects under this prefix)")


def list_objects(url: str, options: dict) -> dict[str, RemoteFile]:
    """relative POSIX path -> RemoteFile for every object under `url` (one recursive listing, retried)."""
    store = Store.of(url, options)
    fs = store.fs()
    root = fs._strip_protocol(store.root).rstrip("/")
    fs.invalidate_cache(root)
    entries = retry(lambda: fs.find(root, detail=True), store.root)
    out = {}
    for name, info in entries.items():
        if info.get("type", "file") != "file" or not name.startswith(root + "/"):
            continue
        rel = name[len(root) + 1:]
        out[rel] = RemoteFile(f"{store.root}/{rel}", int(info["size"]), _tag(info), options=dict(options))
    return out


def is_video(rel: str) -> bool:
    """discover.find_videos' rule: a video extension, no dot-file, no dot-folder on the way."""
    parts = PurePosixPath(rel).parts
    return not any(p.startswith(".") for p in parts) and PurePosixPath(rel).suffix.lower() in VIDEO_EXTS


def find_remote_videos(url: str, options: dict) -> tuple[list[tuple[str, RemoteFile]], dict[str, RemoteFile]]:
    """(sorted (source, video) pairs, every object by relative path)."""
    objects = list_objects(url, options)
    return sorted((rel, f) for rel, f in objects.items() if is_video(rel)), objects


class UnreadSidecar(dict):
    """The meta of a sidecar that discovery did not read because its size and ETag equal its ledger
    record's (so do its bytes): only the record's video_id. `read_sidecars` fetches the real one."""


def load_remote_sidecar(video: RemoteFile, source: str, objects: dict[str, RemoteFile], allow_missing: bool,
                        known: Mapping | None = None) -> tuple[RemoteFile | None, dict | None, dict | None]:
    """discover._load_sidecar for an object: (sidecar with its sha256, meta, error); one GET, none when the
    ledger record in `known` (source -> VideoRecord) has this sidecar's size and ETag."""
    rel = str(PurePosixPath(source).with_suffix(".json"))
    sidecar = objects.get(rel)
    if sidecar is None:
        where = video.url.rsplit(".", 1)[0] + ".json"
        return missing_sidecar(source, where, video.name, rel.rsplit("/", 1)[-1], allow_missing)
    rec = (known or {}).get(source)
    fp = rec.sidecar if rec is not None and rec.status == "ok" and rec.video_id else None
    if fp is not None and fp.etag is not None and (fp.size, fp.etag) == (sidecar.size, sidecar.etag):
        unread = RemoteFile(sidecar.url, sidecar.size, sidecar.etag, fp.sha256, sidecar.options)
        return unread, UnreadSidecar(video_id=rec.video_id), None
    return read_sidecar(sidecar)


def read_sidecar(sidecar: RemoteFile) -> tuple[RemoteFile | None, dict | None, dict | None]:
    """(sidecar with its sha256, meta, error) from one GET."""
    store, name = sidecar.store()
    try:
        data = retry(lambda: store.fs().cat_file(store.join(name), timeout=op_timeout(sidecar.size)), sidecar.url)
    except (OSError, StorageError) as e:
        return None, None, {"class": "sidecar_invalid", "reason": f"{sidecar.url}: cannot read: {e}"}
    sidecar = RemoteFile(sidecar.url, len(data), sidecar.etag, hashlib.sha256(data).hexdigest(), sidecar.options)
    return (sidecar, *parse_sidecar(data, sidecar.url))


def read_sidecars(videos: list, workers: int = 8) -> list:
    """`videos` with every UnreadSidecar meta replaced by the sidecar read now (GETs in threads); a sidecar
    that cannot be read (or no longer parses) makes its video an invalid one, with the error.
    Cost: one GET per video whose sidecar discovery skipped; none for the others."""
    todo = [v for v in videos if isinstance(v.meta, UnreadSidecar)]
    if not todo:
        return videos
    with ThreadPoolExecutor(workers) as pool:
        read = dict(zip((v.source for v in todo), pool.map(lambda v: read_sidecar(v.sidecar_path), todo)))
    out = []
    for v in videos:
        if v.source in read:
            sidecar, meta, error = read[v.source]
            if error is None and meta.get("video_id") != v.video_id:  # rewritten since the listing
                error = {"class": "sidecar_invalid", "reason": f"{v.sidecar_path}: changed during the run"}
            v = replace(v, sidecar_path=sidecar or v.sidecar_path, meta=None if error else meta, error=error)
        out.append(v)
    return out


def download(f: RemoteFile, dest) -> None:
    """The object to a local file, retried with backoff on network errors (StorageError after the last)."""
    store, name = f.store()
    retry(lambda: store.fs().get_file(store.join(name), str(dest), timeout=op_timeout(f.size)), f.url)


def sha256_of(f: RemoteFile) -> str:
    """The object's sha256, streamed (ranged reads with retries); a sidecar's is known already."""
    if f.sha256 is not None:
        return f.sha256
    store, name = f.store()
    return store.sha256(name)
