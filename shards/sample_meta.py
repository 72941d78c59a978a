"""The sample metadata schema: what a sample's `{key}.json` holds, for both halves.

A sample's JSON is the sidecar's (or annotation entry's) own fields as given, plus one reserved field, `vtt`,
that only vtt-prep writes: the provenance of the frames (source, sha256, key, probe facts, the frames' real
timestamps in seconds, extraction method and settings, ffmpeg version, warnings, sidecar-vs-probe agreement).
A sidecar that brings its own `vtt` field is refused (pipeline/annotations.py), so readers can trust it.
Readers go through the accessors here rather than spelling `meta["vtt"][...]`: a shard written by an older
vtt-prep may lack any part of it, and every accessor says what it gives then. No I/O, no torch.
"""
from __future__ import annotations

RESERVED = "vtt"  # the one field of {key}.json vtt-prep owns
FALLBACK_FPS = 24.0  # frame rate assumed where a sample carries no timestamps (the Qwen processors' own fallback)


def provenance(meta: dict) -> dict:
    """The reserved block of a sample's meta; {} where the shard has none (older or hand-made shards)."""
    block = (meta or {}).get(RESERVED)
    return block if isinstance(block, dict) else {}


def with_provenance(meta: dict, block: dict) -> dict:
    """A copy of `meta` whose reserved block is `block` (the sidecar's own fields untouched)."""
    return {**meta, RESERVED: block}


def timestamps(meta: dict, n: int | None = None) -> list[float] | None:
    """The frames' real presentation times in seconds, in frame order; None when absent, malformed, or (given
    `n`) not one per frame."""
    ts = provenance(meta).get("timestamps")
    if not isinstance(ts, list) or not all(isinstance(t, (int, float)) for t in ts):
        return None
    if n is not None and len(ts) != n:
        return None
    return [float(t) for t in ts]


def frame_times(meta: dict, n: int) -> list[float]:
    """Timestamps of the sample's n frames, or frame index / FALLBACK_FPS where it carries none."""
    return timestamps(meta, n) or [i / FALLBACK_FPS for i in range(n)]


def mean_interval(times: list[float]) -> float:
    """Mean seconds between frames; 1 / FALLBACK_FPS for a single frame or times that do not increase."""
    if len(times) > 1 and times[-1] > times[0]:
        return (times[-1] - times[0]) / (len(times) - 1)
    return 1 / FALLBACK_FPS


def with_frames_kept(meta: dict, idx: list[int], stored: int) -> dict:
    """`meta` for the frames `idx` of the `stored` ones (train-time frame picking): timestamps cut to match."""
    ts = timestamps(meta, stored)
    if ts is None:
        return dict(meta)
    return with_provenance(meta, {**provenance(meta), "timestamps": [ts[i] for i in idx]})


def warnings(meta: dict) -> list[str]:
    """What vtt-prep noted about the video (decoder complaints, sidecar/probe disagreements); [] if none."""
    return list(provenance(meta).get("warnings") or [])


def probe(meta: dict) -> dict:
    """ffprobe's facts about the source video as vtt-prep recorded them; {} if none."""
    return dict(provenance(meta).get("probe") or {})


def settings(meta: dict) -> dict:
    """The extraction settings the frames were made with; {} if none."""
    return dict(provenance(meta).get("settings") or {})
