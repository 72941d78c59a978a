"""Probe a video with one ffprobe call (args built by ffmpeg-python): stream facts plus the packet list.

The packet list (read by demuxing only, no decoding) gives every frame's presentation time and the
keyframes, which is what exact extraction plans from. It is also the most honest duration: containers
lie (longer than the stream, missing entirely, or claiming more than a truncated file holds).
"""
from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

from ffmpeg._utils import convert_kwargs_to_cmd_line_args

from .frames import ExtractError, FrameSpec
from .proc import ProcMissing, ProcTimeout, run

PACKET_FIELDS = "stream_index,pts_time,dts_time,duration_time,flags"


def safe_input(path: str | os.PathLike) -> str:
    """An input name ffmpeg never reads as an option or a protocol (`-i.mp4`, `a:b.mp4`, `http:x`)."""
    return "file:" + os.path.abspath(os.fspath(path))


def ffprobe_args(path: str | os.PathLike, spec: FrameSpec) -> list[str]:
    kwargs = {"v": "error", "of": "json", "show_entries": f"packet={PACKET_FIELDS}"}
    return ([spec.ffprobe, "-show_format", "-show_streams"]
            + convert_kwargs_to_cmd_line_args(kwargs) + [safe_input(path)])


def run_ffprobe(path: str | os.PathLike, spec: FrameSpec) -> dict:
    """Raw ffprobe JSON, or ExtractError (ffmpeg_missing | timeout | probe_failed)."""
    if not Path(path).is_file():
        raise ExtractError("probe_failed", f"{path}: not a readable file")
    try:
        res = run(ffprobe_args(path, spec), timeout=spec.timeout_s)
    except ProcMissing as exc:
        raise ExtractError("ffmpeg_missing", str(exc)) from None
    except ProcTimeout as exc:
        raise ExtractError("timeout", f"{path}: ffprobe {exc}", exc.stderr_tail) from None
    if res.returncode != 0:
        raise ExtractError("probe_failed", f"{path}: ffprobe exited {res.returncode}", res.stderr_tail)
    try:
        data = json.loads(res.stdout.decode("utf-8", "replace"))
    except json.JSONDecodeError as exc:
        raise ExtractError("probe_failed", f"{path}: ffprobe printed invalid JSON ({exc})", res.stderr_tail)
    data["_stderr_tail"] = res.stderr_tail
    return data


def _num(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if x == x and abs(x) != float("inf") else None


def _rate(value) -> float | None:
    try:
        r = Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        return None
    return float(r) if r > 0 else None


def rotation_of(stream: dict) -> int:
    """Clockwise degrees (0/90/180/270) the decoded picture is turned for display, as ffmpeg autorotates."""
    for sd in stream.get("side_data_list") or []:
        if "rotation" in sd:
            # The display matrix angle is counter-clockwise.
            return int(round(-float(sd["rotation"]))) % 360
    tag = (stream.get("tags") or {}).get("rotate")
    return int(round(float(tag))) % 360 if _num(tag) is not None else 0


def _video_stream(data: dict, path) -> dict:
    videos = [s for s in data.get("streams", []) if s.get("codec_type") == "video"
              and not (s.get("disposition") or {}).get("attached_pic")]
    if not videos:
        raise ExtractError("no_video_stream", f"{path}: no video stream", data.get("_stderr_tail", ""))
    return videos[0]


def likely_nonref(decode_order: list[float]) -> set[float]:
    """Frame times that are probably non-reference frames, from the packet order alone (no decoding).

    B-frames are the frames shown before one decoded earlier; they come in runs after each anchor
    (I/P). Inside a run, a B-frame followed by one shown before it is the middle of a B-pyramid: a
    reference. Of a run of two, the first is taken for a pyramid reference too (x264's default; a
    flat pair looks the same). Every other B-frame is guessed non-reference. Exact on x264/x265
    output; a wrong guess only costs speed (a target is then decoded twice or in full).
    """
    out, latest, run = set(), float("-inf"), []
    for t in decode_order + [float("inf")]:
        if t < latest:
            run.append(t)
            continue
        for k, b in enumerate(run):
            pyramid = any(c < b for c in run[k + 1:]) or (k == 0 and len(run) == 2)
            if not pyramid:
                out.add(b)
        latest, run = t, []
    return out


def _frame_packets(data: dict, index: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """(sorted frame times, keyframe times, packet durations, frame times in decode order) of stream
    `index`; AVI lacks pts: use dts."""
    times, keys, durs = [], [], []
    for p in data.get("packets", []):
        if p.get("stream_index") != index or "D" in p.get("flags", ""):
            continue
        t = _num(p.get("pts_time"))
        t = _num(p.get("dts_time")) if t is None else t
        if t is None:
            continue
        times.append(t)
        if "K" in p.get("flags", ""):
            keys.append(t)
        d = _num(p.get("duration_time"))
        if d is not None and d > 0:
            durs.append(d)
    return sorted(set(times)), sorted(set(keys)), durs, times


def _display_size(stream: dict, rotation: int) -> tuple[int, int]:
    """Width and height of the upright, square-pixel picture (what the viewer sees)."""
    w, h = int(stream.get("width") or 0), int(stream.get("height") or 0)
    sar = _rate(str(stream.get("sample_aspect_ratio", "1:1")).replace(":", "/")) or 1.0
    w = max(1, round(w * sar)) if w else w
    return (h, w) if rotation in (90, 270) else (w, h)


def probe_video(path: str | os.PathLike, spec: FrameSpec = FrameSpec()) -> dict:
    """Facts about the first video stream; raises ExtractError. Times are seconds from the file start.

    `frame_times` lists every frame's presentation time (from packets, no decoding); `keyframes` the
    keyframes among them. `duration` is the video stream's real end: last frame time + its duration.
    """
    data = run_ffprobe(path, spec)
    return summarize(data, path)


def summarize(data: dict, path) -> dict:
    stream = _video_stream(data, path)
    fmt = data.get("format", {})
    times, keys, durs, decoded = _frame_packets(data, stream.get("index"))
    nonref = likely_nonref(decoded)
    if not times:
        raise ExtractError("no_frames", f"{path}: the video stream holds no frames", data.get("_stderr_tail", ""))
    # ffmpeg's filters (and -ss) count time from the container's start_time: so must we.
    start = _num(fmt.get("start_time"))
    start = times[0] if start is None else start
    fps, avg_fps = _rate(stream.get("r_frame_rate")), _rate(stream.get("avg_frame_rate"))
    last_dur = _last_frame_duration(times, durs, avg_fps or fps)
    end = times[-1] + last_dur
    rotation = rotation_of(stream)
    dw, dh = _display_size(stream, rotation)
    info = {
        "duration": round(end - start, 6),
        "duration_source": "packets",
        "container_duration": _num(fmt.get("duration")),
        "stream_duration": _num(stream.get("duration")),
        "start_time": start,
        "fps": fps, "avg_fps": avg_fps,
        "width": stream.get("width"), "height": stream.get("height"),
        "display_width": dw, "display_height": dh,
        "rotation": rotation,
        "codec": stream.get("codec_name"), "pix_fmt": stream.get("pix_fmt"),
        "format": fmt.get("format_name"),
        "has_audio": any(s.get("codec_type") == "audio" for s in data.get("streams", [])),
        "nb_frames": len(times),
        "nb_frames_header": _int(stream.get("nb_frames")),
        "stream_index": stream.get("index"),
        "keyframes": [round(k - start, 6) for k in keys],
        "frame_times": [round(t - start, 6) for t in times],
        "likely_nonref": [round(t - start, 6) for t in times if t in nonref],
        "last_frame_duration": last_dur,
        "warnings": _probe_warnings(end - start, fmt, stream, len(times)),
    }
    return info


def _int(value) -> int | None:
    x = _num(value)
    return int(x) if x is not None else None


def _last_frame_duration(times: list[float], durs: list[float], rate: float | None) -> float:
    if durs:
        return sorted(durs)[len(durs) // 2]
    if len(times) > 1:
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        return gaps[len(gaps) // 2]
    return 1.0 / rate if rate else 0.04


def _probe_warnings(real: float, fmt: dict, stream: dict, n: int) -> list[str]:
    """Where the container's claims disagree with the packets it holds."""
    out = []
    tol = 0.25
    for name, claim in (("container", _num(fmt.get("duration"))), ("stream", _num(stream.get("duration")))):
        if claim is not None and claim > real + tol:
            out.append(f"{name} duration {claim:.3f}s exceeds the video packets' end {real:.3f}s")
    header = _int(stream.get("nb_frames"))
    if header and header > n + 1:
        out.append(f"header claims {header} frames, only {n} video packets present (truncated?)")
    if _num(fmt.get("duration")) is None and _num(stream.get("duration")) is None:
        out.append("no duration in container or stream; taken from the last packet")
    return out


def public_probe(info: dict) -> dict:
    """The probe facts worth storing with a sample (no per-frame lists)."""
    out = {k: v for k, v in info.items() if k not in ("frame_times", "keyframes", "likely_nonref")}
    keys = info["keyframes"]
    out["num_keyframes"] = len(keys)
    gaps = [b - a for a, b in zip(keys, keys[1:] + [info["duration"]])]
    out["max_keyframe_interval"] = round(max(gaps), 6) if gaps else None
    return out
