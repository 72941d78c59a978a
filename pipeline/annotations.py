"""Annotation files (`--annotations FILE`): entries instead of sidecars, one sample per entry.

Formats: a JSON list or JSONL of LLaVA-Video-178K / LLaVA-NeXT / Qwen-VL finetune entries (`id`, `video`,
`conversations`), LLaMA-Factory sharegpt entries (`messages` or `conversations`, `videos`: one video, an optional
`system` column), ms-swift entries (`messages`, or its ShareGPT `system` + `conversation` of human/assistant pairs,
`videos`), and CSV/TSV (by extension) with a video column and a caption column (MSR-VTT / WebVid). Entries with
audio or several videos fail as `annotation_unsupported` (vtt trains one video and text per sample). An entry's
metadata is its own fields (conversations/messages as they are, parsed by vtt.shards.conversation) plus `video_id` (the entry's `id`, else `<file stem>-<row>`)
and `description` (the caption; for a conversation its first answer).

Each entry is a `Video` whose identity (`source`) is `<video path>#<video_id>` and whose `entry` fingerprint is
a hash of the entry's canonical JSON: the ledger's planning (new/changed/residecar/deleted) applies as is, and
entries of one video share its frames (pipeline/run.py extracts each video once).
Bad entries are data (a `Video` with `error` naming the file, the entry and the problem); a file that does not
exist or cannot be parsed at all raises ConfigError before any work.
Files and the data folder may be URLs (any fsspec scheme): a file is streamed with ranged, retried reads; a
URL data folder is listed once and an entry's video is an object of that listing (`RemoteFile`, so the
ledger's size + ETag fast path and the worker's download apply as for sidecar discovery).
Cost: O(entries) once per run; JSONL and CSV are streamed line by line, a JSON list is parsed whole; one
stat per video locally, one listing for a URL data folder (no request per entry).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import posixpath
from pathlib import Path, PurePosixPath
from typing import Iterator

from vtt.shards.conversation import SUPPORTED, SampleError, UnsupportedSample, conversation_of
from vtt.shards.format import ShardFormatError, make_key
from vtt.shards.ledger import Fingerprint
from vtt.shards.sample_meta import RESERVED
from vtt.shards.settings import ConfigError
from vtt.shards.storage import StorageError, Store, is_url

from .discover import Video
from .discover_remote import list_objects

_CSV_EXTS = {".csv": ",", ".tsv": "\t"}
_EXTRA = "\0extra"  # DictReader's key for fields past the header


def _suffix(file) -> str:
    return PurePosixPath(str(file)).suffix.lower()


def _name(file) -> str:
    return PurePosixPath(str(file)).name


@contextlib.contextmanager
def _open_text(file, options: dict):
    """The file as UTF-8 text: a local open, or a URL's ranged reads (read-ahead, retried) decoded."""
    if not is_url(file):
        with open(file, encoding="utf-8", newline="") as f:
            yield f
        return
    parent, _, name = str(file).rpartition("/")
    with Store.of(parent, options).open(name) as raw:
        yield io.TextIOWrapper(io.BufferedReader(_Raw(raw)), encoding="utf-8", newline="")


class _Raw(io.RawIOBase):
    """storage.RetryingFile as the raw stream io.BufferedReader wants (readinto)."""

    def __init__(self, f):
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)


def check_annotation_file(file, options: dict) -> None:
    """ConfigError naming the file unless it is there (a local file, or an object behind the URL)."""
    if not is_url(file):
        if not Path(file).is_file():
            raise ConfigError(f"annotation file {file} does not exist")
        return
    parent, _, name = str(file).rpartition("/")
    store = Store.of(parent, options)
    try:
        store.stat(name)
    except FileNotFoundError:
        store._check_bucket(store.fs())
        raise ConfigError(f"annotation file {file} does not exist") from None
    except StorageError as e:
        raise ConfigError(f"annotation file {e}") from e


def _entries(file, video_column: str, caption_column: str, options: dict
             ) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row number, entry or None, problem) per entry of one file; raises ConfigError if unusable whole."""
    check_annotation_file(file, options)
    suffix = _suffix(file)
    try:
        with _open_text(file, options) as f:
            if suffix in _CSV_EXTS:
                yield from _csv_entries(f, file, _CSV_EXTS[suffix], video_column, caption_column)
            elif suffix == ".jsonl":
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield n, json.loads(line), None
                    except json.JSONDecodeError as e:
                        yield n, None, f"invalid JSON: {e}"
            else:
                yield from _json_list(f, file)
    except (OSError, UnicodeDecodeError, StorageError) as e:
        raise ConfigError(f"annotation file {file}: cannot read: {e}") from None


def _json_list(f, file):
    try:
        raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"annotation file {file}: invalid JSON: {e} (a JSON list, or .jsonl lines)") from None
    if not isinstance(raw, list):
        raise ConfigError(f"annotation file {file}: expected a JSON list of entries, got {type(raw).__name__}")
    yield from ((i, e, None) for i, e in enumerate(raw))


def _csv_entries(f, file, delimiter: str, video_column: str, caption_column: str):
    reader = csv.DictReader(f, delimiter=delimiter, restkey=_EXTRA)
    missing = [c for c in (video_column, caption_column) if c not in (reader.fieldnames or [])]
    if missing:
        raise ConfigError(f"annotation file {file}: no column {' or '.join(map(repr, missing))} (columns: "
                          f"{reader.fieldnames}; --video-column / --caption-column)")
    for row in reader:
        n = reader.line_num
        if _EXTRA in row or None in row.values():
            yield n, None, f"has {'more' if _EXTRA in row else 'fewer'} fields than the header"
            continue
        entry = {k: v for k, v in row.items() if k not in (video_column, caption_column)}
        entry.update(video=row[video_column], description=row[caption_column])
        if not entry["description"].strip():
            yield n, None, f"column {caption_column!r} is empty"
            continue
        yield n, entry, None


def _first_answer(turns) -> str:
    return next((t.text for t in turns if t.role == "assistant"), "")


UNSUPPORTED = "annotation_unsupported"  # the entry asks for what vtt does not train (audio, several videos)


def _entry_video_path(entry: dict) -> tuple[str | None, str | None]:
    """(the one video path, problem): `video` (LLaVA / Qwen-VL finetune; a list of one is that one) or `videos`
    (LLaMA-Factory / ms-swift, one path). Several videos, or a list of frame images, are unsupported."""
    for name in ("video", "videos"):
        value = entry.get(name)
        if not isinstance(value, list):
            continue
        if len(value) != 1:
            return None, f"{name!r} is a list of {len(value)}; vtt takes one video per entry"
        if isinstance(value[0], list):
            return None, f"{name!r}[0] is a list of {len(value[0])} (frame images); vtt takes a video file"
        return value[0], None
    return entry.get("video"), None


def _entry_meta(entry, where: str) -> tuple[str | None, dict | None, str | tuple[str, str] | None]:
    """(video path relative to DATA, metadata, problem: text, or (error class, text)) of one parsed entry."""
    if not isinstance(entry, dict):
        return None, None, f"expected an object, got {type(entry).__name__}"
    if RESERVED in entry:
        return None, None, f"field '{RESERVED}' is reserved for vtt-prep's provenance"
    if entry.get("audios"):
        return None, None, (UNSUPPORTED, f"has 'audios' ({len(entry['audios'])}); {SUPPORTED} (no audio)")
    video, problem = _entry_video_path(entry)
    if problem:
        return None, None, (UNSUPPORTED, problem)
    if not isinstance(video, str) or not video.strip():
        return None, None, "no video ('video', or 'videos' with one path)"
    meta = dict(entry)
    try:
        turns = conversation_of({"meta": meta, "key": where})
    except SampleError as e:
        why = str(e).replace(f"sample {where!r}: ", "")
        return None, None, (UNSUPPORTED, why) if isinstance(e, UnsupportedSample) else why
    if turns is not None:
        meta.setdefault("description", _first_answer(turns))
    if not isinstance(meta.get("description"), str) or not meta["description"].strip():
        return None, None, "no conversation, messages or caption"
    return video, meta, None


def _entry_fingerprint(meta: dict) -> Fingerprint:
    blob = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
    return Fingerprint(len(blob), 0, hashlib.sha256(blob).hexdigest())


def load_annotations(data_dir, files, video_column: str = "video", caption_column: str = "caption",
                     options: dict | None = None) -> list[Video]:
    """Every entry of `files` as a Video (sorted by source); bad entries carry `error`. Duplicate ids:
    the first entry (file order, then row) keeps it, later ones fail. Cost: O(entries) + one stat per video
    (local data folder) or one listing (URL data folder)."""
    options = dict(options or {})
    find = _remote_finder(str(data_dir), options) if is_url(data_dir) else _local_finder(Path(data_dir))
    out, owner = [], {}
    for file in files:
        # how a user finds the entry: a CSV/TSV row or JSONL line number (1-based), a JSON list index
        kind = "row" if _suffix(file) in _CSV_EXTS else "line" if _suffix(file) == ".jsonl" else "entry"
        for n, entry, problem in _entries(file, video_column, caption_column, options):
            eid = entry.get("id") if isinstance(entry, dict) else None
            where = f"{kind} {n}" + (f" (id {eid!r})" if eid is not None else "")
            video = meta = None
            if problem is None:
                video, meta, problem = _entry_meta(entry, where)
            if problem is None:
                out.append(_entry_video(find, file, n, where, video, meta, owner))
            else:
                cls, problem = problem if isinstance(problem, tuple) else ("annotation_invalid", problem)
                out.append(Video(f"{_name(file)}#{n}", file, None,
                                 error={"class": cls, "reason": f"{file}: {where}: {problem}"}))
    return sorted(out, key=lambda v: v.source)


def _local_finder(data_dir: Path):
    """video as written in an entry -> (relative path or absolute one outside DATA, Path, exists)."""
    data_dir, exists = data_dir.resolve(), {}

    def find(video: str):
        path = (data_dir / video).resolve()
        rel = path.relative_to(data_dir).as_posix() if path.is_relative_to(data_dir) else path.as_posix()
        if path not in exists:
            exists[path] = path.is_file()
        return rel, path, exists[path]
    return find


def _remote_finder(url: str, options: dict):
    """The same for a URL data folder, from one listing: a path relative to it, or a full URL inside it.
    The path of an object not in the listing (or outside the folder) is its URL, for the error message."""
    root = url.rstrip("/")
    objects = list_objects(root, options)

    def find(video: str):
        rel = video[len(root) + 1:] if video.startswith(root + "/") else video
        if is_url(rel):
            return rel, rel, False  # another bucket or folder: not in this listing
        rel = posixpath.normpath(rel)
        found = objects.get(rel)
        return rel, found or f"{root}/{rel}", found is not None
    return find


def _entry_video(find, file, n: int, where: str, video: str, meta: dict, owner: dict) -> Video:
    vid = str(meta["id"]) if meta.get("id") is not None else f"{PurePosixPath(_name(file)).stem}-{n}"
    meta["video_id"] = vid
    rel, path, exists = find(video)
    source = f"{rel}#{vid}"

    def fail(cls: str, why: str) -> Video:
        return Video(source, path, None, error={"class": cls, "reason": f"{file}: {where}: {why}"})
    if not exists:
        return fail("video_missing", f"video {video!r} not found ({path})")
    try:
        key = make_key(vid)
    except ShardFormatError as e:
        return fail("annotation_invalid", f"id {vid!r}: {e}")
    first = owner.get(key)
    if first is not None:
        return fail("duplicate_video_id", f"id {vid!r} (key {key!r}) is already used by {first}")
    owner[key] = f"{file}: {where}"
    return Video(source, path, None, meta, vid, key, entry=_entry_fingerprint(meta))
