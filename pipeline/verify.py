"""`vtt-prep verify` and `vtt-prep status`: check a shards folder against its index and ledger.

Retired shards (replaced, kept on disk for trainers reading an older index; see retire.py) are listed
apart: they are neither in index.json nor a mismatch. The folder may be a URL (shards/folder.py).
Cost: verify reads every live shard once (a URL: streamed, ranged GETs); status one listing and three
small reads.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from vtt.shards.folder import OutFolder
from vtt.shards.format import (
    FRAME_EXTS,
    REPORT_FILE,
    TMP_PREFIX,
    ShardFormatError,
    decode_frame,
    frame_field,
    make_key,
    read_samples,
)
from vtt.shards.index import NoIndex, check_index, read_index
from vtt.shards.ledger import STATUS_OK, read_ledger
from vtt.shards.storage import StorageError
from vtt.shards.store import LEDGER_DIR

from .retire import age_hours


@dataclass
class VerifyResult:
    shards: int = 0
    samples: int = 0
    frames: int = 0
    problems: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)   # "url (retired at ..., N samples)" lines

    @property
    def ok(self) -> bool:
        return not self.problems


def check_sample(shard: str, key: str, members: list[tuple[str, bytes]]) -> tuple[int, list[str]]:
    """(frames decoded, problems) for one sample: layout, JSON, text, every frame decodes."""
    where = f"{shard}: sample {key!r}"
    fields = {name[len(key) + 1:]: data for name, data in members}
    problems = [f"{where}: member {n!r} has no field" for n in fields if not n]
    try:
        meta = json.loads(fields.get("json", b"null"))
        if not isinstance(meta, dict) or make_key(meta.get("video_id")) != key:
            problems.append(f"{where}: json missing or its video_id does not give this key")
        elif meta.get("description", "") != fields.get("txt", b"").decode("utf-8"):
            problems.append(f"{where}: txt differs from the json description")
    except (ValueError, ShardFormatError) as e:
        problems.append(f"{where}: bad json/txt: {e}")
    frames = sorted(k for k in fields if k.split(".")[-1] in FRAME_EXTS)
    ext = frames[0].split(".")[-1] if frames else "jpg"
    if not frames or frames != [frame_field(i, ext) for i in range(len(frames))]:
        problems.append(f"{where}: frames are not {key}.0000.{ext} .. contiguous: {frames[:5]}")
    decoded = 0
    for f in frames:
        try:
            decode_frame(fields[f])
            decoded += 1
        except Exception as e:  # PIL raises many types for bad images; every one is a finding
            problems.append(f"{where}: frame {f} does not decode: {e}")
    return decoded, problems


def _check_shards(out: OutFolder, index, result: VerifyResult) -> dict[str, str]:
    """Read every shard in the index; returns key -> shard url."""
    where_key: dict[str, str] = {}
    present = out.listing("shard-*.tar")
    for entry in index.shards:
        if entry.url not in present:
            continue  # reported by check_index
        count = 0
        try:
            with out.open(entry.url, present[entry.url]) as f:
                for key, members in read_samples(f):
                    count += 1
                    if key in where_key:
                        result.problems.append(f"{entry.url}: key {key!r} also in {where_key[key]}")
                    where_key[key] = entry.url
                    n, problems = check_sample(entry.url, key, members)
                    result.frames += n
                    result.problems += problems
        except (tarfile.TarError, EOFError, OSError) as e:
            result.problems.append(f"{entry.url}: unreadable tar: {e}")
        if count != entry.nsamples:
            result.problems.append(f"{entry.url}: {count} samples, index says {entry.nsamples}")
        result.samples += count
        result.shards += 1
    return where_key


def _check_ledger(out: OutFolder, index, where_key: dict[str, str], result: VerifyResult) -> None:
    try:
        ledger = read_ledger(out)
    except ShardFormatError as e:
        result.problems.append(str(e))
        return
    if ledger is None:
        return  # a folder made by something else: index and tars are all there is to check
    if ledger.index() != index:
        result.problems.append("index.json does not match the ledger (rerun vtt-prep extract to repair)")
    for r in ledger.ok_records():
        if where_key.get(r.key) != r.shard:
            result.problems.append(f"{r.source}: ledger puts key {r.key!r} in {r.shard}, "
                                   f"found in {where_key.get(r.key, 'no shard')}")
    listed = {r.key for r in ledger.ok_records()}
    for key in sorted(set(where_key) - listed):
        result.problems.append(f"{where_key[key]}: sample {key!r} is not in the ledger")


def _retired_lines(out: OutFolder) -> list[str]:
    """One line per retired shard: age, samples, and whether the file is still there."""
    try:
        ledger = read_ledger(out)
    except ShardFormatError:
        return []  # reported by _check_ledger
    if ledger is None:
        return []
    present = out.listing("shard-*.tar")
    return [f"{u} (retired {r.retired_at}, {age_hours(r):.1f} h ago, {r.nsamples} samples"
            + ("" if u in present else ", file already gone") + ")"
            for u, r in sorted(ledger.retired.items())]


def verify_shards(folder, options: dict | None = None) -> VerifyResult:
    """Read every shard, check index sizes/checksums and the ledger, decode every frame. `folder`: a path
    or a URL (`options`: its fsspec storage options). StorageError when a URL cannot be reached at all,
    NoIndex when `folder` is not a shards folder (missing, a file, no index.json)."""
    out, result = OutFolder(folder, options), VerifyResult()
    try:
        index = read_index(folder, options)
    except (StorageError, NoIndex):
        raise
    except ShardFormatError as e:
        result.problems.append(str(e))
        return result
    result.problems += check_index(folder, index, checksums=True, options=options)
    where_key = _check_shards(out, index, result)
    _check_ledger(out, index, where_key, result)
    result.retired = _retired_lines(out)
    if not out.remote:  # temp files of a URL folder live in a local scratch folder, not in the bucket
        temps = [*out.path.glob(TMP_PREFIX + "*"), *(out.path / LEDGER_DIR).glob(TMP_PREFIX + "*")]
        result.problems += [f"{p}: stray temp file (an interrupted run's)" for p in sorted(temps)]
    return result


def _ledger_line(ledger) -> str:
    if ledger.legacy:
        return "ledger: ledger.json (the old single file; the next extract or compact upgrades it to _ledger/)"
    base = f"checkpoint {ledger.checkpoint} + " if ledger.checkpoint >= 0 else ""
    return f"ledger: {LEDGER_DIR}/ at commit {ledger.version} ({base}{ledger.log_commits} commits to replay)"


def status_text(folder, options: dict | None = None) -> tuple[str, bool]:
    """(summary of ledger, index and last report, whether index and tars agree by size). `folder`: a path
    or a URL (`options`: its fsspec storage options)."""
    out = OutFolder(folder, options)
    index = read_index(folder, options)
    ledger = read_ledger(out)
    lines = [f"shards folder {folder}: {len(index.shards)} shards, {index.num_samples} samples, "
             f"{sum(s.filesize for s in index.shards) / 1e6:.1f} MB",
             f"settings: {json.dumps(index.settings, sort_keys=True)}"]
    if ledger is not None:
        lines.append(_ledger_line(ledger))
        ok = ledger.ok_records()
        failed = [r for r in ledger.records.values() if r.status != STATUS_OK]
        versions = Counter(r.ffmpeg_version for r in ok)
        lines.append(f"videos: {len(ok)} ok, {len(failed)} failed (retried by the next extract run when "
                     f"their file, sidecar, settings or ffmpeg changed, or with --retry-failed)")
        lines += [f"ffmpeg: {v} ({n} samples)" for v, n in versions.items()]
        classes = Counter(r.error["class"] for r in failed)
        if classes:
            lines.append("errors: " + ", ".join(f"{k} x{n}" for k, n in sorted(classes.items())))
        lines += [f"  FAILED {r.source}: [{r.error['class']}] {r.error['reason']}" for r in failed[:50]]
        if ledger.retired:
            mb = sum(r.filesize for r in ledger.retired.values()) / 1e6
            lines.append(f"retired: {len(ledger.retired)} shards ({mb:.1f} MB) replaced but kept for trainers "
                         f"reading an older index.json; a later extract/compact deletes them after "
                         f"--retention-hours")
            lines += [f"  RETIRED {line}" for line in _retired_lines(out)[:50]]
    try:
        rep = json.loads(out.read_bytes(REPORT_FILE))
    except FileNotFoundError:
        rep = None
    if rep is not None:
        lines.append(f"last run: {rep.get('videos_ok')} written, {rep.get('videos_unchanged')} unchanged, "
                     f"{rep.get('videos_failed')} failed in {rep.get('seconds', {}).get('total', 0):.1f} s")
    problems = check_index(folder, index, options=options)
    lines += [f"PROBLEM: {p}" for p in problems]
    return "\n".join(lines), not problems
