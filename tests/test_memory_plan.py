"""The memory planner (vtt.trainer.run.memory): parameter counts on the meta device against real models, the
activation formulas against what autograd really saves, the optimizer accounting against a real AdamW step,
monotonicity, fitting (the 7B LoRA recipe on a 24 GB card) and `vtt-train --plan`."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf

from vtt.trainer.run import memory as M
from vtt.trainer.models.registry import get_adapter
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.models.presets import build_shaped, build_tiny
from vtt.trainer.models.presets_qwen import build_shaped_qwen

GB = 1024 ** 3


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return {"llava": build_shaped("llava-next-video-7b", root / "llava"),
            "qwen_vl": build_shaped_qwen(root / "qwen"), "seq2seq": build_shaped("nllb-600m", root / "nllb")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: build_tiny(k, root / k) for k in ("llava", "qwen_vl", "seq2seq")}


# ------------------------------------------------------------------ parameter counts

@pytest.mark.parametrize("kind", ["llava", "qwen_vl", "seq2seq"])
@pytest.mark.parametrize("lora", [False, True])
def test_meta_counts_equal_the_loaded_model(tiny, kind, lora):
    """The meta-device model has exactly the parameters (and trainable ones) of the model training loads."""
    mc = ModelConfig(kind=kind, model_path=str(tiny[kind]), lora=lora)
    real = get_adapter(mc).load_model()
    shape = M.model_shape(mc)
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert shape.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)


def llama_params(h, inter, layers, heads, kv, vocab):
    kv_dim = kv * h // heads
    per_layer = h * h * 2 + 2 * h * kv_dim + 3 * h * inter + 2 * h
    return vocab * h * 2 + layers * per_layer + h


def test_real_7b_shapes_counted_on_the_meta_device(shaped):
    """LLaVA-NeXT-Video-7B: Llama-2-7B (6.74B) + CLIP ViT-L/14-336 (303M) + projector (21M); its language
    model by the closed formula; Qwen2.5-VL-7B-Instruct 8.29B as published; LoRA r16 counts by hand."""
    llava = M.model_shape(ModelConfig(kind="llava", model_path=str(shaped["llava"])))
    lm = llama_params(4096, 11008, 32, 32, 32, 32064)
    proj = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert 303e6 < llava.params - lm - proj < 305e6  # the CLIP tower
    assert llava.trainable == llava.params
    qwen = M.model_shape(ModelConfig(kind="qwen_vl", model_path=str(shaped["qwen_vl"]), lora=True))
    assert 8.28e9 < qwen.params - qwen.trainable < 8.30e9
    kv = 512
    assert qwen.trainable == 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + kv))  # q, o and k, v on 28 layers
    nllb = M.model_shape(ModelConfig(kind="seq2seq", model_path=str(shaped["seq2seq"])))
    assert 615e6 < nllb.params < 616e6  # facebook/nllb-200-distilled-600M: 615,073,792 (tied embeddings)


# ------------------------------------------------------------------ activations against autograd

def saved_per_token(run, tokens: int, shared=()) -> float:
    """Bytes autograd saves for one call, per token, as the slope between two lengths (weights and other
    per-call tensors cancel out); `shared` tensors (a model's RoPE cos/sin, one for all layers) left out."""
    def saved(n):
        return saved_bytes(lambda: run(n), shared)
    return (saved(2 * tokens) - saved(tokens)) / tokens


def saved_bytes(run, skip_tensors) -> int:
    """Bytes of the distinct storages autograd saves while `run()` builds its graph, `skip_tensors`' left out."""
    skip = {t.untyped_storage().data_ptr() for t in skip_tensors}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def llama_layer(dtype, mode):
    c = tf.LlamaConfig(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=1, attn_implementation="sdpa")
    layer = tf.models.llama.modeling_llama.LlamaDecoderLayer(c, 0)
    rope = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(c)
    layer.requires_grad_(mode == "full")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        get_peft_model(torch.nn.ModuleDict({"l": layer}), LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    layer.to(dtype)  # as DeepSpeed's bf16 casts the whole module, LoRA layers too
    pos = {n: torch.arange(n)[None] for n in (64, 128)}
    cos_sin = {n: rope(torch.zeros(1, dtype=dtype), p) for n, p in pos.items()}

    def run(n):
        x = torch.randn(1, n, 128, dtype=dtype, requires_grad=True)
        layer(x, position_embeddings=cos_sin[n], attention_mask=None, position_ids=pos[n])
    stack = M.Stack("lm", 1, 128, 352, 4, 2, act="silu_gated", rms_fp32=True, mode=mode)
    return run, stack, [t for cs in cos_sin.values() for t in cs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["full", "lora", "frozen"])
def test_llama_layer_activations_match_autograd(dtype, mode):
    run, stack, shared = llama_layer(dtype, mode)
    e = 2 if dtype == torch.bfloat16 else 4
    want = M.layer_bytes(stack, e, lora_r=8, lora_dropout=True, lora_targets=4, mask=e)  # CPU dropout mask
    got = saved_per_token(run, 64, shared)
    assert got == pytest.approx(want, rel=0.03), (got, want)


# ------------------------------------------------------------------ weights, gradients, optimizer states

def test_weights_grads_and_adam_states_are_exact_for_a_real_step(tiny):
    """fp32, ZeRO-0, one process: the estimate's weights + gradients + optimizer equal the bytes of the
    parameters, their .grad and torch AdamW's states after a real step on the tiny seq2seq model."""
    mc = ModelConfig(kind="seq2seq", model_path=str(tiny["seq2seq"]))
    model = get_adapter(mc).load_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.tensor([[5, 6, 7, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    est = M.estimate(mc, M.PlanInputs(precision="fp32", zero_stage=0, frames=0))
    assert est.weights == nbytes(model.parameters())
    assert est.gradients == nbytes(p.grad for p in model.parameters() if p.grad is not None)
    states = [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert est.optimizer == nbytes(states)


# ------------------------------------------------------------------ monotonicity and fitting

def test_estimate_grows_and_shrinks_the_right_way(shaped):
    mc = ModelConfig(kind="llava", model_path=str(shaped["llava"]), lora=True)
    shape = M.model_shape(mc)
    base = M.PlanInputs(micro_batch=2, frames=8)
    t = lambda **kw: M.estimate(mc, dataclasses.replace(base, **kw), shape).total  # noqa: E731
    assert t(micro_batch=1) < t() < t(micro_batch=4)
    assert t(frames=4) < t() < t(frames=16)
    assert t(gradient_checkpointing=True) < t()
    full = ModelConfig(kind="llava", model_path=str(shaped["llava"]))
    fshape = M.model_shape(full)
    z = [M.estimate(full, dataclasses.replace(base, zero_stage=s, world_size=8), fshape).total for s in range(4)]
    assert z[0] > z[1] > z[2] > z[3]
    assert M.estimate(full, dataclasses.replace(base, world_size=8), fshape).total < \
        M.estimate(full, base, fshape).total
    assert M.estimate(full, dataclasses.replace(base, offload_optimizer=True), fshape).optimizer == 0


def test_the_7b_lora_recipe_fits_a_24gb_card_and_auto_fills_a_big_one(shaped):
    """The seed's recipe (LLaVA-NeXT-Video-7B LoRA r16, checkpointing, micro 1, 8 frames, bf16 ZeRO-2) under
    24 GB with 10% headroom; `auto` on 24 GB and 141 GB (H200) picks settings that fit, more on the larger."""
    for kind in ("llava", "qwen_vl"):
        mc = ModelConfig(kind=kind, model_path=str(shaped[kind]), lora=True)
        shape = M.model_shape(mc)
        recipe = M.PlanInputs(micro_batch=1, frames=8, gradient_checkpointing=True)
        assert M.estimate(mc, recipe, shape).total < 0.9 * 24 * GB
        small = M.fit(mc, recipe, 24 * GB, 0.1, None, None, shape)
        big = M.fit(mc, recipe, 141 * GB, 0.1, None, None, shape)
        assert small.total <= 0.9 * 24 * GB and big.total <= 0.9 * 141 * GB
        assert big.micro_batch > small.micro_batch
    nllb = ModelConfig(kind="seq2seq", model_path=str(shaped["seq2seq"]))
    assert M.fit(nllb, M.PlanInputs(frames=0), 2 * GB, 0.1, None, None) is None  # 615M full FT: 9+ GB static


def test_several_devices_hold_a_replica_where_it_fits(shaped, tmp_path, monkeypatch):
    """Two processes, no ZeRO stage named: each device holds a whole replica (the one-process settings) where
    the estimate fits, ZeRO-2 shards where it does not; --plan and `auto` agree with what the run resolves."""
    from vtt.trainer.config import DeepSpeedSettings, RunConfig, TrainConfig
    from vtt.trainer.data.loader import DataConfig
    from vtt.trainer.run import ds_config as dsc
    monkeypatch.setenv("WORLD_SIZE", "2")

    def cfg(kind, gb, **ds):
        mc = ModelConfig(kind=kind, model_path=str(shaped[kind]), lora=kind != "seq2seq")
        return TrainConfig(mc, DataConfig(shards=str(tmp_path / "none")), RunConfig(output_dir=str(tmp_path)),
                           deepspeed=DeepSpeedSettings(device_memory_gb=gb, micro_batch_size=1, **ds))

    def stage(c):  # what run/plan.prepare resolves
        r = dsc.resolve(c.deepspeed, 2, full_finetune=not c.model.lora, replica=M.chooses_replica(c))
        return r.zero_stage, r.autocast
    assert stage(cfg("seq2seq", 80)) == (0, True)  # NLLB-600M full: ~10 GB of replica
    assert stage(cfg("seq2seq", 8)) == (2, False)  # does not fit: sharded, DeepSpeed's bf16
    assert stage(cfg("seq2seq", None)) == (0, True)  # memory unknown (CPU): a replica
    assert stage(cfg("llava", 24)) == (1, False)  # 7B LoRA: bf16 base + small states fit; BF16_Optimizer
    assert stage(cfg("seq2seq", 80, zero_stage=2)) == (2, False)  # named: kept
    assert stage(cfg("seq2seq", 80, offload_optimizer=True)) == (2, False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not M.chooses_replica(cfg("seq2seq", 80))  # one process: nothing to choose (default_stage)
    monkeypatch.setenv("WORLD_SIZE", "2")
    auto = dataclasses.replace(cfg("seq2seq", 80), deepspeed=DeepSpeedSettings(device_memory_gb=80,
                                                                               micro_batch_size="auto"))
    res = M.resolve_auto(auto)
    assert res.replica and M.chooses_replica(res.cfg) and "ZeRO-0, bf16 (autocast)" in M.plan_text(res)
    tight = dataclasses.replace(auto, deepspeed=DeepSpeedSettings(device_memory_gb=14, micro_batch_size="auto"))
    res = M.resolve_auto(tight)  # a replica fits only small micro batches; shards fit a faster one
    assert not res.replica and not M.chooses_replica(res.cfg) and "ZeRO-2" in M.plan_text(res)


def test_video_token_budget_trades_frames(shaped):
    mc = ModelConfig(kind="llava", model_path=str(shaped["llava"]), lora=True)
    assert M.video_tokens(mc, 8, (336, 336))[0] == 8 * 144  # 24x24 patches pooled 2x2
    assert M.frames_for_budget(mc, 600, 8, (336, 336)) == 4
    assert M.frames_for_budget(mc, 10_000, 8, (336, 336)) == 8


def test_vtt_train_plan_prints_and_exits(shaped, tmp_path):
    from click.testing import CliRunner

    from train_helpers import make_train_shards
    from vtt.trainer.cli import main
    shards = make_train_shards(tmp_path / "shards", n=4, per_shard=4, frames=8, size=336)
    args = ["--model", "llava", "--model-path", str(shaped["llava"]), "--lora", "--shards", str(shards), "-o",
            str(tmp_path / "run"), "--micro-batch", "auto", "--set", "model.gradient_checkpointing=auto",
            "--device-memory", "24", "--plan"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "estimated peak" in r.output and "1152 video tokens" in r.output and "fits" in r.output
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    r = CliRunner().invoke(main, args[:-3] + ["--plan"])  # CPU, no --device-memory: said so
    assert r.exit_code == 0 and "device memory unknown" in r.output


def test_plan_for_several_gpus_is_printed_once_for_that_world(shaped, tmp_path, monkeypatch):
    """--num-gpus N --plan launches nothing: one report, planned for world N (replicas where they fit)."""
    from click.testing import CliRunner

    from vtt.trainer.cli import main
    monkeypatch.setenv("WORLD_SIZE", "1")  # restored after the test: --plan sets it for its world
    args = ["--model", "seq2seq", "--model-path", str(shaped["seq2seq"]), "--shards", str(tmp_path / "none"),
            "-o", str(tmp_path / "run"), "--micro-batch", "8", "--num-gpus", "2", "--plan"]
    r = CliRunner().invoke(main, args + ["--device-memory", "80"])
    assert r.exit_code == 0, r.output
    assert r.output.count("vtt-train plan:") == 1 and "world size 2, ZeRO-0, bf16 (autocast)" in r.output
    r = CliRunner().invoke(main, args + ["--device-memory", "10"])
    assert r.exit_code == 0 and "world size 2, ZeRO-2, bf16, micro batch 8" in r.output, r.output


def m2m_layers(dtype, mode, cross):
    c = tf.M2M100Config(d_model=128, encoder_ffn_dim=512, decoder_ffn_dim=512, encoder_attention_heads=4,
                        decoder_attention_heads=4, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                        attn_implementation="sdpa")
    mm = tf.models.m2m_100.modeling_m2m_100
    layer = (mm.M2M100DecoderLayer(c, layer_idx=0) if cross else mm.M2M100EncoderLayer(c)).to(dtype).train()
    layer.requires_grad_(mode == "full")
    enc = {n: torch.randn(1, n, 128, dtype=dtype, requires_grad=True) for n in (64, 128)}

    def run(n):
        x = torch.randn(1, n, 128, dtype=dtype, requires_grad=True)
        kw = dict(encoder_hidden_states=enc[n], encoder_attention_mask=None) if cross else {}
        layer(x, attention_mask=None, **kw)
    stack = M.Stack("decoder" if cross else "encoder", 1, 128, 512, 4, 4, act="relu", rms_fp32=False, mode=mode,
                    dropout=True, cross=cross)
    return run, stack, list(enc.values())  # the encoder output is shared by every decoder layer


def clip_layer(dtype, mode, cross=False):
    vc = tf.CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                             attn_implementation="sdpa")
    layer = tf.models.clip.modeling_clip.CLIPEncoderLayer(vc).to(dtype)
    layer.requires_grad_(mode == "full")

    def run(n):
        layer(torch.randn(1, n, 128, dtype=dtype, requires_grad=True), attention_mask=None,
              causal_attention_mask=None)
    return run, M.Stack("vision tower", 1, 128, 512, 4, 4, act="quick_gelu", rms_fp32=False, mode=mode), []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("make,cross", [(m2m_layers, False), (m2m_layers, True), (clip_layer, False)])
@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_encoder_decoder_and_clip_layers_match_autograd(dtype, make, cross, mode):
    """NLLB's M2M100 encoder and decoder (cross-attention, dropout) and CLIP's tower layer."""
    run, stack, shared = make(dtype, mode, cross)
    e = 2 if dtype == torch.bfloat16 else 4
    got = saved_per_token(run, 64, shared)
    assert got == pytest.approx(M.layer_bytes(stack, e, mask=e), rel=0.03), got


def whole_model_saved(adapter, model, samples) -> tuple[int, dict, torch.Tensor]:
    """Bytes autograd keeps for one micro batch's forward + vtt's loss (weights left out)."""
    from vtt.trainer.run.loss import summed_token_loss
    batch = adapter.collate(samples)
    labels = batch.pop("labels")
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    got = saved_bytes(lambda: summed_token_loss(model(**batch).logits, labels, adapter.causal),
                      list(model.parameters()))
    return got, batch, labels


@pytest.mark.parametrize("kind", ["llava", "qwen_vl", "seq2seq"])
@pytest.mark.parametrize("lora", [False, True])
def test_whole_model_activations_within_15_percent(tiny, kind, lora):
    """The tiny presets in bf16 on CPU, one sample more per micro batch: what autograd keeps (the slope, so
    weights cancel) against the estimate's activations + the loss's fp32 log-softmax (the transient bf16 logits
    are not kept for backward)."""
    import numpy as np
    mc = ModelConfig(kind=kind, model_path=str(tiny[kind]), lora=lora)
    ad = get_adapter(mc)
    model = ad.load_model().to(torch.bfloat16).train()
    rng = np.random.default_rng(0)
    text = "a red square moving left, then a blue circle moving right"
    samples = [{"key": f"k{i}", "text": text, "meta": {"description": text},
                "frames": rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)} for i in range(2)]
    one, batch, labels = whole_model_saved(ad, model, samples[:1])
    two, _, _ = whole_model_saved(ad, model, samples)
    width, n_labels = batch["input_ids"].shape[1], int((labels != -100).sum())
    vid = M.video_tokens(mc, 8, (32, 32))[0]
    inputs = M.PlanInputs(micro_batch=1, frames=8, frame_size=(32, 32), mask_bytes=2,
                          text_tokens=width - vid, label_tokens=labels.shape[1] if kind == "seq2seq" else n_labels)
    shape = M.model_shape(mc)
    want = M.estimate(mc, inputs, shape).activations + 4 * shape.vocab * n_labels
    assert two - one == pytest.approx(want, rel=0.15)


DS_SCRIPT = """
import json, os, sys, torch
import deepspeed
from vtt.trainer.models.registry import get_adapter
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.run import memory as M
stage = int(sys.argv[2])
mc = ModelConfig(kind="seq2seq", model_path=sys.argv[1])
model = get_adapter(mc).load_model().to(torch.bfloat16)
cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
       "zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
eng, opt, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=cfg)
ids = torch.tensor([[5, 6, 7, 2]])
eng.backward(eng(input_ids=ids, labels=ids).loss)
eng.step()
nb = lambda ts: sum(t.numel() * t.element_size() for t in ts)
inner = getattr(opt, "optimizer", opt)
states = nb(v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
master = nb(p for g in inner.param_groups for p in g["params"])
est = M.estimate(mc, M.PlanInputs(frames=0, zero_stage=stage, precision="bf16"))
print(json.dumps({"weights": [nb(eng.module.parameters()), est.weights], "optimizer": [states + master, est.optimizer]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_weights_and_optimizer_states_equal_deepspeeds(tiny, stage):
    """A real DeepSpeed engine (bf16, ZeRO-0 and ZeRO-2, one CPU process) after one step: its bf16 module and its
    fp32 master copy + Adam states are exactly the estimate's weights (2P) and optimizer (12T)."""
    import json
    import subprocess
    import sys

    from train_helpers import REPO, train_env
    from vtt.trainer.run.dist import free_port
    env = dict(train_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    if "TORCH_EXTENSIONS_DIR" not in env and (REPO / ".venv").is_dir():  # the shm op built once, per checkout
        env["TORCH_EXTENSIONS_DIR"] = str(REPO / ".venv" / "torch_extensions")
    p = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(tiny["seq2seq"]), str(stage)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["weights"][0] == got["weights"][1] and got["optimizer"][0] == got["optimizer"][1], got
