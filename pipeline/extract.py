"""Exact frame extraction with one ffmpeg process per video, planned from the keyframe index.

Targets (uniform over the real duration, or a fixed rate) snap to real frames from the packet list.
The frames are split into groups; each group is one ffmpeg input that seeks (accurately) to just
below its first frame and decodes forward from the keyframe before it, a `select` filter keeping
exactly the planned frames by timestamp. Sparse targets become one seeking input each (decode one
keyframe interval per frame); dense ones merge into one pass (decode each frame once). `showinfo`
reports the timestamps ffmpeg really produced, so what we record is measured, not assumed.

With pick='fast' (the default) the decoder skips non-reference frames on its way to each target
(no other frame depends on them, so every reference frame decodes bit-exactly), and a target whose
own frame is such a frame gets the next one instead: within one frame of the target, ~40 % less
decoding on x264 material. Targets neither frame can serve, and damaged streams, are decoded in full.
"""
from __future__ import annotations

import bisect
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .frames import ExtractError, ExtractResult, FrameSpec
from .probe import probe_video, public_probe, safe_input
from .proc import ProcMissing, ProcTimeout, run, tail

# Cost of one more seeking input in decoded-frame equivalents (open, seek, decoder start): measured
# ~20-25 ms per input on 720p H.264, where a P-frame decodes in ~4 ms.
SEEK_OVERHEAD_FRAMES = 6
# Below a 10% predicted saving a single pass is kept: equal within measurement noise, one input.
SINGLE_PASS_MARGIN = 0.9
MAX_RETRIES = 3
MAX_RUNS = 500
# Every seeking input keeps its own decoder (reference frames and all) until ffmpeg exits: ~15 MB per
# 720p input was measured. Inputs per process are capped so one process stays under about this much.
INPUT_MEMORY_BUDGET = 512 * 2**20
_SHOWINFO = re.compile(r"\[(?:Parsed_)?showinfo(?:_\d+)?@g(\d+) @ [^\]]*\] n:\s*(\d+) pts:\s*-?\d+ pts_time:(-?[0-9.e+-]+)")


@dataclass
class Group:
    frames: list[int]  # target frame indices (into probe frame_times), ascending
    seek: float | None  # input -ss (lands on the keyframe at or before it), None = decode from the start
    # Decode reference frames only (-skip_frame noref): each target then yields its own frame or the
    # next one, whichever is a reference frame (pick='fast'). Needs targets >= 2 frames apart.
    noref: bool = False


def ffmpeg_version(spec: FrameSpec = FrameSpec()) -> str:
    """First line of `ffmpeg -version` (goes into the ledger: another ffmpeg may give other pixels)."""
    try:
        res = run([spec.ffmpeg, "-hide_banner", "-version"], timeout=min(spec.timeout_s, 30))
    except ProcMissing as exc:
        raise ExtractError("ffmpeg_missing", str(exc)) from None
    except ProcTimeout as exc:
        raise ExtractError("timeout", str(exc), exc.stderr_tail) from None
    return res.stdout.decode("utf-8", "replace").splitlines()[0].strip() if res.stdout else ""


def target_times(duration: float, spec: FrameSpec) -> tuple[list[float], list[str]]:
    """Times to sample: centres of N equal segments, or k/fps capped at max_frames."""
    if spec.fps is None:
        n = spec.num_frames
        return [(i + 0.5) * duration / n for i in range(n)], []
    count = max(1, math.ceil(duration * spec.fps - 1e-6))  # every slot that starts before the end
    warnings = []
    if count > spec.max_frames:
        warnings.append(f"fps={spec.fps:g} gives {count} frames; capped at max_frames={spec.max_frames} "
                        f"(first {spec.max_frames / spec.fps:.3f}s)")
        count = spec.max_frames
    return [k / spec.fps for k in range(count)], warnings


def snap(targets: list[float], times: list[float]) -> list[int]:
    """Index of the frame on screen at each target time (last frame whose pts <= target)."""
    return [max(0, bisect.bisect_right(times, t + 1e-9) - 1) for t in targets]


def make_distinct(idx: list[int], n_frames: int) -> list[int]:
    """Nudge colliding picks (a VFR gap longer than a segment) to neighbours; needs n_frames >= len(idx)."""
    out = list(idx)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    for i in range(len(out) - 1, -1, -1):
        out[i] = min(out[i], n_frames - 1 if i == len(out) - 1 else out[i + 1] - 1)
    return out


def choose_frames(info: dict, spec: FrameSpec) -> tuple[list[int], list[str]]:
    """Frame indices to output (may repeat), applying the short-clip policy."""
    times = info["frame_times"]
    targets, warnings = target_times(info["duration"], spec)
    idx = snap(targets, times)
    if spec.fps is not None:
        return idx, warnings
    if len(times) < spec.num_frames:
        if spec.short_clip == "fail":
            raise ExtractError("too_short", f"{len(times)} frames in the clip, {spec.num_frames} requested")
        warnings.append(f"short clip: {len(times)} frames for {spec.num_frames} requested; frames repeat")
        return idx, warnings
    if len(set(idx)) < len(idx):
        fixed = make_distinct(idx, len(times))
        warnings.append(f"{sum(a != b for a, b in zip(idx, fixed))} targets fell in long frame gaps (VFR); "
                        "moved to the neighbouring frames")
        idx = fixed
    return idx, warnings


def plan_groups(frames: list[int], info: dict, plan: str = "auto", noref: bool = False) -> list[Group]:
    """Split the wanted frames into seeking inputs, minimising decoded frames plus a per-seek cost.

    plan='single' forces one pass from the start, 'seek' one seeking input per frame (benchmarks, tests).
    noref: decode reference frames only where the targets allow it (see Group.noref). Targets whose
    frame and next frame both look non-reference (probe's `likely_nonref`) get inputs of their own
    that decode every frame, rather than a noref pass that would miss them.
    """
    frames = sorted(set(frames))
    # Adjacent targets would compete for the same fallback frame: then every frame is decoded.
    noref = noref and all(b - a >= 2 for a, b in zip(frames, frames[1:]))
    if not noref:
        return _plan(frames, info, plan, False)
    times, guess = info["frame_times"], set(info.get("likely_nonref", ()))
    looks_nonref = [t in guess for t in times] + [False]
    servable = [f for f in frames if not (looks_nonref[f] and looks_nonref[f + 1])]
    unservable = [f for f in frames if looks_nonref[f] and looks_nonref[f + 1]]
    return ((_plan(servable, info, plan, True) if servable else [])
            + (_plan(unservable, info, plan, False) if unservable else []))


def _plan(frames: list[int], info: dict, plan: str, noref: bool) -> list[Group]:
    times = info["frame_times"]
    key_idx = sorted({max(0, bisect.bisect_left(times, k - 1e-6)) for k in info["keyframes"]}) or [0]

    def keyframe_before(i: int) -> int:
        return key_idx[max(0, bisect.bisect_right(key_idx, i) - 1)]

    if plan == "single":
        return [Group(frames, None, noref)]
    if plan == "seek":
        return [Group([f], _key_seek_point(keyframe_before(f), key_idx, times), noref) for f in frames]
    groups: list[list[int]] = []
    for f in frames:
        if groups:
            last, k = groups[-1][-1], keyframe_before(f)
            # Decoding on from `last` costs f - last; a fresh seek costs f - k plus the overhead.
            if k <= last or f - last <= f - k + SEEK_OVERHEAD_FRAMES:
                groups[-1].append(f)
                continue
        groups.append([f])
    if len(groups) > 1 and _plan_cost(groups, keyframe_before) >= SINGLE_PASS_MARGIN * (groups[-1][-1] + 1):
        groups = [[f for g in groups for f in g]]  # seeking would save too little to be sure of a gain
    groups = [part for g in groups for part in _split(g)]
    return [Group(g, _key_seek_point(keyframe_before(g[0]), key_idx, times), noref) for g in groups]


def _plan_cost(groups: list[list[int]], keyframe_before) -> float:
    """Frames decoded (keyframe to last target of each group) plus the per-seek overhead."""
    return sum(g[-1] - keyframe_before(g[0]) + 1 + SEEK_OVERHEAD_FRAMES for g in groups)


def _split(frames: list[int]) -> list[list[int]]:
    """At most MAX_RUNS select terms per input: ffmpeg arguments are limited to 128 KiB each."""
    parts, count = [[]], 0
    for a, b in runs(frames):
        if count == MAX_RUNS:
            parts.append([])
            count = 0
        parts[-1].extend(range(a, b + 1))
        count += 1
    return parts


def _key_seek_point(k: int, key_idx: list[int], times: list[float]) -> float | None:
    """-ss that lands on keyframe k (None for the first: no seek). Input seeking goes to the last
    keyframe whose pts <= T, so aim just past k's pts; frames are then picked by timestamp."""
    if k == key_idx[0]:
        return None
    gap = times[k + 1] - times[k] if k + 1 < len(times) else 0.002
    return times[k] + min(gap / 2, 0.001)


def _window(i: int, times: list[float], last_dur: float) -> tuple[float, float]:
    lo = (times[i] - times[i - 1]) / 2 if i > 0 else last_dur / 2
    hi = (times[i + 1] - times[i]) / 2 if i + 1 < len(times) else last_dur / 2
    return times[i] - lo, times[i] + hi


def scale_filters(info: dict, spec: FrameSpec) -> str:
    """Resize chain on the upright picture (autorotate runs first), then the encoder's pixel format."""
    W, H = spec.size
    sw, sh = info["display_width"] or W, info["display_height"] or H
    if spec.resize == "stretch":
        chain = [f"scale={W}:{H}:flags=bicubic"]
    elif spec.resize == "crop":
        f = max(W / sw, H / sh)
        cw, ch = max(W, round(sw * f)), max(H, round(sh * f))
        # Cropping/padding subsampled chroma rounds to even sizes and offsets: work in 4:4:4.
        chain = [f"scale={cw}:{ch}:flags=bicubic", "format=yuv444p",
                 f"crop={W}:{H}:{(cw - W) // 2}:{(ch - H) // 2}"]
    else:
        f = min(W / sw, H / sh)
        pw, ph = min(W, max(1, round(sw * f))), min(H, max(1, round(sh * f)))
        chain = [f"scale={pw}:{ph}:flags=bicubic", "format=yuv444p",
                 f"pad={W}:{H}:{(W - pw) // 2}:{(H - ph) // 2}:black"]
    chain.append("setsar=1")
    chain.append("format=yuvj420p" if spec.image_format == "jpg" else "format=rgb24")
    return ",".join(chain)


def build_command(path, info: dict, groups: list[Group], spec: FrameSpec, outdir: str) -> list[str]:
    times, last_dur = info["frame_times"], info["last_frame_duration"]
    cmd = [spec.ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info", "-filter_threads", "1"]
    src = safe_input(path)
    # An MP4/MOV header holds every stream parameter ffmpeg needs; its stream probing would decode the
    # file's first frame once more per input (measured 6-9 % of a 720p N=8 extraction). Matroska lost
    # a frame after seeking without the probing, so other containers keep it.
    known = str(info.get("format") or "").startswith("mov,mp4")
    for g in groups:
        cmd += ["-threads", str(spec.threads)] + (["-nofind_stream_info"] if known else [])
        cmd += ["-skip_frame", "noref"] if g.noref else []
        # Not accurate: ffmpeg would drop what precedes T; the select below picks frames by pts.
        cmd += ["-noaccurate_seek", "-ss", f"{g.seek:.6f}"] if g.seek is not None else []
        cmd += ["-an", "-sn", "-dn", "-i", src]
    scale = scale_filters(info, spec)
    enc = (["-c:v", "mjpeg", "-q:v", str(spec.jpeg_qscale)] if spec.image_format == "jpg"
           else ["-c:v", "png"])
    for gi, g in enumerate(groups):
        wins = group_windows(g, times, last_dur)
        vf = f"trim=end={wins[-1][1]:.6f},select='{select_expr(g, wins)}',{scale},showinfo@g{gi}"
        cmd += ["-map", f"{gi}:{info['stream_index']}", "-vf", vf, "-fps_mode", "passthrough",
                "-frames:v", str(len(g.frames)), *enc, "-threads", "1",
                "-fflags", "+bitexact", "-flags:v", "+bitexact",
                "-f", "image2", "-start_number", "0",
                os.path.join(outdir, f"g{gi:03d}_%05d.{spec.image_format}")]
    return cmd


def group_windows(g: Group, times: list[float], last_dur: float) -> list[tuple[float, float]]:
    """Time windows (on the input's timeline, which starts at -ss) that the select filter keeps.

    Exact groups: one window per run of consecutive frames. noref groups: one window per target
    spanning the target frame and the next, of which the filter keeps the first that decodes.
    """
    off = g.seek or 0.0
    if g.noref:
        spans = [(i, min(i + 1, len(times) - 1)) for i in g.frames]
    else:
        spans = runs(g.frames)
    return [(_window(a, times, last_dur)[0] - off, _window(b, times, last_dur)[1] - off) for a, b in spans]


def select_expr(g: Group, wins: list[tuple[float, float]]) -> str:
    if not g.noref:
        return _balanced_sum([f"between(t,{a:.6f},{b:.6f})" for a, b in wins])
    # Keep a frame only if none was kept in its window yet (windows ascend, frames come in pts order).
    return _balanced_sum([f"between(t,{a:.6f},{b:.6f})*(isnan(prev_selected_t)+lt(prev_selected_t,{a:.6f}))"
                          for a, b in wins])


def runs(frames: list[int]) -> list[tuple[int, int]]:
    """Consecutive frame indices merged into (first, last) runs: one select term per run."""
    out: list[list[int]] = []
    for f in frames:
        if out and f == out[-1][1] + 1:
            out[-1][1] = f
        else:
            out.append([f, f])
    return [(a, b) for a, b in out]


def _balanced_sum(terms: list[str]) -> str:
    # ffmpeg's expression parser nests each '+' one level deeper and stops at depth 100: a balanced
    # tree keeps hundreds of terms to depth ~2*log2(n).
    if len(terms) == 1:
        return terms[0]
    mid = len(terms) // 2
    return f"({_balanced_sum(terms[:mid])})+({_balanced_sum(terms[mid:])})"


def _clean_tail(stderr: bytes) -> str:
    """stderr without showinfo chatter, so the tail shows what went wrong."""
    lines = stderr.decode("utf-8", "replace").splitlines()
    return tail("\n".join(ln for ln in lines if "showinfo@g" not in ln))


_COMPLAINT = re.compile(r"error|invalid|corrupt|concealing|missing picture|partial file", re.I)


def decode_complaints(stderr_tail: str) -> list[str]:
    """ffmpeg's decoder/demuxer complaints (a corrupt or truncated file says so here even at exit 0)."""
    # Only context-prefixed log lines ("[h264] ...", addresses normalised away): banner lines quote the file name.
    return [ln.strip() for ln in stderr_tail.splitlines() if ln.startswith("[") and _COMPLAINT.search(ln)]


def batches(groups: list[Group], info: dict) -> list[list[Group]]:
    """Groups split over processes so that each holds at most ~INPUT_MEMORY_BUDGET of decoder state."""
    w, h = info.get("width") or 1920, info.get("height") or 1080
    per_input = w * h * 1.5 * 16  # a 4:2:0 picture times the deepest H.264/HEVC reference list
    size = max(1, int(INPUT_MEMORY_BUDGET // per_input))
    return [groups[i:i + size] for i in range(0, len(groups), size)]


def run_batches(path, info: dict, groups: list[Group], spec: FrameSpec) -> tuple[dict[int, tuple[int, bytes]], str, int]:
    got, tails, worst = {}, [], 0
    for batch in batches(groups, info):
        g, t, rc = run_groups(path, info, batch, spec)
        got.update(g)
        tails.append(t)
        worst = worst or rc
    return got, tail("\n".join(tails)), worst


def run_groups(path, info: dict, groups: list[Group], spec: FrameSpec) -> tuple[dict[int, tuple[int, bytes]], str, int]:
    """Run one ffmpeg for all groups; returns {target: (frame index it got, image bytes)}, stderr tail, rc."""
    times = info["frame_times"]
    with tempfile.TemporaryDirectory(prefix="vtt-frames-") as outdir:
        cmd = build_command(path, info, groups, spec, outdir)
        try:
            res = run(cmd, timeout=spec.timeout_s)
        except ProcMissing as exc:
            raise ExtractError("ffmpeg_missing", str(exc)) from None
        except ProcTimeout as exc:
            raise ExtractError("timeout", f"{path}: ffmpeg {exc}", exc.stderr_tail) from None
        got: dict[int, bytes] = {}
        # A noref group's target may come out as the next frame.
        allowed = [set(g.frames) | ({i + 1 for i in g.frames} if g.noref else set()) for g in groups]
        for m in _SHOWINFO.finditer(res.stderr.decode("utf-8", "replace")):
            gi, n, t = int(m.group(1)), int(m.group(2)), float(m.group(3))
            g = groups[gi]
            j = _match_frame(t + (g.seek or 0.0), allowed[gi], times, info["last_frame_duration"])
            fname = os.path.join(outdir, f"g{gi:03d}_{n:05d}.{spec.image_format}")
            if j is not None and os.path.exists(fname):
                got[j if j in g.frames else j - 1] = (j, Path(fname).read_bytes())
        return got, _clean_tail(res.stderr), res.returncode


def _match_frame(t: float, frames, times: list[float], last_dur: float) -> int | None:
    """The frame (among `frames`, a set; None = any) whose window holds decoded time t."""
    j = bisect.bisect_right(times, t) - 1
    for i in (j, j + 1):
        if 0 <= i < len(times) and (frames is None or i in frames):
            a, b = _window(i, times, last_dur)
            if a <= t <= b:
                return i
    return None


def _replacement(i: int, bad: set[int], n: int) -> int | None:
    """Nearest frame to i that has not failed, later ones first (a corrupt frame's successor is closest)."""
    for d in range(1, n):
        for j in (i + d, i - d):
            if 0 <= j < n and j not in bad:
                return j
    return None


def extract_frames(path: str | os.PathLike, spec: FrameSpec = FrameSpec(), plan: str = "auto") -> ExtractResult:
    """Exact frames of one video as encoded images + their real timestamps; raises ExtractError.

    plan: 'auto' (from the keyframe index), or 'single' / 'seek' to force one strategy.
    Frames that the packet list promises but that do not decode are replaced by their nearest
    decodable neighbour; if that does not converge, one full decode finds the frames that really
    decode and the targets are planned again over those (a truncated or damaged file).
    """
    if plan not in ("auto", "single", "seek"):
        raise ValueError(f"plan must be auto|single|seek, got {plan!r}")
    path = Path(path)
    info = probe_video(path, spec)
    try:
        return _extract(path, info, spec, plan)
    except _Undecodable:
        pass
    info = restrict_to_decodable(path, info, spec)
    try:
        return _extract(path, info, spec, plan)
    except _Undecodable as exc:
        raise exc.error from None


class _Undecodable(Exception):
    def __init__(self, error: ExtractError):
        self.error = error


def _extract(path: Path, info: dict, spec: FrameSpec, plan: str) -> ExtractResult:
    wanted, warnings = choose_frames(info, spec)
    warnings = list(info["warnings"]) + warnings
    images, bad, calls, methods, complaints = {}, set(), 0, [], []
    todo, noref = sorted(set(wanted)), spec.pick == "fast"
    while todo:
        groups = plan_groups(todo, info, plan, noref)
        methods.append(_method(groups))
        got, stderr_tail, rc = run_batches(path, info, groups, spec)
        skipped, found = any(g.noref for g in groups), decode_complaints(stderr_tail)
        if skipped and found:
            # Error concealment in a damaged stream may draw on the frames that were skipped.
            noref, methods[-1] = False, methods[-1] + "(damaged)"
            continue
        complaints = complaints or found
        images.update(got)
        missing = [i for i in todo if i not in got]
        if not missing:
            break
        if skipped:
            # Neither the target nor the next frame is a reference frame (or they did not decode):
            # decode every frame for those targets before calling anything undecodable.
            noref, todo = False, missing
            continue
        calls += 1
        if not images and rc != 0:
            raise _failure(path, info, missing, images, rc, stderr_tail)
        if calls > MAX_RETRIES or not got:  # neighbours fail too: find out what decodes at all
            raise _Undecodable(_failure(path, info, missing, images, rc, stderr_tail))
        bad.update(missing)
        wanted, todo = _replan(wanted, missing, bad, len(info["frame_times"]), info, warnings)
    if complaints:
        warnings.append(f"ffmpeg reported {len(complaints)} decode problem(s), e.g. {complaints[0]!r}")
    times = info["frame_times"]
    return ExtractResult(
        frames=[images[i][1] for i in wanted], timestamps=[times[images[i][0]] for i in wanted],
        probe=public_probe(info), method="+".join(methods), warnings=warnings)


def restrict_to_decodable(path: Path, info: dict, spec: FrameSpec) -> dict:
    """`info` with only the frames a full decode yields (the slow path for damaged files)."""
    times, last_dur = info["frame_times"], info["last_frame_duration"]
    cmd = [spec.ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info",
           "-threads", str(spec.threads), "-an", "-sn", "-dn", "-i", safe_input(path),
           "-map", f"0:{info['stream_index']}",
           "-vf", "showinfo@g0", "-f", "null", "-"]
    try:
        res = run(cmd, timeout=spec.timeout_s)
    except ProcTimeout as exc:
        raise ExtractError("timeout", f"{path}: ffmpeg {exc}", exc.stderr_tail) from None
    decoded = {float(m.group(3)) for m in _SHOWINFO.finditer(res.stderr.decode("utf-8", "replace"))}
    good = sorted({i for t in decoded if (i := _match_frame(t, None, times, last_dur)) is not None})
    if not good:
        raise ExtractError("decode_failed", f"{path}: no frame decodes", _clean_tail(res.stderr))
    new = dict(info)
    new["frame_times"] = [times[i] for i in good]
    keys = [k for k in info["keyframes"] if k in set(new["frame_times"])]
    new["keyframes"] = keys or new["frame_times"][:1]
    new["duration"] = round(new["frame_times"][-1] + last_dur, 6)
    new["nb_frames_decodable"] = len(good)
    new["warnings"] = info["warnings"] + [
        f"only {len(good)} of {len(times)} frames decode; targets re-planned over the first "
        f"{new['duration']:.3f}s" if good[-1] < len(times) - 1 else
        f"only {len(good)} of {len(times)} frames decode; targets re-planned over those"]
    return new


def _replan(wanted, missing, bad, n, info, warnings) -> tuple[list[int], list[int]]:
    times = info["frame_times"]
    swap = {}
    for i in missing:
        j = _replacement(i, bad, n)
        if j is None:
            raise ExtractError("decode_failed", "no frame of the video decodes")
        swap[i] = j
        warnings.append(f"frame at {times[i]:.3f}s did not decode; used {times[j]:.3f}s instead")
    wanted = [swap.get(i, i) for i in wanted]
    return wanted, sorted(set(swap.values()))


def _failure(path, info, missing, images, rc, stderr_tail) -> ExtractError:
    times = info["frame_times"]
    where = ", ".join(f"{times[i]:.3f}s" for i in missing[:5])
    truncated = any("truncated" in w or "exceeds" in w for w in info["warnings"]) or "partial file" in stderr_tail
    if not images and rc != 0:
        if re.search(r"Decoder \(codec \w+\) not found|Decoding requested, but no decoder", stderr_tail):
            return ExtractError("decode_failed", f"{path}: this ffmpeg has no decoder for the video codec",
                                stderr_tail)
        if re.search(r"Error while decoding|Cannot determine format of input stream", stderr_tail):
            return ExtractError("decode_failed", f"{path}: no frame decodes", stderr_tail)
        return ExtractError("ffmpeg_failed", f"{path}: ffmpeg exited {rc}", stderr_tail)
    cls = "truncated" if truncated else "decode_failed"
    return ExtractError(cls, f"{path}: frames at {where} did not decode", stderr_tail)


def _method(groups: list[Group]) -> str:
    seeks = sum(g.seek is not None for g in groups)
    name = "single" if seeks == 0 and len(groups) == 1 else f"seek{len(groups)}"
    return name + ("-noref" if any(g.noref for g in groups) else "")
