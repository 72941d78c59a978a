"""What frames to extract and how (FrameSpec), the result (ExtractResult) and failures as data (ExtractError)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .proc import telling_line

RESIZE_MODES = ("crop", "pad", "stretch")
IMAGE_FORMATS = ("jpg", "png")
SHORT_CLIP_POLICIES = ("repeat", "fail")
PICKS = ("fast", "on_screen")

# Failure classes a caller may see in ExtractError.error_class (histogrammed in report.json).
ERROR_CLASSES = (
    "ffmpeg_missing",   # ffmpeg/ffprobe binary not found or not executable
    "probe_failed",     # ffprobe could not read the file at all (not a media file, unreadable)
    "no_video_stream",  # readable container without a video stream
    "no_frames",        # a video stream without a single packet/frame
    "timeout",          # ffmpeg/ffprobe ran past FrameSpec.timeout_s and was killed
    "video_timeout",    # one video's ffmpeg/ffprobe calls together ran past FrameSpec.video_timeout_s
    "decode_failed",    # the frames needed did not decode
    "truncated",        # the file ends before the frames needed (and nothing usable replaces them)
    "too_short",        # fewer decodable frames than requested and short_clip='fail'
    "ffmpeg_failed",    # any other non-zero ffmpeg exit
)


class ExtractError(Exception):
    """Extraction failed; `error_class` is one of ERROR_CLASSES, `stderr_tail` is ffmpeg's last words."""

    def __init__(self, error_class: str, message: str, stderr_tail: str = ""):
        super().__init__(f"[{error_class}] {message}")
        self.error_class = error_class
        self.message = message
        self.stderr_tail = stderr_tail

    @property
    def reason(self) -> str:
        """The message with the tool's telling stderr line ("ffprobe exited 1: moov atom not found"):
        what a user is shown, since an exit status alone says nothing."""
        line = telling_line(self.stderr_tail or "")
        return f"{self.message}: {line}" if line and line not in self.message else self.message

    def to_dict(self) -> dict:
        return {"error_class": self.error_class, "message": self.message, "stderr_tail": self.stderr_tail}


@dataclass(frozen=True)
class FrameSpec:
    """Extraction settings. `num_frames` uniform frames, or a fixed rate `fps` capped at `max_frames`.

    short_clip: a clip with fewer distinct decodable frames than requested either repeats frames (the
    uniform targets snap to the nearest earlier frame, so frames appear more than once; a warning says
    so) or fails with error class 'too_short'.
    """
    num_frames: int = 8
    fps: float | None = None
    max_frames: int = 64
    size: tuple[int, int] = (336, 336)  # (width, height) of every output frame
    resize: str = "crop"  # crop: cover then centre-crop | pad: fit then pad black | stretch
    image_format: str = "jpg"
    jpeg_quality: int = 90
    timeout_s: float = 120.0
    video_timeout_s: float | None = None  # all of one video's calls together (None: no shared limit)
    ffmpeg: str = "ffmpeg"
    ffprobe: str = "ffprobe"
    short_clip: str = "repeat"
    # on_screen: the frame displayed at each target time. fast: that frame, or the next one when only
    # the next is a reference frame: the decoder then skips non-reference frames (B-frames, ~half of
    # a typical H.264 stream) while it runs up to the target. Either way within one frame of the target.
    pick: str = "fast"
    threads: int = 1  # decoder threads per ffmpeg; one per video and one video per core scales best

    def __post_init__(self):
        size = tuple(int(v) for v in self.size)
        object.__setattr__(self, "size", size)
        if len(size) != 2 or min(size) < 1 or max(size) > 16384:
            raise ValueError(f"size must be (width, height) with 1..16384 pixels each, got {self.size!r}")
        if not 1 <= self.num_frames <= 10000:
            raise ValueError(f"num_frames must be 1..10000, got {self.num_frames}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a positive number or None, got {self.fps}")
        if not 1 <= self.max_frames <= 10000:
            raise ValueError(f"max_frames must be 1..10000, got {self.max_frames}")
        _choice("resize", self.resize, RESIZE_MODES)
        _choice("image_format", self.image_format, IMAGE_FORMATS)
        _choice("short_clip", self.short_clip, SHORT_CLIP_POLICIES)
        _choice("pick", self.pick, PICKS)
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1..100, got {self.jpeg_quality}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.video_timeout_s is not None and not self.video_timeout_s > 0:
            raise ValueError(f"video_timeout_s must be > 0 or None, got {self.video_timeout_s}")
        if not 0 <= self.threads <= 64:
            raise ValueError(f"threads must be 0 (ffmpeg's choice)..64, got {self.threads}")
        if not self.ffmpeg or not self.ffprobe:
            raise ValueError("ffmpeg and ffprobe must name an executable")

    @property
    def jpeg_qscale(self) -> int:
        """ffmpeg's mjpeg -q:v (2 best .. 31 worst) for a 1..100 quality; 90 -> 5, 95 -> 3, 100 -> 2."""
        return max(2, min(31, round(2 + (100 - self.jpeg_quality) * 29 / 99 + 0.01)))

    def settings(self) -> dict:
        """The settings that change the frames (goes into ledger/index/sample meta; binaries excluded)."""
        d = asdict(self)
        for k in ("timeout_s", "video_timeout_s", "ffmpeg", "ffprobe", "threads"):
            d.pop(k)
        d["size"] = list(self.size)
        if self.fps is None:
            d.pop("max_frames")
        else:
            d.pop("num_frames")
        if self.image_format != "jpg":
            d.pop("jpeg_quality")
        return d


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {'|'.join(choices)}, got {value!r}")


@dataclass
class ExtractResult:
    frames: list[bytes]       # encoded images in time order
    timestamps: list[float]   # presentation time of each frame, seconds from the file's start
    probe: dict
    method: str               # e.g. 'seek:8' (8 seeking inputs) or 'single:1' (one pass)
    warnings: list[str] = field(default_factory=list)
