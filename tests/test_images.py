"""trainer/inputs/images.py: uint8 frames -> normalised (T,3,h,w) float tensors, torch only."""
import numpy as np
import pytest
import torch
from PIL import Image

from vtt.trainer.inputs.images import to_pixel_values

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def test_normalisation_is_exact_without_resize():
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    x = to_pixel_values(frames, (5, 7), CLIP_MEAN, CLIP_STD)
    assert x.shape == (3, 3, 5, 7) and x.dtype == torch.float32
    mean, std = np.array(CLIP_MEAN)[:, None, None], np.array(CLIP_STD)[:, None, None]
    want = (frames.transpose(0, 3, 1, 2) / 255.0 - mean) / std
    assert np.allclose(x.numpy(), want, atol=1e-5)
    assert torch.equal(to_pixel_values(list(frames), (5, 7), CLIP_MEAN, CLIP_STD), x)


def test_resize_matches_pillow_bicubic_closely():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    frame = np.asarray(Image.fromarray(small).resize((64, 48), Image.BICUBIC))  # smooth content
    x = to_pixel_values(frame[None], (24, 32), [0, 0, 0], [1, 1, 1], fit="stretch")
    ref = np.asarray(Image.fromarray(frame).resize((32, 24), Image.BICUBIC)).transpose(2, 0, 1) / 255.0
    assert x.shape == (1, 3, 24, 32)
    assert np.abs(x[0].numpy() - ref).mean() < 0.02


def test_crop_keeps_aspect_and_centres():
    # 10x30 frame: left third red, middle green, right third blue -> a square crop shows only green
    frame = np.zeros((10, 30, 3), np.uint8)
    frame[:, :10, 0], frame[:, 10:20, 1], frame[:, 20:, 2] = 255, 255, 255
    crop = to_pixel_values(frame[None], (8, 8), [0, 0, 0], [1, 1, 1], resize="nearest")
    assert crop.shape == (1, 3, 8, 8)
    assert torch.all(crop[0, 1] == 1) and torch.all(crop[0, 0] == 0) and torch.all(crop[0, 2] == 0)
    stretch = to_pixel_values(frame[None], (8, 8), [0, 0, 0], [1, 1, 1], resize="nearest", fit="stretch")
    assert stretch[0, 0, :, 0].eq(1).all() and stretch[0, 2, :, -1].eq(1).all()
    up = to_pixel_values(frame[None], (40, 40), [0, 0, 0], [1, 1, 1])
    assert up.shape == (1, 3, 40, 40) and 0 <= up.min() and up.max() <= 1  # clamped bicubic overshoot


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="uint8"):
        to_pixel_values(np.zeros((2, 4, 4, 3), np.float32), (4, 4), CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match=r"\(T,H,W,3\)"):
        to_pixel_values(np.zeros((4, 4, 3), np.uint8), (4, 4), CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="no frames"):
        to_pixel_values([], (4, 4), CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="resize"):
        to_pixel_values(np.zeros((1, 4, 4, 3), np.uint8), (4, 4), CLIP_MEAN, CLIP_STD, resize="lanczos")
