"""One video -> one sample: the unit of work a pool worker runs.

Runs in worker processes, so inputs and outputs are small picklable dataclasses; the sample comes back
as ready tar members and the single writer in the main process only appends them.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from vtt.shards.format import frame_field, key_of, sha256_file, split_member
from vtt.shards.ledger import Fingerprint
from vtt.shards.sample_meta import RESERVED, with_provenance

from .discover_remote import RemoteFile, download
from .extract import extract_frames
from .frames import ExtractError
from .proc import BudgetExceeded, budget, normalise, shown_as

# The probe dict holds derived stream facts only (probe.public_probe); container tags (GPS location,
# device names) never reach the shards, and these keys are dropped even if a probe ever carried them.
_NEVER_COPY = ("tags", "side_data_list", "frame_times", "keyframes", "warnings")
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class Task:
    path: Path              # or a RemoteFile: its URL, listing size/ETag and the storage options (a dict)
    source: str
    key: str
    meta: dict              # validated sidecar fields
    spec: object            # FrameSpec
    settings: dict          # output settings (ledger/index)
    ffmpeg_version: str


@dataclass
class Outcome:
    source: str
    key: str
    sha256: str | None = None
    stat: tuple[int, int] | None = None   # (size, mtime_ns) taken before hashing: a file changed
                                          # meanwhile then looks changed to the next run
    etag: str | None = None               # an object's (URL data folder), from the listing; mtime_ns is 0
    members: list[tuple[str, bytes]] = field(default_factory=list)
    nframes: int = 0
    error: dict | None = None   # {"class", "reason", "stderr_tail"}
    seconds: dict = field(default_factory=dict)   # stage -> seconds spent in the worker

    def fingerprint(self):
        """The video's ledger fingerprint (the worker hashed it already)."""
        return Fingerprint(self.stat[0], self.stat[1], self.sha256, self.etag)


def lost_outcome(task, error: BaseException):
    """The failure record of a video whose task Ray gave up on (its worker or node died on every try, e.g.
    killed for memory): data like any failure, retried by the next run (no fingerprint is recorded)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    out = Outcome(task.source, task.key)
    out.error = {"class": "worker_lost", "reason": f"{task.path}: {type(error).__name__}: {first}"[:500],
                 "stderr_tail": str(error)[-2000:]}
    return out


def _agree(a: float, b: float, tol_abs: float, tol_rel: float) -> bool:
    return abs(a - b) <= max(tol_abs, tol_rel * max(abs(a), abs(b)))


def sidecar_vs_probe(meta: dict, probe: dict) -> tuple[dict, list[str]]:
    """Both values wherever the sidecar states duration/frames, and warnings where they disagree."""
    out, warnings = {}, []
    pd = probe.get("duration")
    if meta.get("duration") is not None and pd is not None:
        agree = _agree(float(meta["duration"]), float(pd), 0.5, 0.05)
        out["duration"] = {"sidecar": meta["duration"], "probe": pd, "agree": agree}
        if not agree:
            warnings.append(f"sidecar duration {meta['duration']} s, probe says {pd} s")
    pf = probe.get("nb_frames")
    if pf is None and pd is not None and probe.get("avg_fps"):
        pf = round(float(pd) * float(probe["avg_fps"]))
    if meta.get("frames") is not None and pf is not None:
        agree = _agree(float(meta["frames"]), float(pf), 2, 0.05)
        out["frames"] = {"sidecar": meta["frames"], "probe": pf, "agree": agree}
        if not agree:
            warnings.append(f"sidecar frames {meta['frames']}, probe says {pf}")
    return out, warnings


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


def build_members(task: Task, sha256: str, result) -> list[tuple[str, bytes]]:
    """`{key}.json`, `{key}.txt`, `{key}.NNNN.<ext>` for one extracted video."""
    probe = {k: _jsonable(v) for k, v in result.probe.items() if k not in _NEVER_COPY}
    agreement, warnings = sidecar_vs_probe(task.meta, result.probe)
    meta = with_provenance(task.meta, {
        "source": task.source, "sha256": sha256, "key": task.key, "probe": probe,
        "timestamps": [round(float(t), 6) for t in result.timestamps], "method": result.method,
        "settings": task.settings, "ffmpeg_version": task.ffmpeg_version,
        "warnings": list(result.warnings) + warnings, "sidecar_vs_probe": agreement,
    })
    ext = task.settings["image_format"]
    members = [(f"{task.key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()),
               (f"{task.key}.txt", str(task.meta.get("description", "")).encode())]
    members += [(f"{task.key}.{frame_field(i, ext)}", f) for i, f in enumerate(result.frames)]
    return members


def residecar_members(members: list[tuple[str, bytes]], key: str, meta: dict, source: str | None = None
                      ) -> list[tuple[str, bytes]]:
    """The sample for a new sidecar of an unchanged video: its frames and provenance, new metadata
    (and `source`, when it is another annotation entry's sample of the same video).

    Gives the same bytes as extracting again: everything in "vtt" but the sidecar comparison
    depends on the video only, and that comparison is a pure function of sidecar and probe.
    """
    old_key = key_of(members[0][0])
    old = json.loads(dict(members)[f"{old_key}.json"])
    vtt = old.pop(RESERVED)
    _, old_warnings = sidecar_vs_probe(old, vtt["probe"])
    agreement, warnings = sidecar_vs_probe(meta, vtt["probe"])
    kept = [w for w in vtt["warnings"] if w not in old_warnings]
    new = with_provenance(meta, {**vtt, "key": key, "warnings": kept + warnings, "sidecar_vs_probe": agreement,
                                 "source": source or vtt["source"]})
    out = [(f"{key}.json", json.dumps(new, sort_keys=True, ensure_ascii=False).encode()),
           (f"{key}.txt", str(meta.get("description", "")).encode())]
    return out + [(f"{key}.{field}", d) for field, d in ((split_member(n)[1], d) for n, d in members)
                  if field not in ("json", "txt")]


def process_video(task: Task) -> Outcome:
    """Hash, extract and package one video; failures come back as data with their class. A video in a URL
    data folder is downloaded to a temp file first (retried with backoff; failure: class download_error)
    and the file is deleted after. Cost: the video's bytes once over the network, disk for one video."""
    if not isinstance(task.path, RemoteFile):
        st = os.stat(task.path) if os.path.exists(task.path) else None
        return _process(task, task.path, (st.st_size, st.st_mtime_ns) if st else None, None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vtt-prep-") as tmp:
        local = Path(tmp) / task.path.name   # keeps the extension: ffmpeg's demuxer guess
        try:
            download(task.path, local)
        except Exception as e:  # StorageError after the retries, or gone / denied at once
            out = Outcome(task.source, task.key)
            out.error = {"class": "download_error", "reason": f"{task.path}: {e}", "stderr_tail": ""}
            out.seconds = {"download": time.perf_counter() - t0}
            return out
        out = _process(task, local, (task.path.size, 0), task.path.etag)
        out.seconds["download"] = time.perf_counter() - t0 - sum(out.seconds.values())
        return out


def _process(task: Task, path: Path, stat: tuple[int, int] | None, etag: str | None) -> Outcome:
    out = Outcome(task.source, task.key, etag=etag)
    t0 = time.perf_counter()
    try:
        if stat is None:
            os.stat(path)  # raises the OSError that names the problem
        out.stat = stat
        out.sha256 = sha256_file(path)
        t1 = time.perf_counter()
        # tool output (normalised as it is captured) names the user's file, not a temp copy
        with budget(task.spec.video_timeout_s), shown_as(path, task.path):
            result = extract_frames(path, task.spec)
        t2 = time.perf_counter()
        out.members = build_members(task, out.sha256, result)
        out.nframes = len(result.frames)
        out.seconds = {"hash": t1 - t0, "extract": t2 - t1, "package": time.perf_counter() - t2}
    except ExtractError as e:
        with shown_as(path, task.path):
            message = normalise(e.reason)  # the user's file, not the temp copy
        where = "" if message.startswith(str(task.path)) else f"{task.path}: "  # the file, named once
        out.error = {"class": e.error_class, "reason": f"{where}{message}",
                     "stderr_tail": (e.stderr_tail or "")[-_STDERR_TAIL:]}
    except BudgetExceeded as e:
        out.error = {"class": "video_timeout", "reason": f"{task.path}: {e} (--video-timeout)",
                     "stderr_tail": e.stderr_tail[-_STDERR_TAIL:]}
    except OSError as e:
        out.error = {"class": "read_failed", "reason": f"{task.path}: {e}", "stderr_tail": ""}
    except Exception as e:  # a bug, recorded with its traceback so the run still finishes the rest
        out.error = {"class": "internal_error", "reason": f"{task.path}: {type(e).__name__}: {e}",
                     "stderr_tail": traceback.format_exc()[-_STDERR_TAIL:]}
    out.seconds.setdefault("extract", time.perf_counter() - t0)
    return out
