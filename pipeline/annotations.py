"""Annotation files (`--annotations FILE`): entries instead of sidecars, one sample per entry.

Formats: a JSON list or JSONL of LLaVA-Video-178K / LLaVA-NeXT entries (`id`, `video`, `conversations`) or
LLaMA-Factory sharegpt entries (`messages`, `videos`: one video), and CSV/TSV (by extension) with a video
column and a caption column (MSR-VTT / WebVid). An entry's metadata is its own fields (conversations/messages
as they are, rendered by vtt.trainer.conversation) plus `video_id` (the entry's `id`, else `<file stem>-<row>`)
and `description` (the caption; for a conversation its first answer).

Each entry is a `Video` whose identity (`source`) is `<video path>#<video_id>` and whose `entry` fingerprint is
a hash of the entry's canonical JSON: the ledger's planning (new/changed/residecar/deleted) applies as is, and
entries of one video share its frames (pipeline/run.py extracts each video once).
Bad entries are data (a `Video` with `error` naming the file, the entry and the problem); a file that does not
exist or cannot be parsed at all raises ConfigError before any work.
Cost: O(entries) once per run; JSONL and CSV are streamed line by line, a JSON list is parsed whole.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterator

from vtt.shards.format import ShardFormatError, make_key
from vtt.shards.ledger import Fingerprint

from .config import ConfigError
from .discover import Video

_CSV_EXTS = {".csv": ",", ".tsv": "\t"}
_EXTRA = "\0extra"  # DictReader's key for fields past the header


def _entries(path: Path, video_column: str, caption_column: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row number, entry or None, problem) per entry of one file; raises ConfigError if unusable whole."""
    if not path.is_file():
        raise ConfigError(f"annotation file {path} does not exist")
    try:
        if path.suffix.lower() in _CSV_EXTS:
            yield from _csv_entries(path, _CSV_EXTS[path.suffix.lower()], video_column, caption_column)
        elif path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield n, json.loads(line), None
                    except json.JSONDecodeError as e:
                        yield n, None, f"invalid JSON: {e}"
        else:
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"annotation file {path}: invalid JSON: {e} (a JSON list, or .jsonl lines)") from None
            if not isinstance(raw, list):
                raise ConfigError(f"annotation file {path}: expected a JSON list of entries, got {type(raw).__name__}")
            yield from ((i, e, None) for i, e in enumerate(raw))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"annotation file {path}: cannot read: {e}") from None


def _csv_entries(path: Path, delimiter: str, video_column: str, caption_column: str):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, restkey=_EXTRA)
        missing = [c for c in (video_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"annotation file {path}: no column {' or '.join(map(repr, missing))} (columns: "
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


def _entry_meta(entry, where: str) -> tuple[str | None, dict | None, str | None]:
    """(video path relative to DATA, metadata, problem) of one parsed entry."""
    from vtt.trainer.conversation import conversation_of  # torch-free: parse and validate only
    from vtt.trainer.text import SampleError
    if not isinstance(entry, dict):
        return None, None, f"expected an object, got {type(entry).__name__}"
    if "vtt" in entry:
        return None, None, "field 'vtt' is reserved for vtt-prep's provenance"
    video = entry.get("video")
    if video is None and isinstance(entry.get("videos"), list):
        if len(entry["videos"]) != 1:
            return None, None, f"'videos' must list one video, has {len(entry['videos'])}"
        video = entry["videos"][0]
    if not isinstance(video, str) or not video.strip():
        return None, None, "no video ('video', or 'videos' with one path)"
    meta = dict(entry)
    try:
        turns = conversation_of({"meta": meta, "key": where})
    except SampleError as e:
        return None, None, str(e).replace(f"sample {where!r}: ", "")
    if turns is not None:
        meta.setdefault("description", _first_answer(turns))
    if not isinstance(meta.get("description"), str) or not meta["description"].strip():
        return None, None, "no conversation, messages or caption"
    return video, meta, None


def _entry_fingerprint(meta: dict) -> Fingerprint:
    blob = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
    return Fingerprint(len(blob), 0, hashlib.sha256(blob).hexdigest())


def load_annotations(data_dir: Path, files, video_column: str = "video", caption_column: str = "caption"
                     ) -> list[Video]:
    """Every entry of `files` as a Video (sorted by source); bad entries carry `error`. Duplicate ids:
    the first entry (file order, then row) keeps it, later ones fail. Cost: O(entries) + one stat per video."""
    data_dir = Path(data_dir).resolve()
    out, owner, exists = [], {}, {}
    for file in files:
        file = Path(file)
        # how a user finds the entry: a CSV/TSV row or JSONL line number (1-based), a JSON list index
        kind = "row" if file.suffix.lower() in _CSV_EXTS else "line" if file.suffix.lower() == ".jsonl" else "entry"
        for n, entry, problem in _entries(file, video_column, caption_column):
            eid = entry.get("id") if isinstance(entry, dict) else None
            where = f"{kind} {n}" + (f" (id {eid!r})" if eid is not None else "")
            video = meta = None
            if problem is None:
                video, meta, problem = _entry_meta(entry, where)
            if problem is None:
                out.append(_entry_video(data_dir, file, n, where, video, meta, owner, exists))
            else:
                out.append(Video(f"{file.name}#{n}", file, None,
                                 error={"class": "annotation_invalid", "reason": f"{file}: {where}: {problem}"}))
    return sorted(out, key=lambda v: v.source)


def _entry_video(data_dir: Path, file: Path, n: int, where: str, video: str, meta: dict, owner: dict,
                 exists: dict) -> Video:
    vid = str(meta["id"]) if meta.get("id") is not None else f"{file.stem}-{n}"
    meta["video_id"] = vid
    path = (data_dir / video).resolve()
    rel = path.relative_to(data_dir).as_posix() if path.is_relative_to(data_dir) else path.as_posix()
    source = f"{rel}#{vid}"
    def fail(cls: str, why: str) -> Video:
        return Video(source, path, None, error={"class": cls, "reason": f"{file}: {where}: {why}"})
    if path not in exists:
        exists[path] = path.is_file()
    if not exists[path]:
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
