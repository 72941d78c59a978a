"""The shard format: the contract between `vtt-prep` (writer) and `vtt-train` (reader).

A shards folder holds:

    shard-000000.tar ...   WebDataset tars; members `{key}.json`, `{key}.txt`, `{key}.0000.jpg` ...
    index.json             wids-shard-index-v1 + checksums; the reader takes epoch sizes from it
    ledger.json            per-video provenance for incremental reruns (written by vtt-prep only)
    report.json            the last run's report (informational)

Sample layout (one per video):
    {key}.json   sidecar metadata + provenance (see SAMPLE_META_KEYS)
    {key}.txt    the description, UTF-8
    {key}.NNNN.jpg | .png   frames in time order, NNNN zero-padded from 0000

WebDataset splits the member name at the *first* dot to find the key, so keys never contain dots
(or slashes); `make_key` is the only place keys are made.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from .sample_meta import RESERVED

FORMAT_VERSION = 1
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".tar"
INDEX_FILE = "index.json"
LEDGER_FILE = "ledger.json"
REPORT_FILE = "report.json"
LOCK_FILE = ".vtt-prep.lock"
TMP_PREFIX = ".tmp-"  # every temp file vtt writes starts with this; a rerun removes leftovers
FRAME_EXTS = ("jpg", "png")

# Keys every sample's {key}.json carries besides the sidecar's own fields.
SAMPLE_META_KEYS = ("video_id", "description", RESERVED)

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")


class ShardFormatError(ValueError):
    """A shards folder, index or sample that does not follow this contract."""


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}{number:06d}{SHARD_SUFFIX}"


def shard_number(name: str) -> int:
    m = _SHARD_RE.match(Path(name).name)
    if not m:
        raise ShardFormatError(f"{name}: not a shard name (expected shard-NNNNNN.tar)")
    return int(m.group(1))


def make_key(video_id: str) -> str:
    """A WebDataset-safe key for `video_id`: no dots, slashes or spaces, deterministic and unique.

    Ids that are already safe stay as they are (people grep shards by id). Anything else is
    sanitised and gets 8 hex digits of the id's hash, so `a.b` and `a_b` never collide.
    """
    if not isinstance(video_id, str) or not video_id:
        raise ShardFormatError(f"video_id must be a non-empty string, got {video_id!r}")
    safe = _KEY_UNSAFE.sub("_", video_id).strip("_")[:100]
    if safe == video_id:
        return safe
    digest = hashlib.sha1(video_id.encode("utf-8")).hexdigest()[:8]
    return f"{safe or 'id'}_{digest}"


Members = list[tuple[str, bytes]]  # (member name, data) of one sample, in tar order


_FRAME_FIELD = re.compile(r"^(\d{4})\.(jpg|png)$", re.IGNORECASE)


def split_member(member_name: str) -> tuple[str, str] | None:
    """(key, field) of a tar member name, by WebDataset's rule (`base_plus_ext`): the key is the name up to
    the first dot of its last path component, the field the rest (`v1.0003.jpg` -> `v1`, `0003.jpg`).
    None for a name with no dot there (WebDataset skips such members too). The one parser of member names."""
    head, sep, tail = member_name.rpartition("/")
    base, dot, field = tail.partition(".")
    if not dot or not base:
        return None
    return head + sep + base, field


def key_of(member_name: str) -> str:
    """The sample key of a member name (the whole name when it has no field)."""
    parts = split_member(member_name)
    return parts[0] if parts else member_name


def frame_index(field: str) -> int | None:
    """The frame number of a frame field (`0003.jpg` -> 3), None for any other field."""
    m = _FRAME_FIELD.match(field)
    return int(m.group(1)) if m else None


def read_samples(shard) -> Iterator[tuple[str, Members]]:
    """(key, members) per sample of a shard (a path, or a seekable binary file such as a remote object
    opened by shards/storage.py), in tar order: the one reader for tools outside training."""
    opened = tarfile.open(fileobj=shard, mode="r:") if hasattr(shard, "read") else tarfile.open(shard, mode="r")
    with opened as tar:
        key, members = None, []
        for info in tar:
            if not info.isfile():
                continue
            k = key_of(info.name)
            if members and k != key:
                yield key, members
                members = []
            key = k
            members.append((info.name, tar.extractfile(info).read()))
        if members:
            yield key, members


def frame_field(index: int, ext: str) -> str:
    """Member suffix of frame `index` (0-based): `0003.jpg`."""
    if ext not in FRAME_EXTS:
        raise ShardFormatError(f"frame extension must be one of {FRAME_EXTS}, got {ext!r}")
    return f"{index:04d}.{ext}"


def frame_fields(sample: dict) -> list[str]:
    """The frame fields of a WebDataset sample dict, in time order."""
    return sorted((k for k in sample if frame_index(k) is not None), key=lambda k: (frame_index(k), k))


def decode_frame(data: bytes):
    """One frame member (JPEG or PNG bytes) as a uint8 RGB array (H, W, 3): the one frame decoder.
    Raises whatever Pillow raises for damaged data (OSError, SyntaxError, ...)."""
    # heavy: numpy, PIL; vtt-prep loads this module and never decodes frames
    import numpy as np
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of a frame member read from its header alone (no pixels decoded: microseconds).
    Raises whatever Pillow raises for data it cannot identify."""
    # heavy: PIL, as decode_frame
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half.

    Temp file in the same folder (rename is atomic only within a filesystem), fsync, rename,
    then fsync the folder so the rename itself survives a power loss.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; others must read shards folders too
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
