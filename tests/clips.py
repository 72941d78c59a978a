"""Tiny test clips from ffmpeg's lavfi sources, and a reader for the frame counter they carry.

pattern='counter': the picture is COUNTER_BITS vertical stripes, stripe k white when bit k of the
frame number is set (LSB on the left) -- survives lossy coding and any resize that keeps stripe order,
so a decoded frame says which source frame it is. pattern='halves': left half white, right half black
(for orientation checks). pattern='testsrc2': ffmpeg's testsrc2.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

COUNTER_BITS = 12


def _source(pattern: str, size: tuple[int, int], fps: float, seconds: float) -> str:
    w, h = size
    if pattern == "testsrc2":
        return f"testsrc2=s={w}x{h}:r={fps}:d={seconds}"
    if pattern == "halves":
        lum = "if(lt(X,W/2),235,16)"
    elif pattern == "counter":
        lum = f"if(mod(floor(N/pow(2,floor(X*{COUNTER_BITS}/W))),2),235,16)"
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return f"color=c=black:s={w}x{h}:r={fps}:d={seconds},format=yuv420p,geq=lum='{lum}':cb=128:cr=128"


def make_clip(path: str | Path, seconds: float = 2.0, fps: float = 25, size: tuple[int, int] = (96, 32),
              gop: int | None = None, pix_fmt: str = "yuv420p", rotate: int | None = None,
              vfr: bool = False, codec: str = "libx264", pattern: str = "counter",
              audio: bool = False, extra: tuple[str, ...] = ()) -> Path:
    """Encode a clip with ffmpeg and return its path. gop = keyframe interval in frames.

    vfr=True stretches the gap after every 10th frame to 3 frame durations (timestamps via setpts),
    so frame index and time disagree. rotate = the `rotate` tag in degrees (mp4/mov), stored as a display
    matrix; which way ffmpeg then turns the picture is for probe_video to say (its `rotation`).
    """
    path = Path(path)
    vf = _source(pattern, size, fps, seconds)
    if vfr:
        vf += f",setpts='(N+2*floor(N/10))/({fps}*TB)'"
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", vf]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=f=440:d={seconds}", "-c:a", "aac" if path.suffix != ".webm" else "libopus"]
    cmd += ["-c:v", codec, "-pix_fmt", pix_fmt]
    if codec in ("libx264", "libx265"):
        cmd += ["-preset", "ultrafast", "-crf", "18"]
        if codec == "libx265":
            cmd += ["-x265-params", "log-level=error"]
    if gop:
        cmd += ["-g", str(gop), "-keyint_min", str(gop)]
        cmd += ["-sc_threshold", "0"] if codec == "libx264" else []
    if vfr:
        cmd += ["-fps_mode", "passthrough"]
    target = path.with_name(".enc-" + path.name) if rotate is not None else path
    cmd += [*extra, str(target)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if rotate is not None:  # ffmpeg 5.1 writes the tag as a display matrix only when stream-copying
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(target), "-c", "copy",
                        "-metadata:s:v:0", f"rotate={rotate}", str(path)], check=True, timeout=60)
        target.unlink()
    return path


def expected_time(n: int, fps: float, vfr: bool = False) -> float:
    """Presentation time of source frame n as make_clip wrote it."""
    return (n + 2 * (n // 10)) / fps if vfr else n / fps


def read_counter(image) -> int:
    """Frame number encoded by pattern='counter' in a decoded frame (PIL image or encoded bytes)."""
    from io import BytesIO

    from PIL import Image
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(BytesIO(image))
    gray = image.convert("L")
    w, h = gray.size
    n = 0
    for k in range(COUNTER_BITS):
        x = int((k + 0.5) * w / COUNTER_BITS)
        if gray.getpixel((x, h // 2)) > 128:
            n |= 1 << k
    return n
