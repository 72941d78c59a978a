"""The sidecar rules both discoveries apply (discover.py for a local folder, discover_remote.py for a URL one):
which files are videos, a sidecar's JSON parsed and validated, what a video without one gets. Problems are data
(an error dict naming the file and the field), never exceptions.
"""
from __future__ import annotations

import json
import math

VIDEO_EXTS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"})


def _type_error(field: str, value, expected: str) -> str:
    return f"field {field!r} must be {expected}, got {type(value).__name__} {value!r}"[:300]


def validate_sidecar(raw) -> list[str]:
    """Problems with a parsed sidecar; [] if it is usable. Extra fields are allowed and kept."""
    if not isinstance(raw, dict):
        return [f"sidecar must be a JSON object, got {type(raw).__name__}"]
    problems = []
    if "vtt" in raw:  # the sample's provenance block goes there; a sidecar's own would be lost
        problems.append("field 'vtt' is reserved for vtt-prep's provenance; rename it")
    vid = raw.get("video_id")
    if "video_id" not in raw:
        problems.append("field 'video_id' is missing")
    elif not isinstance(vid, str) or not vid.strip():
        problems.append(_type_error("video_id", vid, "a non-empty string"))
    desc = raw.get("description")
    if "description" not in raw:
        problems.append("field 'description' is missing")
    elif not isinstance(desc, str):
        problems.append(_type_error("description", desc, "a string"))
    elif not desc.strip():
        problems.append("field 'description' is empty")
    dur = raw.get("duration")
    if dur is not None and (isinstance(dur, bool) or not isinstance(dur, (int, float))
                            or not math.isfinite(dur) or dur < 0):
        problems.append(_type_error("duration", dur, "a non-negative number of seconds"))
    frames = raw.get("frames")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 0):
        problems.append(_type_error("frames", frames, "a non-negative integer"))
    return problems


def missing_sidecar(source: str, where, video_name: str, expected: str, allow_missing: bool
                    ) -> tuple[None, dict | None, dict | None]:
    """(None, meta, error) for a video without sidecar: synthesised meta when allowed, else the error."""
    if allow_missing:
        # The id comes from the path without extension, so a/x.mp4 and b/x.mp4 stay distinct.
        return None, {"video_id": source.rsplit(".", 1)[0], "description": ""}, None
    return None, None, {"class": "sidecar_missing",
                        "reason": f"{where}: no sidecar for {video_name} (expected {expected}; "
                                  f"--allow-missing-sidecar takes the id from the file name)"}


def parse_sidecar(data: bytes, where) -> tuple[dict | None, dict | None]:
    """(meta, error) from a sidecar's bytes: JSON, then validate_sidecar; `where` names it in errors."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, {"class": "sidecar_invalid", "reason": f"{where}: invalid JSON: {e}"}
    problems = validate_sidecar(raw)
    if problems:
        return None, {"class": "sidecar_invalid", "reason": f"{where}: " + "; ".join(problems)}
    return raw, None
