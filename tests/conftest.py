"""Shared fixtures. Environment first: tiny ops on 2 cores are far slower with >1 thread, and
DeepSpeed must pick its CPU accelerator before it is imported anywhere."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REAL_VIDEOS = Path(__file__).resolve().parent / "videos"


@pytest.fixture(scope="session")
def real_videos() -> Path:
    """The real-world clips kept in tests/videos (sources and licences in its SOURCES.md)."""
    if not REAL_VIDEOS.is_dir():
        pytest.fail(f"{REAL_VIDEOS} is missing: the real-world clips are part of the test corpus")
    return REAL_VIDEOS
