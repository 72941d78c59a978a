"""Micro batches of the streaming reader: adapter rejections go through on_corrupt; shards interleave."""
import json
from collections import Counter

import pytest
from test_data import keys_of, take, write_shards

from vtt.shards.conversation import SampleError
from vtt.trainer.models.registry import get_adapter
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.inputs.text import render
from vtt.trainer.data.loader import CorruptSampleError, DataConfig, build_loader
from vtt.trainer.models.presets import build_tiny

NO_TITLE = {"v0005", "v0011"}


def titled(key, n):
    return {} if key in NO_TITLE else {"title": f"clip {n}"}


def title_collate(samples):
    """An adapter-like collate: renders a template per sample (raises SampleError naming the key)."""
    return [(s["key"], render("{title}", s, "target_template")) for s in samples]


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_rejection_is_counted_replaced_and_resumes_exactly(tmp_path, workers):
    folder = write_shards(tmp_path, [6, 6, 6, 6], meta=titled)
    cfg = DataConfig(str(folder), num_workers=workers, shuffle_buffer=4, seed=2)
    loader = build_loader(cfg, title_collate, 3)
    n = len(loader)  # 24 // 3 = 8
    full = take(loader, n)
    got = [k for b in full for k, _ in b]
    # full batches; the two rejected samples are replaced by the next ones of the sequence (it wraps around)
    assert all(len(b) == 3 for b in full) and not NO_TITLE & set(got) and len(set(got)) == 22
    assert loader.corrupt == {"bad_sample": 2}
    assert {e["key"] for e in loader.corrupt_events} == NO_TITLE
    assert all("needs field 'title'" in e["reason"] and e["shard"].endswith(".tar") for e in loader.corrupt_events)
    for k in range(1, n):  # resume anywhere: exactly the remaining batches, whatever collate dropped before
        first = build_loader(cfg, title_collate, 3)
        take(first, k)
        resumed = build_loader(cfg, title_collate, 3, start=json.loads(json.dumps(first.state())))
        assert take(resumed, n - k) == full[k:], f"resume after {k}"
    stop = DataConfig(str(folder), num_workers=workers, shuffle_buffer=4, seed=2, on_corrupt="stop")
    with pytest.raises(CorruptSampleError, match=r"shard-00000[01]\.tar: sample v00(05|11): bad_sample"):
        take(build_loader(stop, title_collate, 3), n)


def test_collate_that_rejects_every_sample_stops(tmp_path):
    folder = write_shards(tmp_path, [4, 4], meta=lambda key, n: {})
    with pytest.raises(CorruptSampleError, match="in a row.*bad_sample.*needs field 'title'"):
        take(build_loader(DataConfig(str(folder)), title_collate, 2), 1)


def test_collate_errors_that_name_no_single_sample_surface(tmp_path):
    def pairs_only(samples):  # rejects a batch no single sample explains: an adapter problem, not data
        if len(samples) > 1:
            raise SampleError("batch of two: no")
        return keys_of(samples)

    with pytest.raises(SampleError, match="batch of two") as e:
        take(build_loader(DataConfig(str(write_shards(tmp_path, [4]))), pairs_only, 2), 1)
    assert "every sample of it alone" in "".join(e.value.__notes__)


@pytest.mark.parametrize("workers", [0, 2])
def test_real_seq2seq_collate_skips_a_sample_its_template_cannot_fill(tmp_path, workers):
    model = build_tiny("seq2seq", tmp_path / "s2s")
    adapter = get_adapter(ModelConfig(kind="seq2seq", model_path=str(model), source_template="{text}",
                                     target_template="{title}"))
    folder = write_shards(tmp_path / "shards", [6, 6], meta=titled)
    cfg = DataConfig(str(folder), num_workers=workers, decode_frames=False)
    loader = build_loader(cfg, adapter.collate, 2)
    batches = take(loader, len(loader))
    assert [b["input_ids"].shape[0] for b in batches] == [2] * 6
    assert loader.corrupt == {"bad_sample": 2} and {e["key"] for e in loader.corrupt_events} == NO_TITLE


# ---------------------------------------------------------------- interleaving

CLASSES = 8


def sorted_corpus(folder):
    """A folder-sorted corpus: 8 classes x 2 shards x 32 samples, each shard holding neighbouring files of
    one class and more samples than the shuffle buffer (like 1000-sample shards and a 256 buffer)."""
    return write_shards(folder, [32] * (CLASSES * 2), frames=1, meta=lambda key, n: {"cls": n // 64})


def class_mix(cfg, micro=8, world=1):
    """Distinct classes per micro batch over one epoch of every rank."""
    per_rank = []
    for rank in range(world):
        loader = build_loader(cfg, lambda s: [x["meta"]["cls"] for x in s], micro, rank, world)
        per_rank.append(take(loader, len(loader)))
    return [len(set(b)) for batches in per_rank for b in batches], per_rank


@pytest.mark.parametrize("workers", [0, 2])
def test_interleaving_mixes_classes_of_a_sorted_corpus(tmp_path, workers, capsys):
    folder = sorted_corpus(tmp_path)
    mix = {}
    for k in (1, 2, 4, 8):
        cfg = DataConfig(str(folder), shuffle_buffer=8, interleave_shards=k, num_workers=workers, seed=5,
                         decode_frames=False)
        distinct, per_rank = class_mix(cfg, world=2)
        mix[k] = sum(distinct) / len(distinct)
        seen = Counter(c for batches in per_rank for b in batches for c in b)
        assert sum(seen.values()) == 512 and set(seen.values()) == {64}  # still every sample once
    with capsys.disabled():
        print("\ndistinct classes per 8-sample batch (8 classes, folder-sorted, buffer 8): "
              + ", ".join(f"interleave {k}: {v:.2f}" for k, v in mix.items()))
    assert mix[1] < 1.8 and mix[4] >= 2.6 and mix[8] >= 3.8 and mix[1] < mix[2] < mix[4] < mix[8]


def test_interleaved_resume_and_rank_split_are_exact(tmp_path):
    folder = write_shards(tmp_path, [5, 9, 2, 7, 3, 6, 1, 8])  # 41 samples, uneven shards
    cfg = DataConfig(str(folder), shuffle_buffer=5, interleave_shards=3, num_workers=2, seed=9)
    ranks = []
    for rank in (0, 1):
        loader = build_loader(cfg, keys_of, 2, rank, 2)
        n = len(loader)
        full = take(loader, 2 * n + 1)
        ranks.append(sum(full[:n], []))
        for k in (1, n - 1, n + 2):
            first = build_loader(cfg, keys_of, 2, rank, 2)
            take(first, k)
            assert take(build_loader(cfg, keys_of, 2, rank, 2, start=first.state()), 2 * n + 1 - k) == full[k:]
    assert len(ranks[0]) == len(ranks[1]) == 20 and len(set(ranks[0] + ranks[1])) == 40


def test_interleave_change_refuses_exact_resume(tmp_path):
    cfg = DataConfig(str(write_shards(tmp_path, [4] * 4)), interleave_shards=2)
    loader = build_loader(cfg, keys_of, 2)
    take(loader, 1)
    with pytest.raises(ValueError, match="interleave_shards was 2, now 4"):
        build_loader(DataConfig(cfg.shards), keys_of, 2, start=loader.state())


def test_new_data_fields_are_flags_and_set_keys(tmp_path):
    from vtt.trainer.cli import main, overrides_from_flags
    from vtt.trainer.config import ConfigError, load_config
    argv = ["--model", "seq2seq", "--model-path", "M", "--shards", "S", "--output-dir", str(tmp_path),
            "--interleave-shards", "2", "--data-resume", "next_epoch"]
    params = main.make_context("vtt-train", argv).params
    cfg = load_config(None, overrides_from_flags(params, params["sets"]))
    assert cfg.data.interleave_shards == 2 and cfg.data.resume == "next_epoch"
    over = overrides_from_flags({"kind": "seq2seq", "model_path": "M", "shards": "S", "output_dir": str(tmp_path)},
                                ("data.interleave_shards=1", "data.resume=exact"))
    cfg = load_config(None, over)
    assert cfg.data.interleave_shards == 1 and cfg.data.resume == "exact"
    with pytest.raises(ConfigError, match="interleave_shards must be >= 1"):
        load_config(None, {**over, "data": {"shards": "S", "interleave_shards": 0}})
    with pytest.raises(ConfigError, match="resume must be one of"):
        load_config(None, {**over, "data": {"shards": "S", "resume": "sometimes"}})


def test_positions_saved_before_snapshots_resume_as_one_shard_a_stream(tmp_path):
    cfg = DataConfig(str(write_shards(tmp_path, [4] * 4)), interleave_shards=1, shuffle_buffer=3)
    full = take(build_loader(cfg, keys_of, 2), 8)
    loader = build_loader(cfg, keys_of, 2)
    take(loader, 3)
    old = {k: v for k, v in loader.state().items()  # what the reader wrote before this change
           if k in ("epoch", "batch", "raw", "corrupt", "world_size", "num_workers", "micro_batch", "seed",
                    "num_samples")}
    assert take(build_loader(cfg, keys_of, 2, start=old), 5) == full[3:]
    with pytest.raises(ValueError, match="interleave_shards was 1, now 4"):
        build_loader(DataConfig(cfg.shards, shuffle_buffer=3), keys_of, 2, start=old)
