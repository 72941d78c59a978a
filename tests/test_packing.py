"""Padding-free packing (trainer/packing.py, data.packing): a packed row computes what separate samples compute
(attention stays inside each sample, positions and Qwen's M-RoPE restart per sample), its loss is the unpacked
per-token loss, and the loader hands packed micro batches with no padding at all. Tiny presets, CPU, fp32."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from vtt.trainer.adapters import ModelConfig, get_adapter
from vtt.trainer.loss import forward_loss, label_count
from vtt.trainer.packing import batch_samples, pack, real_tokens, sample_lengths
from vtt.trainer.presets import build_tiny

FAMILIES = [("llava", "llava_next_video"), ("llava", "video_llava"), ("qwen_vl", "qwen2_5_vl"),
            ("qwen_vl", "qwen2_vl"), ("qwen_vl", "qwen3_vl")]
CONV = [{"from": "human", "value": "<video>\nWhat colour is it?"}, {"from": "gpt", "value": "red, mostly"},
        {"from": "human", "value": "And where does it go?"}, {"from": "gpt", "value": "to the left"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    built = {}

    def get(kind, family):
        if family not in built:
            path = str(build_tiny(kind, root / family, family=family))
            torch.manual_seed(0)
            ad = get_adapter(ModelConfig(kind=kind, model_path=path))
            built[family] = ad, ad.load_model().eval()
        return built[family]
    return get


def samples(frames=(2, 5, 4), seed=0):
    """Clips of different lengths; every other one a two-exchange conversation."""
    rng = np.random.default_rng(seed)
    out = []
    for i, t in enumerate(frames):
        meta = {"description": ["a red square moving left", "a blue circle", "green"][i % 3]}
        if i % 2:
            meta["conversations"] = CONV
        out.append({"key": f"k{i}", "text": "", "meta": meta,
                    "frames": rng.integers(0, 256, (t, 28, 28, 3), dtype=np.uint8)})
    return out


def test_pack_restarts_positions_and_ignores_each_first_label():
    b = pack([[5, 6, 7], [8, 9]], [[-100, 6, 7], [8, 9]])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # token 7 must not learn to predict sample 2's 8
    assert b["use_cache"] is False and sample_lengths(b) == [3, 2] and batch_samples(b) == 2
    assert real_tokens(b) == 5
    with pytest.raises(ValueError):
        pack([[1, 2]], [[1]])


@pytest.mark.parametrize("kind,family", FAMILIES, ids=[f for _, f in FAMILIES])
@torch.no_grad()
def test_packed_forward_equals_separate_forwards(tiny, kind, family):
    """Each sample's logits inside the packed row equal its logits alone (no attention across samples, its own
    positions); the same row with plain positions (attention crossing samples) does not: the check can fail."""
    ad, model = tiny(kind, family)
    ss = samples()
    packed = ad.collate(ss, packed=True)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    alone = [ad.collate([s]) for s in ss]
    assert sample_lengths(packed) == [int(b["input_ids"].shape[1]) for b in alone]
    assert torch.equal(packed["input_ids"][0], torch.cat([b["input_ids"][0] for b in alone]))
    got = model(**packed).logits[0].split(sample_lengths(packed))
    for one, b in zip(got, alone):
        torch.testing.assert_close(one, model(**b).logits[0], rtol=1e-4, atol=1e-4)
    crossing = dict(packed, position_ids=None)
    if packed["position_ids"].ndim == 3:  # Qwen: keep each sample's M-RoPE, lose only the text restarts
        n = packed["input_ids"].shape[1]
        crossing["position_ids"] = torch.cat([torch.arange(n)[None, None], packed["position_ids"][1:]])
    else:
        crossing.pop("position_ids")
    wrong = model(**crossing).logits[0].split(sample_lengths(packed))
    assert not torch.allclose(wrong[-1], got[-1], atol=1e-3)


@pytest.mark.parametrize("kind,family", [("llava", "llava_next_video"), ("qwen_vl", "qwen2_5_vl")])
@torch.no_grad()
def test_packed_loss_is_the_unpacked_per_token_loss(tiny, kind, family):
    """Summed token loss and label count of a packed micro batch = those of the right-padded one (LLaVA clips of
    one length: its unpacked batches repeat frames up to the longest clip, which changes what they compute)."""
    ad, model = tiny(kind, family)
    ss = samples(frames=(4, 4, 4) if kind == "llava" else (2, 6, 3))
    padded, packed = ad.collate(ss), ad.collate(ss, packed=True)
    assert padded["input_ids"].numel() > real_tokens(padded)  # the padded batch does hold padding
    assert label_count(packed, True) == label_count(padded, True) > 0
    for impl in ("plain", "chunked"):
        torch.testing.assert_close(forward_loss(model, packed, True, impl), forward_loss(model, padded, True, impl),
                                   rtol=1e-5, atol=1e-5)
    assert ad.num_tokens(packed) == ad.num_tokens(padded) == real_tokens(packed)
    assert batch_samples(packed) == batch_samples(padded) == len(ss)


def test_packing_is_refused_for_seq2seq(tmp_path):
    from vtt.trainer.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="data.packing"):
        load_config(None, {"model": {"kind": "seq2seq", "model_path": "x"}, "data": {"shards": "s", "packing": True},
                           "run": {"output_dir": str(tmp_path)}})


def test_mixed_corpus_batches_are_at_least_95_percent_real_tokens_packed(tmp_path):
    """benchmarks/bench_packing.py on a small mixed corpus (2-32 frames, 1-6 exchanges) through the real loader."""
    import json
    from pathlib import Path
    out = tmp_path / "rows.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_packing.py"
    subprocess.run([sys.executable, str(bench), "--samples", "24", "--micro", "6", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    rows = {(r["model"], r["packed"]): r for r in json.loads(out.read_text())}
    for model in ("llava", "qwen2_5_vl"):
        on, off = rows[model, True], rows[model, False]
        assert on["real_fraction"] >= 0.95 and on["real_tokens"] == off["real_tokens"] > 0
        assert off["real_fraction"] < 0.9  # mixed lengths: the padded batches waste a lot
