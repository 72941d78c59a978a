"""Frames -> normalised pixel tensors with the model's own size/mean/std, in torch only.

HF image/video processors need torchvision, which does not import with the local CPU torch wheel, so
this reimplements the part training needs: CLIP-style resize (shortest edge, then centre crop) or a
plain stretch, rescale to [0, 1], normalise.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

RESIZE_MODES = ("bicubic", "bilinear", "nearest")
FITS = ("crop", "stretch")


def _as_uint8_video(frames) -> torch.Tensor:
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("to_pixel_values: no frames")
        frames = np.stack([np.asarray(f) for f in frames])
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(f"to_pixel_values: expected uint8 frames (T,H,W,3), got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        arr = arr.copy()
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    smooth = mode in ("bicubic", "bilinear")
    # antialias only matters (and is only supported) for smooth downscaling
    return F.interpolate(x, size=size, mode=mode, align_corners=False if smooth else None,
                         antialias=smooth)


def _crop_resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Scale so the frame covers `size` (aspect kept), then centre-crop, as CLIP processors do."""
    h, w = x.shape[-2:]
    scale = max(size[0] / h, size[1] / w)
    inter = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    x = _resize(x, inter, mode)
    top, left = (inter[0] - size[0]) // 2, (inter[1] - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


def to_pixel_values(frames, size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                    resize: str = "bicubic", fit: str = "crop") -> torch.Tensor:
    """uint8 frames (T,H,W,3) (array, tensor or list of (H,W,3)) -> float32 (T,3,h,w), normalised."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    size = (int(size[0]), int(size[1]))
    if min(size) < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"to_pixel_values: bad size {size} / mean {mean} / std {std}")
    x = _as_uint8_video(frames).float().div_(255.0)
    x = _crop_resize(x, size, resize) if fit == "crop" else _resize(x, size, resize)
    x = x.clamp_(0.0, 1.0)  # bicubic overshoots; the processors work on clipped uint8 images
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()
