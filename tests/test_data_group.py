"""data.group_by_length (trainer/data/group.py): length-sorted windows of micro batches on real tars; every sample
once per epoch, the same batches per rank, an exact resume anywhere (corrupt samples included), the setting."""
import json

import pytest
from test_data import take, write_shards
from test_data_batches import NO_TITLE

from vtt.shards.conversation import SampleError
from vtt.shards.format import ShardFormatError
from vtt.trainer.config import ConfigError, config_from_dict, load_config
from vtt.trainer.data.loader import DataConfig, StreamPosition, build_loader

WINDOW = 3


def size_of(key, n):
    """A length per sample that is not the stream's order: (n * 37) % 50."""
    return {"size": (n * 37) % 50, "title": None if key in NO_TITLE else f"clip {n}"}


def length(sample, frames):
    assert frames == (2, 6, 8)  # the frames' count and size, read from the tar without decoding them
    return sample["meta"]["size"],


def sizes(samples):
    """A collate that rejects the samples with a meta "title" of None (SampleError), as an adapter does."""
    for s in samples:
        if s["meta"].get("title", "") is None:
            raise SampleError(f"sample {s['key']!r}: needs field 'title'")
    return [(s["key"], s["meta"]["size"]) for s in samples]


def loader(cfg, rank=0, world=1, start=None, micro=2):
    return build_loader(cfg, sizes, micro, rank, world, start=start, length_fn=length)


def windows(batches, workers):
    """The rank's batches of one epoch grouped by (stream, window)."""
    out = {}
    for i, b in enumerate(batches):
        out.setdefault((i % workers, i // workers // WINDOW), []).append(b)
    return list(out.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_windows_are_length_sorted_every_sample_once_same_batches_per_rank(tmp_path, workers):
    folder = write_shards(tmp_path, [7, 9, 6, 8, 10, 8], meta=lambda k, n: {"size": (n * 37) % 50})
    cfg = DataConfig(str(folder), num_workers=workers, shuffle_buffer=5, seed=3, group_by_length=True,
                     group_window=WINDOW)
    plain = DataConfig(str(folder), num_workers=workers, shuffle_buffer=5, seed=3)
    per_rank, counts = [], []
    for rank in (0, 1):
        grouped = loader(cfg, rank, 2)
        n = len(grouped)
        batches = take(grouped, n)
        counts.append(n)
        ungrouped = take(build_loader(plain, sizes, 2, rank, 2), n)
        assert sorted(sum(batches, [])) == sorted(sum(ungrouped, []))  # the same samples, only reordered
        for win in windows(batches, max(workers, 1)):
            flat = sorted(x for b in win for _, x in b)
            cut = [flat[a:a + 2] for a in range(0, len(flat), 2)]
            assert sorted([x for _, x in b] for b in win) == cut  # each batch a slice of the sorted window
        per_rank.append(sum(batches, []))
        orders = [[min(x for _, x in b) for b in w] for w in windows(batches, max(workers, 1))]
        assert any(o != sorted(o) for o in orders)  # batch order within a window drawn, not ascending
    assert counts[0] == counts[1] == 48 // 4
    keys = [k for k, _ in per_rank[0] + per_rank[1]]
    assert sorted(keys) == [f"v{i:04d}" for i in range(48)]


@pytest.mark.parametrize("workers", [0, 2])
def test_grouped_resume_is_exact_with_corrupt_samples(tmp_path, workers):
    # a damaged frame fails only when its batch is decoded, a bad json while the window is read, a missing
    # title in the collate: all three are replaced and a resume anywhere replays them exactly
    folder = write_shards(tmp_path, [6, 8, 7, 9, 6], meta=size_of,
                          damage={**dict.fromkeys(("v0003", "v0009", "v0021", "v0027", "v0033"), "jpeg"),
                                  "v0016": "json", "v0030": "json"})
    cfg = DataConfig(str(folder), num_workers=workers, shuffle_buffer=4, seed=1, group_by_length=True,
                     group_window=WINDOW)
    full_loader = loader(cfg, 1, 2)  # rank 1 of 2: 9 batches an epoch, the last window of a stream shorter
    n = len(full_loader)
    full = take(full_loader, n + 4)  # into epoch 1
    counts = full_loader.corrupt
    assert set(counts) == {"bad_image", "bad_json", "bad_sample"}  # (epoch 1 meets some again)
    for k in range(1, n + 4):
        first = loader(cfg, 1, 2)
        assert take(first, k) == full[:k]
        state = json.loads(json.dumps(first.state()))
        resumed = loader(cfg, 1, 2, start=state)
        assert take(resumed, n + 4 - k) == full[k:], f"resume after {k} batches"
        assert resumed.corrupt == counts, f"resume after {k}: counted twice or lost"


def test_grouping_change_refuses_exact_resume(tmp_path):
    folder = write_shards(tmp_path, [8, 8], meta=size_of)
    plain = DataConfig(str(folder))
    first = build_loader(plain, sizes, 2)
    take(first, 2)
    grouped = DataConfig(str(folder), group_by_length=True, group_window=WINDOW)
    with pytest.raises(ValueError, match="group_window was 0, now 3"):
        loader(grouped, start=first.state())
    legacy = {k: v for k, v in first.state().items() if k != "group_window"}  # saved before grouping existed
    with pytest.raises(ValueError, match="group_window was 0, now 3"):
        loader(grouped, start=legacy)
    assert StreamPosition.from_dict({"epoch": 2}).group_window is None  # nothing saved: nothing to compare
    with pytest.raises(ValueError, match="the samples' length"):
        build_loader(grouped, sizes, 2)
    eval_cfg = DataConfig(str(folder), eval_fraction=0.5, group_by_length=True)
    assert build_loader(eval_cfg, sizes, 2, split="eval")  # eval is never grouped: no length needed


def test_two_lengths_sort_in_strips_of_about_sqrt_batches():
    import random

    from vtt.trainer.data.group import sorted_samples
    rng = random.Random(0)
    lengths = [(rng.randrange(40), rng.randrange(40)) for _ in range(64)]  # 16 batches of 4: strips of 4 batches
    order = sorted_samples(lengths, 4)
    assert sorted(order) == list(range(64))
    strips = [[lengths[i] for i in order[a:a + 16]] for a in range(0, 64, 16)]
    assert all(max(x[0] for x in a) <= min(x[0] for x in b) for a, b in zip(strips, strips[1:]))
    assert all([x[1] for x in s] == sorted(x[1] for x in s) for s in strips)
    assert sorted_samples([(3,), (1,), (2,), (1,)], 2) == [1, 3, 2, 0]  # one length: a stable sort


def test_window_longer_than_the_epoch_and_text_only(tmp_path):
    folder = write_shards(tmp_path, [5, 6], meta=lambda k, n: {"size": (n * 37) % 50})
    cfg = DataConfig(str(folder), group_by_length=True, group_window=64, decode_frames=False, shuffle_buffer=0)
    got = build_loader(cfg, sizes, 2, length_fn=lambda s, f: [f is None and s["meta"]["size"]])
    batches = take(got, len(got))
    flat = sorted(x for b in batches for _, x in b)
    assert len(batches) == 5 and sorted([x for _, x in b] for b in batches) == [flat[a:a + 2] for a in range(0, 10, 2)]
    with pytest.raises(ShardFormatError):
        build_loader(DataConfig(str(folder), group_by_length=True), sizes, 16, length_fn=length)


def test_setting_round_trips_through_flags_yaml_and_set(tmp_path):
    from click.testing import CliRunner

    from vtt.trainer.cli import main
    args = ["--model", "llava", "--preset", "tiny", "--shards", "S", "--output-dir", str(tmp_path), "--print-config"]
    for extra, want in (([], "group_by_length: false"), (["--group-by-length"], "group_by_length: true"),
                        (["--group-by-length", "--no-group-by-length"], "group_by_length: false")):
        r = CliRunner().invoke(main, args + extra)
        assert r.exit_code == 0 and want in r.output and "group_window: 32" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--set", "data.group_window=8", "--group-by-length"])
    assert "group_window: 8" in r.output and "group_by_length: true" in r.output
    assert "--group-by-length" in CliRunner().invoke(main, ["--help"]).output
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model: {{kind: seq2seq, model_path: m}}\nrun: {{output_dir: {tmp_path}}}\n"
                    "data: {shards: S, group_by_length: yes, group_window: 16}\n")
    data = load_config(yaml, {}).data
    assert data.group_by_length is True and data.group_window == 16
    tree = {"model": {"kind": "seq2seq", "model_path": "m"}, "run": {"output_dir": str(tmp_path)},
            "data": {"shards": "S", "group_by_length": True}}
    tree["data"]["group_window"] = 0
    with pytest.raises(ConfigError, match="group_window must be >= 1"):
        config_from_dict(tree)


CONV = [{"from": "human", "value": "<video>\nWhat colour is it?"}, {"from": "gpt", "value": "red, mostly"},
        {"from": "human", "value": "And where does it go?"}, {"from": "gpt", "value": "to the left, then up"}]


@pytest.mark.parametrize("kind,family", [("llava", "llava_next_video"), ("llava", "llava_onevision"),
                                         ("qwen_vl", "qwen2_5_vl"), ("qwen_vl", "qwen3_vl"), ("seq2seq", None)])
def test_sample_length_is_the_tokens_a_sample_makes_alone(tmp_path, kind, family):
    """Each adapter's sample_length, from the text and the frames' (count, height, width) only, against the ids
    its collate makes of the sample alone (source + target for seq2seq): captions and conversations."""
    import numpy as np

    from vtt.trainer.models.model_config import ModelConfig
    from vtt.trainer.models.presets import build_tiny
    from vtt.trainer.models.registry import get_adapter
    adapter = get_adapter(ModelConfig(kind=kind, model_path=str(build_tiny(kind, tmp_path / kind, family=family))))
    rng = np.random.default_rng(0)
    samples = [{"key": f"k{i}", "text": "t", "frames": rng.integers(0, 256, (t, 40, 56, 3), dtype=np.uint8),
                "meta": {"description": " ".join(["a red ball"] * (i + 1)),
                         # real pts (Qwen3-VL writes one stamp per temporal patch into the text): 0, 1.37, 2.74 s...
                         "vtt": {"timestamps": [round(k * 1.37 * (i + 1), 3) for k in range(t)]},
                         **({"conversations": CONV[:2 + 2 * (i % 2)]} if kind != "seq2seq" else {})}}
               for i, t in enumerate((2, 5, 8))]
    got = [adapter.sample_length(dict(s, frames=None), s["frames"].shape[:3]) for s in samples]
    alone = [adapter.collate([s]) for s in samples]
    want = [b["input_ids"].shape[1] + (b["labels"].shape[1] if kind == "seq2seq" else 0) for b in alone]
    assert [sum(x) for x in got] == want and len(set(want)) == 3
    assert {len(x) for x in got} == {1 if kind == "qwen_vl" else 2}  # what a padded batch pads on its own
    if kind == "llava":  # (video, text): the video part follows the frames alone
        assert [v for v, _ in got] == [adapter.layout.num_tokens(t) for t in (2, 5, 8)]
    if kind == "seq2seq":
        assert got == [(b["input_ids"].shape[1], b["labels"].shape[1]) for b in alone]
    with pytest.raises(SampleError):
        adapter.sample_length({"key": "x", "text": "t", "meta": {}, "frames": None}, (2, 40, 56))


def bench_packing():
    import importlib.util

    from train_helpers import REPO
    spec = importlib.util.spec_from_file_location("bench_packing", REPO / "benchmarks" / "bench_packing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_grouping_cuts_the_padding_of_a_mixed_corpus(tmp_path):
    """benchmarks/bench_packing.py's measure on its mixed corpus, seq2seq (source 3-60, target 2-40 words): the
    same real tokens, far fewer padded ones."""
    rows = bench_packing().run(96, 8, ["seq2seq"], 0, tmp_path, modes=("plain", "grouped"))
    plain, grouped = rows
    assert not plain["grouped"] and grouped["grouped"] and plain["real_tokens"] == grouped["real_tokens"] > 0
    assert plain["real_fraction"] < 0.65 and grouped["real_fraction"] > 0.8


@pytest.mark.parametrize("flags,field", [(["--group-by-length"], "group_by_length"),
                                         (["--balance-tokens"], "balance_tokens")])
def test_grouped_training_resumes_exactly(tmp_path, flags, field):
    """The real DeepSpeed engine, tiny LLaVA on clips of 2-8 frames and 1-3 exchanges, micro 3 x accumulation 2,
    windows of 3 micro batches (length-grouped; or token-balanced: 2-4 samples a micro batch here): a run
    resumed from its step-2 checkpoint (micro batch 4: inside a window) repeats the uninterrupted run's steps
    3-4."""
    import shutil

    from train_helpers import metrics, vtt_train

    from vtt.trainer.run.checkpoint import tag_for
    bench_packing().mixed_corpus(tmp_path / "shards", 24, seed=1, frames=(2, 8), turns=(1, 3), per_shard=6)
    run = tmp_path / "run"
    args = ["--model", "llava", "--preset", "tiny", "--micro-batch", "3", "--grad-accum", "2", "--log-every", "1",
            "--lr", "2e-3", "--warmup-steps", "1", "--no-export", "--keep-last", "0", "--max-steps", 4,
            "--save-every", 2, "--precision", "fp32", "--shards", tmp_path / "shards", "--output-dir", run,
            *flags, "--set", "data.group_window=3"]
    vtt_train(*args)
    assert f"{field}: true" in (run / "config.yaml").read_text()
    got = metrics(run)[0]
    shutil.rmtree(run / "checkpoints" / tag_for(4))
    vtt_train(*args, "--resume")
    after = metrics(run)[0]
    assert "resumed from" in (run / "train.log").read_text() and [x["step"] for x in after] == [1, 2, 3, 4]
    for a, b in zip(got[2:], after[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), (a, b)
