"""Padding-free packing (trainer/inputs/packing.py, data.packing): a packed row computes what separate samples compute
(attention stays inside each sample, positions and Qwen's M-RoPE restart per sample), its loss is the unpacked
per-token loss, and the loader hands packed micro batches with no padding at all. Tiny presets, CPU, fp32."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import REPO, make_train_shards, metrics, vtt_train  # noqa: E402

from vtt.trainer.models.registry import get_adapter
from vtt.trainer.models.model_config import ModelConfig  # noqa: E402
from vtt.trainer.run.checkpoint import tag_for  # noqa: E402
from vtt.trainer.run.loss import forward_loss, label_count  # noqa: E402
from vtt.trainer.inputs.packing import PACKED_SDPA, batch_samples, pack, real_tokens, sample_lengths  # noqa: E402
from vtt.trainer.models.presets import build_tiny  # noqa: E402

FAMILIES = [("llava", "llava_next_video"), ("llava", "video_llava"), ("llava", "llava_onevision"),
            ("qwen_vl", "qwen2_5_vl"), ("qwen_vl", "qwen2_vl"), ("qwen_vl", "qwen3_vl")]
CONV = [{"from": "human", "value": "<video>\nWhat colour is it?"}, {"from": "gpt", "value": "red, mostly"},
        {"from": "human", "value": "And where does it go?"}, {"from": "gpt", "value": "to the left"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    built = {}

    def get(kind, family, attn=None):
        if (family, attn) not in built:
            path = root / family
            if not path.is_dir():
                build_tiny(kind, path, family=family)
            torch.manual_seed(0)
            ad = get_adapter(ModelConfig(kind=kind, model_path=str(path), attn_implementation=attn))
            built[family, attn] = ad, ad.load_model().eval()
        return built[family, attn]
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


@pytest.mark.parametrize("attn", ["sdpa", PACKED_SDPA])
@pytest.mark.parametrize("kind,family", FAMILIES, ids=[f for _, f in FAMILIES])
@torch.no_grad()
def test_packed_forward_equals_separate_forwards(tiny, kind, family, attn):
    """Each sample's logits inside the packed row equal its logits alone (no attention across samples, its own
    positions), with transformers' block-diagonal sdpa mask and with vtt's per-sample sdpa; the same row with
    plain positions (attention crossing samples) does not: the check can fail. OneVision: clips of one length
    (its packed clips are still padded to the longest: one newline per video needs a (B, T, ...) batch)."""
    ad, model = tiny(kind, family, attn)
    ss = samples(frames=(3, 3, 3) if family == "llava_onevision" else (2, 5, 4))
    packed = ad.collate(ss, packed=True)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    alone = [ad.collate([s]) for s in ss]
    assert sample_lengths(packed) == [int(b["input_ids"].shape[1]) for b in alone]
    assert torch.equal(packed["input_ids"][0], torch.cat([b["input_ids"][0] for b in alone]))
    got = model(**packed).logits[0].split(sample_lengths(packed))
    reference = tiny(kind, family)[1]  # the same weights under plain sdpa: vision towers and padding unchanged
    for one, b in zip(got, alone):
        torch.testing.assert_close(one, model(**b).logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one, reference(**b).logits[0], rtol=1e-4, atol=1e-4)
    padded = ad.collate(ss)  # a padded batch (eval, generation) through either attention alike
    keep = padded["attention_mask"].bool()
    torch.testing.assert_close(model(**padded).logits[keep], reference(**padded).logits[keep], rtol=1e-4, atol=1e-4)
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


def test_packing_is_refused_for_seq2seq_and_picks_its_attention(tmp_path):
    from vtt.trainer.config import ConfigError, load_config
    tree = {"model": {"kind": "llava", "model_path": "x"}, "data": {"shards": "s", "packing": True},
            "run": {"output_dir": str(tmp_path)}}
    assert load_config(None, tree).model.attn_implementation == PACKED_SDPA  # no CUDA + flash-attn here
    tree["model"]["attn_implementation"] = "eager"
    assert load_config(None, tree).model.attn_implementation == "eager"  # a chosen one stays
    tree["data"]["packing"] = False
    del tree["model"]["attn_implementation"]
    assert load_config(None, tree).model.attn_implementation is None
    with pytest.raises(ConfigError, match="data.packing"):
        load_config(None, {"model": {"kind": "seq2seq", "model_path": "x"}, "data": {"shards": "s", "packing": True},
                           "run": {"output_dir": str(tmp_path)}})


def test_mixed_corpus_batches_are_at_least_95_percent_real_tokens_packed(tmp_path):
    """benchmarks/bench_packing.py on a small mixed corpus (2-32 frames, 1-6 exchanges) through the real loader."""
    out = tmp_path / "rows.json"
    bench = REPO / "benchmarks" / "bench_packing.py"
    subprocess.run([sys.executable, str(bench), "--samples", "24", "--micro", "6", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    rows = {(r["model"], r["packed"]): r for r in json.loads(out.read_text())}
    for model in ("llava", "qwen2_5_vl"):
        on, off = rows[model, True], rows[model, False]
        assert on["real_fraction"] >= 0.95 and on["real_tokens"] == off["real_tokens"] > 0
        assert off["real_fraction"] < 0.9  # mixed lengths: the padded batches waste a lot


RUN = ["--preset", "tiny", "--micro-batch", "3", "--grad-accum", "2", "--log-every", "1",
             "--lr", "2e-3", "--warmup-steps", "1", "--no-export", "--keep-last", "0", "--max-steps", 4,
             "--save-every", 2, "--precision", "fp32"]


@pytest.mark.parametrize("kind", ["llava", pytest.param("qwen_vl", marks=pytest.mark.slow)])
def test_packed_training_matches_unpacked_and_resumes_exactly(tmp_path, kind):
    """The real DeepSpeed engine, tiny LLaVA / Qwen2.5-VL, micro 3 x accumulation 2: packed steps and the final
    eval give the unpacked losses (one clip length, so the unpacked batches hold pad tokens only), and a packed
    run resumed from its step-2 checkpoint repeats its own steps 3-4."""
    shards = make_train_shards(tmp_path / "shards", n=24, per_shard=6, frames=4)
    args = ["--model", kind, *RUN, "--shards", shards, "--eval-fraction", 0.25]
    packed, plain = tmp_path / "packed", tmp_path / "plain"
    vtt_train(*args, "--output-dir", packed, "--packing")
    vtt_train(*args, "--output-dir", plain)
    assert "packing: true" in (packed / "config.yaml").read_text()
    (got, evals), (want, want_evals) = metrics(packed), metrics(plain)
    assert evals[-1]["eval_loss"] == pytest.approx(want_evals[-1]["eval_loss"], rel=1e-4)  # eval packs too
    assert [x["step"] for x in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
        # the same samples in fewer tokens (no pad tokens); a packed row still counts its 3 samples, not 1
        per_token, per_token_plain = (x["samples_per_s"] / x["tokens_per_s"] for x in (a, b))
        assert per_token_plain * (1 - 1e-9) <= per_token < 1.5 * per_token_plain, (a, b)
    shutil.rmtree(packed / "checkpoints" / tag_for(4))
    vtt_train(*args, "--output-dir", packed, "--packing", "--resume")
    after = metrics(packed)[0]
    assert "resumed from" in (packed / "train.log").read_text() and [x["step"] for x in after] == [1, 2, 3, 4]
    for a, b in zip(got[2:], after[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), (a, b)


def test_plan_shows_the_packed_row(tmp_path):
    """`--plan --packing`: the row's length (micro batch x tokens per sample) and that no (row x row) mask is made
    with the attention packing picks; plain sdpa's mask is named with its size."""
    import re

    from click.testing import CliRunner

    from vtt.trainer.cli import main
    shards = make_train_shards(tmp_path / "shards", n=4, per_shard=4, frames=4)
    args = ["--model", "llava", "--preset", "tiny", "--shards", str(shards), "-o", str(tmp_path / "run"),
            "--micro-batch", "4", "--packing", "--plan"]
    for extra, mask in (([], "no mask (sdpa_packed)"), (["--set", "model.attn_implementation=sdpa"], "GiB attention mask (sdpa)")):
        r = CliRunner().invoke(main, args + extra)
        assert r.exit_code == 0, r.output
        tokens = int(re.search(r"(\d+) tokens per sample", r.output).group(1))
        line = next(x for x in r.output.splitlines() if "packing:" in x)
        assert f"up to {4 * tokens} tokens" in line and mask in line, line
