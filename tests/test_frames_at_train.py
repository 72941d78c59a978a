"""Frames chosen at train time (data.num_frames / frame_sampling) on real vtt-prep shards of 8 frames."""
from __future__ import annotations


import numpy as np
import pytest

from vtt.trainer.data.loader import DataConfig, build_loader
from vtt.trainer.data.read import FramePick

STORED = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from vtt.pipeline.config import PrepConfig
    from vtt.pipeline.run import run_extract
    from vtt.pipeline.sample_data import make_sample_data
    root = tmp_path_factory.mktemp("frames")
    make_sample_data(root / "data", n_train=8, n_heldout=0, seed=0)
    cfg = PrepConfig(data_dir=root / "data" / "train", out_dir=root / "shards", num_frames=STORED, size=(32, 32),
                     workers=2, quiet=True, shard_max_samples=4)
    run_extract(cfg)
    return root / "shards"


def samples(cfg: DataConfig, n: int, start=None, micro=2):
    loader = build_loader(cfg, list, micro_batch=micro, start=start)
    it = iter(loader)
    out = [s for _ in range(n) for s in next(it)]
    return out, loader


def test_uniform_pick_reads_the_evenly_spaced_stored_frames(shards):
    full, _ = samples(DataConfig(str(shards), shuffle_buffer=0), 2)
    cut, _ = samples(DataConfig(str(shards), shuffle_buffer=0, num_frames=3), 2)
    want = [0, 4, 7]  # linspace(0, 7, 3) rounded, as the adapters resample
    for a, b in zip(full, cut):
        assert a["key"] == b["key"] and len(a["frames"]) == STORED and len(b["frames"]) == 3
        assert b["frame_indices"] == want
        assert all(np.array_equal(a["frames"][i], f) for i, f in zip(want, b["frames"]))
        ts = a["meta"]["vtt"]["timestamps"]
        assert len(ts) == STORED and b["meta"]["vtt"]["timestamps"] == [ts[i] for i in want]


def test_as_many_or_more_frames_than_stored_keeps_them_all(shards):
    got, _ = samples(DataConfig(str(shards), num_frames=STORED + 4), 1)
    assert all(len(s["frames"]) == STORED and "frame_indices" not in s for s in got)


def test_random_pick_is_seeded_per_epoch_and_key():
    a = FramePick(3, "random", seed=0, epoch=0)
    assert a.indices(8, "k1") == a.indices(8, "k1") == sorted(set(a.indices(8, "k1")))
    draws = {tuple(FramePick(3, "random", seed=0, epoch=e).indices(8, "k1")) for e in range(8)}
    assert len(draws) > 1  # a new draw each epoch
    assert {tuple(FramePick(3, "random", seed=s, epoch=0).indices(8, "k1")) for s in range(8)} != {draws.pop()}


def test_random_pick_is_exact_on_resume(shards):
    cfg = DataConfig(str(shards), num_frames=3, frame_sampling="random", seed=5)
    whole, _ = samples(cfg, 6)  # 8 samples = 4 batches of 2 an epoch: crosses into the second epoch
    first, loader = samples(cfg, 3)
    rest, _ = samples(cfg, 3, start=loader.state())
    assert [(s["key"], s["frame_indices"]) for s in first + rest] == [(s["key"], s["frame_indices"]) for s in whole]
    assert all(np.array_equal(a["frames"], b["frames"]) for a, b in zip(first + rest, whole))
    by_epoch = {}
    for s in whole:
        by_epoch.setdefault(s["key"], []).append(tuple(s["frame_indices"]))
    assert any(len(set(v)) > 1 for v in by_epoch.values())  # epochs 0 and 1 drew differently


def test_eval_split_picks_uniformly(shards):
    cfg = DataConfig(str(shards), eval_shards=str(shards), num_frames=3, frame_sampling="random")
    batch = next(iter(build_loader(cfg, list, micro_batch=2, split="eval")))
    assert [s["frame_indices"] for s in batch] == [[0, 4, 7]] * 2


def test_bad_settings_are_refused(shards):
    for bad in (dict(num_frames=0), dict(frame_sampling="middle"), dict(video_tokens=0)):
        with pytest.raises(ValueError):
            DataConfig(str(shards), **bad)


@pytest.mark.slow
def test_vtt_train_trains_on_picked_frames(shards, tmp_path):
    """End to end: tiny LLaVA on 3 of the 8 stored frames, picked at random per epoch."""
    from train_helpers import vtt_train
    run = tmp_path / "run"
    p = vtt_train("--model", "llava", "--preset", "tiny", "--shards", shards, "-o", run, "--max-steps", "2",
                  "--micro-batch", "2", "--num-frames", "3", "--frame-sampling", "random", "--no-export",
                  "--save-every", "0", "--set", "run.save_final=false", "--set", "run.progress_bar=false")
    import yaml
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["num_frames"] == 3 and saved["data"]["frame_sampling"] == "random", p.stderr[-2000:]


def test_auto_settings_are_resolved_by_the_run_itself(shards, tmp_path):
    """`auto` micro batch / checkpointing and a video-token budget are made concrete inside run/loop.train (so a
    caller of the library gets them too), shown on stderr and saved concrete in the run's config.yaml."""
    from train_helpers import vtt_train
    run = tmp_path / "run"
    p = vtt_train("--model", "llava", "--preset", "tiny", "--shards", shards, "-o", run, "--max-steps", "1",
                  "--micro-batch", "auto", "--set", "model.gradient_checkpointing=auto", "--device-memory", "2",
                  "--video-tokens", "40", "--no-export", "--save-every", "0", "--set", "run.save_final=false",
                  "--set", "run.progress_bar=false")
    import yaml
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # the card would take 256 of these tiny samples; the shards hold 8: more could not make one step
    assert saved["deepspeed"]["micro_batch_size"] == 8, saved["deepspeed"]
    assert "micro batch at most 8" in p.stderr
    assert saved["model"]["gradient_checkpointing"] in (True, False)
    assert 1 <= saved["data"]["num_frames"] < 8  # the budget cut the 8 stored frames
    assert "estimated peak" in p.stderr and "video-token budget 40" in p.stderr, p.stderr[-2000:]
