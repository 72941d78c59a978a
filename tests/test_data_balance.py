"""data.balance_tokens (trainer/data/group.py): a window's samples cut into its micro batches by token cost, not by
count. The cuts against a brute force, every sample once with the batch count unchanged, an exact resume with
corrupt samples, the setting, and the mixed corpus of benchmarks/bench_packing.py."""
import itertools
import json
import random

import pytest
from test_data import take, write_shards
from test_data_group import WINDOW, bench_packing, length, loader, size_of, sizes

from vtt.trainer.data.group import balanced_packed, balanced_padded, padded_cost, sorted_samples, window_batches
from vtt.trainer.data.loader import DataConfig, build_loader


def best_contiguous(lengths, order, m):
    """The least largest padded_cost over every cut of `order` into m non-empty runs (brute force)."""
    best = None
    for cut in itertools.combinations(range(1, len(order)), m - 1):
        bounds = (0, *cut, len(order))
        worst = max(padded_cost([lengths[i] for i in order[a:b]]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("dims", [1, 2])
def test_padded_cuts_are_the_least_largest_batch_of_contiguous_runs(dims):
    rng = random.Random(dims)
    for trial in range(40):
        n, m = rng.randrange(2, 11), None
        m = rng.randrange(1, n + 1)
        lengths = [tuple(rng.randrange(1, 60) for _ in range(dims)) for _ in range(n)]
        order = sorted_samples(lengths, max(1, n // m))
        runs = balanced_padded(lengths, order, m)
        assert len(runs) == m and all(runs) and [i for r in runs for i in r] == order, (lengths, m, runs)
        got = max(padded_cost([lengths[i] for i in r]) for r in runs)
        assert got == best_contiguous(lengths, order, m), (trial, lengths, m, runs)


def test_packed_bins_hold_about_equal_tokens():
    rng = random.Random(0)
    for _ in range(30):
        m = rng.randrange(1, 12)
        lengths = [(rng.randrange(1, 500), rng.randrange(1, 80)) for _ in range(m * rng.randrange(1, 9))]
        bins = balanced_packed(lengths, m)
        assert len(bins) == m and all(bins) and sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(b == sorted(b) for b in bins)  # the stream's order inside a bin
        load = [sum(sum(lengths[i]) for i in b) for b in bins]
        assert max(load) <= sum(load) / m + max(map(sum, lengths))  # LPT: within one sample of the mean
    # a window of one very long sample and many short ones: the long one gets a bin of its own
    lengths = [(400,)] + [(10,)] * 15
    assert [0] in balanced_packed(lengths, 4) and [[0]] == [b for b in window_batches(lengths, 4, "padded") if 0 in b]


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_balanced_batches_every_sample_once_same_count_per_rank(tmp_path, packing, workers):
    folder = write_shards(tmp_path, [7, 9, 6, 8, 10, 8], meta=lambda k, n: {"size": 1 + (n * 37) % 50})
    common = dict(num_workers=workers, shuffle_buffer=5, seed=3, group_window=WINDOW, packing=packing)
    cost = (lambda b: sum(x for _, x in b)) if packing else (lambda b: len(b) * max(x for _, x in b))
    largest = {}
    for name, extra in (("count", {"group_by_length": True}), ("tokens", {"balance_tokens": True})):
        per_rank, counts, sizes_seen, top = [], [], set(), 0
        for rank in (0, 1):
            got = loader(DataConfig(str(folder), **common, **extra), rank, 2, micro=4)
            batches = take(got, len(got))
            counts.append(len(batches))
            sizes_seen |= {len(b) for b in batches}
            top = max(top, max(map(cost, batches)))
            per_rank.append([k for b in batches for k, _ in b])
            if name == "tokens":
                state = got.state()
                assert state["balance"] == ("packed" if packing else "padded") and state["group_window"] == WINDOW
        assert counts == [6, 6]  # 48 samples, micro 4, 2 ranks: the batch count is the index's
        assert sorted(per_rank[0] + per_rank[1]) == [f"v{i:04d}" for i in range(48)]
        assert (sizes_seen == {4}) == (name == "count"), sizes_seen
        largest[name] = top
    assert largest["tokens"] < largest["count"]


@pytest.mark.parametrize("packing", [False, True])
def test_balanced_resume_is_exact_with_corrupt_samples(tmp_path, packing):
    folder = write_shards(tmp_path, [6, 8, 7, 9, 6], meta=size_of,
                          damage={**dict.fromkeys(("v0003", "v0009", "v0021", "v0027"), "jpeg"),
                                  "v0016": "json", "v0030": "json"})
    cfg = DataConfig(str(folder), num_workers=2, shuffle_buffer=4, seed=1, balance_tokens=True,
                     group_window=WINDOW, packing=packing)
    full_loader = loader(cfg, 1, 2)
    n = len(full_loader)
    full = take(full_loader, n + 3)
    counts = full_loader.corrupt
    assert set(counts) == {"bad_image", "bad_json", "bad_sample"}
    assert len({len(b) for b in full}) > 1 or packing
    for k in range(1, n + 3):
        first = loader(cfg, 1, 2)
        assert take(first, k) == full[:k]
        resumed = loader(cfg, 1, 2, start=json.loads(json.dumps(first.state())))
        assert take(resumed, n + 3 - k) == full[k:], f"resume after {k} batches"
        assert resumed.corrupt == counts, f"resume after {k}: counted twice or lost"


def test_balance_change_refuses_exact_resume_and_needs_a_length(tmp_path):
    folder = write_shards(tmp_path, [8, 8], meta=size_of)
    grouped = loader(DataConfig(str(folder), group_by_length=True, group_window=WINDOW))
    take(grouped, 2)
    balanced = DataConfig(str(folder), balance_tokens=True, group_window=WINDOW)
    with pytest.raises(ValueError, match="balance was , now padded"):
        loader(balanced, start=grouped.state())
    legacy = {k: v for k, v in grouped.state().items() if k != "balance"}  # saved before balancing existed
    with pytest.raises(ValueError, match="balance was , now padded"):
        loader(balanced, start=legacy)
    with pytest.raises(ValueError, match="the samples' length"):
        build_loader(balanced, sizes, 2)
    eval_cfg = DataConfig(str(folder), eval_fraction=0.5, balance_tokens=True)
    assert build_loader(eval_cfg, sizes, 2, split="eval")  # eval batches stay micro_batch samples
    assert length  # the shared length function reads frames without decoding them (test_data_group)


def test_setting_round_trips_through_flags_and_yaml(tmp_path):
    from click.testing import CliRunner

    from vtt.trainer.cli import main
    from vtt.trainer.config import load_config
    args = ["--model", "llava", "--preset", "tiny", "--shards", "S", "--output-dir", str(tmp_path), "--print-config"]
    for extra, want in (([], "balance_tokens: false"), (["--balance-tokens"], "balance_tokens: true"),
                        (["--balance-tokens", "--no-balance-tokens"], "balance_tokens: false")):
        r = CliRunner().invoke(main, args + extra)
        assert r.exit_code == 0 and want in r.output, r.output
    assert "--balance-tokens" in CliRunner().invoke(main, ["--help"]).output
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model: {{kind: seq2seq, model_path: m}}\nrun: {{output_dir: {tmp_path}}}\n"
                    "data: {shards: S, balance_tokens: yes}\n")
    assert load_config(yaml, {}).data.balance_tokens is True


def test_balancing_evens_the_batches_of_a_mixed_corpus(tmp_path):
    """benchmarks/bench_packing.py on its mixed corpus, tiny Qwen2.5-VL (one length) and seq2seq (two): the largest
    batch close to the mean, padding as low as length grouping's, the same real tokens."""
    rows = {(r["model"], r["mode"]): r for r in bench_packing().run(
        96, 8, ["qwen2_5_vl", "seq2seq"], 0, tmp_path, modes=("grouped", "balanced", "packed", "packed_balanced"))}
    for model in ("qwen2_5_vl", "seq2seq"):
        grouped, balanced = rows[model, "grouped"], rows[model, "balanced"]
        assert balanced["real_tokens"] == grouped["real_tokens"] > 0
        assert balanced["largest_over_mean"] < 1.2 < grouped["largest_over_mean"]
        assert balanced["real_fraction"] > grouped["real_fraction"] - 0.03
        assert balanced["samples_per_batch"][0] < 8 < balanced["samples_per_batch"][1]
    packed, even = rows["qwen2_5_vl", "packed"], rows["qwen2_5_vl", "packed_balanced"]
    assert even["real_fraction"] == packed["real_fraction"] == 1.0
    assert even["largest_over_mean"] < 1.05 < packed["largest_over_mean"]
