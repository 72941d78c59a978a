"""Frames -> a Qwen-VL model's video input, as its video processor makes it.

With torchvision importable the checkpoint's own video processor (AutoVideoProcessor) does the work. Without it
(the local CPU torch wheel has no matching torchvision) `port_video` runs the same steps as
Qwen2VLVideoProcessor/Qwen3VLVideoProcessor._preprocess in transformers 5.24: smart_resize (Qwen3-VL's counts the
frames in its pixel budget), bicubic antialiased resize of uint8 frames, fused rescale+normalise, an odd frame
count padded by repeating the last frame, then the (t, h/merge, w/merge, merge, merge, C, temporal, patch, patch)
patch layout. tests/test_qwen.py checks it against the processors (and the PIL image processor) where they run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from vtt.shards.sample_meta import mean_interval
from vtt.trainer.models.model_io import read_json

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The video processors' class defaults (transformers 5.24), for checkpoints whose JSON leaves a field out
DEFAULTS = {"qwen2_vl": {"patch_size": 14, "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
                         "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "max_video_tokens": 128000},
            "qwen3_vl": {"patch_size": 16, "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
                         "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3, "max_video_tokens": 768}}
DEFAULTS["qwen2_5_vl"] = DEFAULTS["qwen2_vl"]


@dataclass(frozen=True)
class VideoSpec:
    """The video processor settings of a checkpoint (video_preprocessor_config.json, else its image one)."""
    family: str
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    do_resize: bool = True
    rescale_factor: float = 1 / 255
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_checkpoint(cls, model_path: str, family: str) -> "VideoSpec":
        d = dict(DEFAULTS[family])
        data = read_json(model_path, "video_preprocessor_config.json") or \
            read_json(model_path, "preprocessor_config.json") or {}
        d.update({k: v for k, v in data.items() if v is not None})
        size = dict(d["size"])
        size["shortest_edge"] = d.get("min_pixels") or size.get("shortest_edge")
        size["longest_edge"] = d.get("max_pixels") or size.get("longest_edge")
        return cls(family, int(d["patch_size"]), int(d.get("temporal_patch_size", 2)), int(d.get("merge_size", 2)),
                   int(size["shortest_edge"]), int(size["longest_edge"]), tuple(d["image_mean"]),
                   tuple(d["image_std"]), bool(d.get("do_resize", True)), float(d.get("rescale_factor", 1 / 255)),
                   bool(d.get("cap_pixels_per_frame") or False), int(d["max_video_tokens"]))

    def resized(self, t: int, h: int, w: int) -> tuple[int, int]:
        """(height, width) the processor resizes t frames of h x w to."""
        if not self.do_resize:
            if h % self.factor or w % self.factor:
                raise ValueError(f"frames of {h}x{w} are not a multiple of patch x merge = {self.factor} and the "
                                 "checkpoint's video processor has do_resize=false: extract frames at a multiple")
            return h, w
        if self.family == "qwen3_vl":
            max_pixels = self.max_pixels
            if self.cap_pixels_per_frame:
                per = max(min(self.max_video_tokens * self.factor ** 2, self.max_pixels // t),
                          int(self.min_pixels * 1.05))
                max_pixels = per * t
            return smart_resize_3d(t, h, w, self.temporal_patch_size, self.factor, self.min_pixels, max_pixels)
        # heavy: transformers (~1.5 s); this module loads without it
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            total = int(self.max_video_tokens * self.factor ** 2 * 0.9)
            max_pixels = max(min(max_pixels, total * self.temporal_patch_size // t), int(self.min_pixels * 1.05))
        return smart_resize(h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=max_pixels)

    def num_tokens(self, t: int, h: int, w: int) -> int:
        """Video tokens (not counting Qwen3-VL's time stamps and start/end tokens) for t frames of h x w."""
        rh, rw = self.resized(t, h, w)
        return math.ceil(t / self.temporal_patch_size) * (rh // self.patch_size) * (rw // self.patch_size) \
            // self.merge_size ** 2


def smart_resize_3d(num_frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int,
                    max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's smart_resize (video_processing_qwen3_vl, which imports torchvision at module level)."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_video_processor(model_path: str | None, probe: bool = False):
    """The checkpoint's own video processor, or None where it cannot run (no torchvision); probe=True: only
    whether it could (True or None)."""
    # optional: torchvision; heavy: transformers (~1.5 s); this module loads without it
    from transformers.utils import is_torchvision_available
    if not is_torchvision_available():
        return None
    try:  # optional: torchvision
        import torchvision  # noqa: F401  (a CUDA-only wheel beside a CPU torch fails here)
    except Exception:
        return None
    if probe:
        return True
    from transformers import AutoVideoProcessor  # heavy: transformers
    return AutoVideoProcessor.from_pretrained(model_path)


def patchify(video: torch.Tensor, spec: VideoSpec) -> tuple[torch.Tensor, list[int]]:
    """(T,C,H,W) float -> (t*h*w, C*temporal*patch*patch) patches and [t, h, w], Qwen2VLVideoProcessor.patchify."""
    tp, p, m = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    if pad := -video.shape[0] % tp:  # an odd count: the last frame repeats, as the processors do
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = video.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = video.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), [gt, gh, gw]


def port_video(frames: np.ndarray, spec: VideoSpec) -> tuple[torch.Tensor, list[int]]:
    """uint8 (T,H,W,3) -> (pixel_values_videos, [t, h, w]) as the family's video processor computes them."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    h, w = spec.resized(len(frames), x.shape[-2], x.shape[-1])
    if (h, w) != tuple(x.shape[-2:]):  # torchvision's uint8 bicubic: antialiased in float, rounded back
        x = F.interpolate(x.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    scale = 1.0 / spec.rescale_factor  # rescale and normalise fused, as BaseVideoProcessor does
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * scale
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * scale
    return patchify((x.float() - mean) / std, spec)


def group_times(times: list[float], temporal: int) -> list[float]:
    """One time per temporal patch: the mean of its first and last frame (Qwen3VLProcessor._calculate_timestamps
    with the real pts instead of index / fps); an odd count repeats the last time like the last frame."""
    times = list(times) + [times[-1]] * (-len(times) % temporal)
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


def video_inputs(frames: np.ndarray, times: list[float], spec: VideoSpec, processor=None) -> dict:
    """{pixel_values_videos, video_grid_thw (3,), times (one per temporal patch), second_per_grid}."""
    spec.resized(len(frames), frames.shape[1], frames.shape[2])  # raises on sizes the model cannot take
    if processor is not None:
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        out = processor(videos=[video], do_sample_frames=False, return_tensors="pt")
        pix, grid = out["pixel_values_videos"], out["video_grid_thw"][0]
    else:
        pix, grid = port_video(frames, spec)
        grid = torch.tensor(grid, dtype=torch.long)
    # Qwen2.5-VL: seconds per temporal patch = temporal x the clip's mean frame interval (its processor: 2 / fps)
    interval = mean_interval(times)
    return {"pixel_values_videos": pix, "video_grid_thw": grid, "times": group_times(times, spec.temporal_patch_size),
            "second_per_grid": spec.temporal_patch_size * interval}
