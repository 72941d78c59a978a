"""Find videos and their sidecars, validate sidecars, and decide each video's id and key.

Validation problems are data (a `Video` with `error` set), never exceptions: one bad sidecar must not
stop the run, and the message names the file and the field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vtt.shards.format import ShardFormatError, make_key
from vtt.shards.storage import is_url

from .discover_remote import find_remote_videos, load_remote_sidecar
from .sidecar import VIDEO_EXTS, missing_sidecar, parse_sidecar


@dataclass(frozen=True)
class Video:
    source: str                    # path relative to the data folder, POSIX separators: the identity
    path: Path                     # absolute; a RemoteFile (discover_remote.py) in a URL data folder
    sidecar_path: Path | None      # None when the video has no sidecar (allowed by option); or a RemoteFile
    meta: dict | None = None       # validated sidecar fields (or the synthesised ones)
    video_id: str | None = None
    key: str | None = None
    error: dict | None = None      # {"class", "reason"} when the video cannot be used
    entry: object | None = None    # annotation entries: Fingerprint of the entry (stands for the sidecar's)

    @property
    def ok(self) -> bool:
        return self.error is None


def find_videos(data_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Video files under `data_dir`, recursively, sorted by relative path (determinism).

    Dot-files and dot-folders are skipped (editor swap files, our own `.tmp-` files), and so is
    `exclude` (the shards folder when someone puts it inside the data folder).
    """
    data_dir = Path(data_dir).resolve()
    exclude = Path(exclude).resolve() if exclude else None
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and Path(root, d).resolve() != exclude]
        found += [Path(root, f) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in VIDEO_EXTS]
    return sorted(found, key=lambda p: p.relative_to(data_dir).as_posix())


def _load_sidecar(video: Path, source: str, allow_missing: bool) -> tuple[Path | None, dict | None, dict | None]:
    """(sidecar path, meta, error) for one video."""
    sidecar = video.with_suffix(".json")
    if not sidecar.is_file():
        return missing_sidecar(source, sidecar, video.name, sidecar.name, allow_missing)
    try:
        data = sidecar.read_bytes()
    except OSError as e:
        return sidecar, None, {"class": "sidecar_invalid", "reason": f"{sidecar}: invalid JSON: {e}"}
    return (sidecar, *parse_sidecar(data, sidecar))


def discover(data_dir, allow_missing_sidecar: bool = False, exclude: Path | None = None,
             options: dict | None = None, known=None) -> list[Video]:
    """Every video under `data_dir` (a local folder or a URL, see discover_remote.py) with its validated
    sidecar, id and key, in sorted order. `options`: fsspec storage options for a URL; `known`: the ledger's
    records, whose unchanged sidecars a URL folder does not read (discover_remote.UnreadSidecar).

    Duplicates: the first video (in sorted order) keeps an id or key; later ones fail, so the outcome
    depends only on the current folder, never on what an earlier run saw.
    """
    if is_url(data_dir):
        found, objects = find_remote_videos(str(data_dir), options or {})
        return _identify((source, path, load_remote_sidecar(path, source, objects, allow_missing_sidecar, known))
                         for source, path in found)
    data_dir = Path(data_dir).resolve()
    found = ((p.relative_to(data_dir).as_posix(), p) for p in find_videos(data_dir, exclude))
    return _identify((source, path, _load_sidecar(path, source, allow_missing_sidecar)) for source, path in found)


def _identify(found) -> list[Video]:
    """(source, path, (sidecar, meta, error)) in sorted order -> Videos with ids, keys, duplicate errors."""
    videos, owner = [], {}
    for source, path, (sidecar, meta, error) in found:
        vid = key = None
        if error is None:
            vid = meta["video_id"]
            try:
                key = make_key(vid)
            except ShardFormatError as e:
                error = {"class": "sidecar_invalid", "reason": f"{sidecar}: field 'video_id': {e}"}
        if error is None:
            first = owner.get(("id", vid)) or owner.get(("key", key))
            if first is not None:
                error = {"class": "duplicate_video_id",
                         "reason": f"{sidecar or path}: field 'video_id' {vid!r} (key {key!r}) is already "
                                   f"used by {first}"}
            else:
                owner[("id", vid)] = owner[("key", key)] = source
        videos.append(Video(source, path, sidecar, meta if error is None else None,
                            vid if error is None else None, key if error is None else None, error))
    return videos
