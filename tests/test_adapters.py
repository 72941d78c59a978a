"""The adapters (trainer/models/<family>.py, the registry in trainer/models/registry.py): collate/label masking,
video token counts against the real model classes, training
steps, export -> reload, generate, LoRA merge, freezing options and clear errors. Tiny presets, CPU."""
import dataclasses
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typing_extensions import get_protocol_members

from vtt.shards.conversation import SampleError
from vtt.trainer.models.llava import PROJECTOR_PARTS
from vtt.trainer.models.adapter import ModelAdapter
from vtt.trainer.models.registry import ADAPTERS, get_adapter
from vtt.trainer.models.model_config import KINDS, ModelConfig
from vtt.trainer.models.presets import LLAVA_FAMILIES, build_tiny


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def llava_path(root):
    return str(build_tiny("llava", root / "llava"))


@pytest.fixture(scope="module")
def s2s_path(root):
    return str(build_tiny("seq2seq", root / "seq2seq"))


CAPTIONS = ["a red square moving left", "a blue circle bouncing", "a green ball falling slowly",
            "a white triangle spinning fast"]


def video_samples(n=4, frames=(4, 3), size=(24, 40), seed=0):
    """Sample dicts as trainer/data/loader.py yields them; clip lengths cycle through `frames`."""
    rng = np.random.default_rng(seed)
    return [{"key": f"clip_{i:03d}", "text": "", "frames": rng.integers(0, 256, (frames[i % len(frames)], *size, 3),
                                                                         dtype=np.uint8),
             "meta": {"description": CAPTIONS[i % 4], "title": f"clip {i}", "fr": f"une vidéo {i}"}}
            for i in range(n)]


def llava(path, **kw):
    return get_adapter(ModelConfig(kind="llava", model_path=path, **kw))


def s2s(path, **kw):
    kw = {"source_template": "{description}", "target_template": "{fr}", "src_lang": "eng_Latn",
          "tgt_lang": "fra_Latn", **kw}
    return get_adapter(ModelConfig(kind="seq2seq", model_path=path, **kw))


def train_steps(model, batch, steps, lr=3e-3):
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_llava_collate_masks_all_but_answer(llava_path):
    ad = llava(llava_path, target_template="{description} ({title})")
    samples = video_samples()
    batch = ad.collate(samples)
    t = max(len(s["frames"]) for s in samples)
    n_video = ad.layout.num_tokens(t)
    assert n_video == t * 16  # 64 px / patch 8 = 8x8 patches, 2x2 pooled
    assert batch["pixel_values_videos"].shape == (4, t, 3, 64, 64)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    tok = ad.tokenizer
    for i, s in enumerate(samples):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        assert int((ids == ad.layout.token_id).sum()) == n_video
        answer = labels[labels != -100]
        assert answer[-1] == tok.eos_token_id
        assert tok.decode(answer[:-1]).strip() == f"{s['meta']['description']} ({s['meta']['title']})"
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()          # right padding
        assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == -100).all()
        assert torch.equal(labels[:n][labels[:n] != -100], ids[:n][-len(answer):])  # answer is the tail
    assert ad.num_tokens(batch) == int(batch["attention_mask"].sum())


@pytest.mark.parametrize("style", ["bytelevel", "metaspace", "llama"])
def test_answer_tokens_match_joint_tokenization(style, llava_path, tmp_path):
    """Prompt and answer are tokenized apart (to know where the loss starts): the ids must equal tokenizing
    the whole text at once, for GPT-2/Qwen-style and for Llama/SentencePiece-style tokenizers."""
    import shutil

    from vtt.trainer.models.presets import LLAVA_SPECIAL
    from vtt.trainer.models.presets_tokenizer import build_tokenizer
    path = tmp_path / style
    shutil.copytree(llava_path, path)
    if style != "bytelevel":
        tok = build_tokenizer(LLAVA_SPECIAL, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True,
                              style=style)
        tok.add_special_tokens({"additional_special_tokens": ["<video>", "<image>"]})
        for f in path.glob("tokenizer*"):
            f.unlink()
        tok.save_pretrained(path)
    ad = llava(str(path), prompt="USER: <video>\nWhat happens in {title}? ASSISTANT:")
    sample = video_samples(n=1)[0]
    batch = ad.collate([sample])
    ids = [i for i in batch["input_ids"][0].tolist() if i != ad.layout.token_id]
    prompt = ad.prompt.format(title=sample["meta"]["title"])
    joint = ad.tokenizer(f"{prompt} {sample['meta']['description']}").input_ids
    joint = [i for i in joint if i != ad.layout.token_id] + [ad.tokenizer.eos_token_id]
    assert ids == joint, (ad.tokenizer.convert_ids_to_tokens(ids), ad.tokenizer.convert_ids_to_tokens(joint))
    labels = batch["labels"][0]
    assert ad.tokenizer.decode(labels[labels != -100], skip_special_tokens=True).strip() == CAPTIONS[0]


@pytest.mark.parametrize("family", LLAVA_FAMILIES)
def test_video_tokens_match_features_for_each_family(family, root):
    path = str(build_tiny("llava", root / f"family-{family}", family=family))
    ad = llava(path)
    model = ad.load_model()
    batch = ad.collate(video_samples(n=2, frames=(3, 2)))
    assert math.isfinite(model(**batch).loss.item())
    short = {**batch, "input_ids": batch["input_ids"].clone()}  # one placeholder fewer must break the forward
    first = int((short["input_ids"][0] == ad.layout.token_id).nonzero()[0])
    short["input_ids"][0, first] = ad.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="do not match"):
        model(**short)


def test_llava_training_reduces_loss_and_generates(llava_path):
    ad = llava(llava_path)
    model = ad.load_model()
    batch = ad.collate(video_samples())
    losses = train_steps(model, batch, 30)
    assert losses[-1] < 0.5 * losses[0], losses
    out = ad.generate(model, video_samples(n=2), max_new_tokens=8)
    assert len(out) == 2 and all(isinstance(x, str) and x for x in out)


def test_num_frames_resamples_every_clip(llava_path):
    ad = llava(llava_path, num_frames=6)
    batch = ad.collate(video_samples(n=2, frames=(2, 9)))
    assert batch["pixel_values_videos"].shape[1] == 6
    assert int((batch["input_ids"][1] == ad.layout.token_id).sum()) == ad.layout.num_tokens(6)


def test_seq2seq_collate_language_codes_and_truncation(s2s_path):
    ad = s2s(s2s_path, max_source_len=6, max_target_len=5)
    tok = ad.tokenizer
    batch = ad.collate(video_samples(n=2))
    src, labels = batch["input_ids"][0], batch["labels"][0]
    assert src[0] == tok.convert_tokens_to_ids("eng_Latn") and len(src) <= 6
    assert labels[0] == tok.convert_tokens_to_ids("fra_Latn") and len(labels) <= 5
    assert tok.eos_token_id in src.tolist() and tok.eos_token_id in labels.tolist()
    assert ad.cast_buffers and not llava_adapter_casts(ad)
    full = s2s(s2s_path).collate(video_samples(n=1))
    assert tok.decode(full["labels"][0], skip_special_tokens=True) == "une vidéo 0"


def llava_adapter_casts(_):
    from vtt.trainer.models.llava import LlavaAdapter
    return LlavaAdapter.cast_buffers


def test_seq2seq_training_reduces_loss(s2s_path):
    ad = s2s(s2s_path)
    model = ad.load_model()
    batch = ad.collate(video_samples())
    losses = train_steps(model, batch, 25)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("kind,lora", [("llava", False), ("seq2seq", False), ("seq2seq", True)])
def test_export_reload_gives_equal_logits_and_generates(kind, lora, llava_path, s2s_path, tmp_path):
    make = llava if kind == "llava" else s2s
    ad = make(llava_path if kind == "llava" else s2s_path, lora=lora, lora_dropout=0.0)
    model = ad.load_model()
    if lora:
        assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = ad.collate(video_samples())
    train_steps(model, batch, 2)
    model.eval()
    ad.export(model, tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").is_file()
    ad2 = make(str(tmp_path / "final"))
    again = ad2.load_model().eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, again(**ad2.collate(video_samples())).logits, atol=1e-5)
    out = ad2.generate(again, video_samples(n=2), max_new_tokens=6)
    assert len(out) == 2 and all(isinstance(x, str) for x in out)
    if kind == "seq2seq":
        assert again.generation_config.forced_bos_token_id == ad.tokenizer.convert_tokens_to_ids("fra_Latn")
    else:
        assert (tmp_path / "final" / "video_preprocessor_config.json").is_file()


def test_lora_trains_adapters_and_export_merges(llava_path, tmp_path):
    ad = llava(llava_path, lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = ad.load_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or any(p in n for p in PROJECTOR_PARTS) for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n and "lora_" in n for n in trainable)  # LoRA in the LM only
    batch = ad.collate(video_samples())
    train_steps(model, batch, 3)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    ad.export(model, tmp_path / "merged")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    # ZeRO-3 hands over a gathered state dict (peft key names) because the live parameters are partitioned
    ad.export(model, tmp_path / "gathered", state_dict={k: v.clone() for k, v in model.state_dict().items()})
    plain = llava(str(tmp_path / "merged")).load_model().eval()
    gathered = llava(str(tmp_path / "gathered")).load_model().eval()
    base = llava(llava_path).load_model().eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, want, atol=1e-4)
        assert torch.allclose(gathered(**batch).logits, want, atol=1e-4)
        assert not torch.allclose(base(**batch).logits, want, atol=1e-3)  # LoRA changed the model
        assert torch.equal(model(**batch).logits, want)  # export left the training model as it was


def trainable_parts(model):
    parts = {"vision_tower": False, "multi_modal_projector": False, "language_model": False}
    for n, p in model.named_parameters():
        for part in parts:
            parts[part] |= part in n and p.requires_grad
    return parts


@pytest.mark.parametrize("opts,want", [
    ({"freeze_vision": True}, {"vision_tower": False, "multi_modal_projector": True, "language_model": True}),
    ({"freeze_llm": True}, {"vision_tower": True, "multi_modal_projector": True, "language_model": False}),
    ({"projector_only": True}, {"vision_tower": False, "multi_modal_projector": True, "language_model": False}),
])
def test_freezing_options(llava_path, opts, want):
    assert trainable_parts(llava(llava_path, **opts).load_model()) == want


def test_gradient_checkpointing_gives_same_gradients(llava_path):
    batch = llava(llava_path).collate(video_samples(n=2))
    grads = []
    for ckpt in (False, True):
        model = llava(llava_path, gradient_checkpointing=ckpt).load_model()
        model.train()
        assert model.is_activation_checkpointing == ckpt
        model(**batch).loss.backward()
        grads.append(model.lm_head.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_clear_errors_for_samples_the_model_cannot_take(llava_path, s2s_path):
    ad = llava(llava_path)
    good = video_samples(n=1)[0]
    with pytest.raises(SampleError, match=r"'clip_000' has no frames.*needs video frames"):
        ad.check_sample({**good, "frames": None})
    with pytest.raises(SampleError, match=r"'clip_000'.*target_template '\{description\}' needs field "
                                          r"'description'"):
        ad.check_sample({**good, "meta": {"title": "x"}})
    with pytest.raises(SampleError, match=r"'clip_000'.*needs field 'description', which is null in the sample"):
        ad.check_sample({**good, "meta": {"description": None}})
    with pytest.raises(SampleError, match=r"uint8 RGB"):
        ad.check_sample({**good, "frames": np.zeros((2, 8, 8), np.uint8)})
    with pytest.raises(SampleError, match=r"video tokens.*over the model's 1024 positions.*--num-frames"):
        ad.check_sample({**good, "frames": np.zeros((300, 2, 2, 3), np.uint8)})
    ad.check_sample(good)
    with pytest.raises(SampleError, match="'clip_000'.*source_template '{summary}' needs field 'summary'"):
        s2s(s2s_path, source_template="{summary}").collate([good])
    with pytest.raises(ValueError, match="tgt_lang 'xx_Latn' is not a token"):
        s2s(s2s_path, tgt_lang="xx_Latn")
    with pytest.raises(ValueError, match=r"max_source_len/max_target_len \(1000/128\) exceed the 256 positions"):
        s2s(s2s_path, max_source_len=1000)
    with pytest.raises(ValueError, match="not an encoder-decoder model"):
        s2s(llava_path)
    with pytest.raises(ValueError, match="not a supported LLaVA video family"):
        llava(s2s_path)


def test_model_config_validation():
    with pytest.raises(ValueError, match="model_path is empty"):
        ModelConfig(kind="llava")
    with pytest.raises(ValueError, match="exactly once"):
        ModelConfig(model_path="x", prompt="USER: describe ASSISTANT:")
    with pytest.raises(ValueError, match="not one of"):
        ModelConfig(kind="gpt", model_path="x")
    for opt in ("freeze_vision", "freeze_llm", "projector_only"):
        with pytest.raises(ValueError, match="llava models only"):
            ModelConfig(kind="seq2seq", model_path="x", **{opt: True})
    with pytest.raises(ValueError, match="named fields"):
        ModelConfig(model_path="x", target_template="{}")
    assert dataclasses.replace(ModelConfig(model_path="x"), lora=True).lora


REPO = Path(__file__).resolve().parents[1]
MEMBERS = get_protocol_members(ModelAdapter)


def test_every_kind_has_one_registered_adapter_with_every_member(llava_path, s2s_path, root):
    assert sorted(ADAPTERS) == sorted(KINDS)
    paths = {"llava": llava_path, "seq2seq": s2s_path, "qwen_vl": str(build_tiny("qwen_vl", root / "qwen"))}
    for kind, path in paths.items():
        ad = get_adapter(ModelConfig(kind=kind, model_path=path))
        assert type(ad) is ADAPTERS[kind] and isinstance(ad, ModelAdapter), kind
        assert not isinstance(types.SimpleNamespace(**{m: getattr(ad, m) for m in MEMBERS - {"setup"}}),
                              ModelAdapter)  # the check sees a missing member


def test_callers_use_only_the_protocol():
    """Every `adapter.<member>` the loop, evaluation, export, the planner, the tools and the benchmarks use is a
    ModelAdapter member (documented there), and none probes an adapter with hasattr/getattr."""
    callers = [p for d in ("trainer", "benchmarks", "scripts") for p in sorted((REPO / d).rglob("*.py"))
               if not (p.parent.name == "models" and p.stem in ("adapter", "registry", "llava", "qwen", "seq2seq"))]
    used, probes = {}, []
    for p in callers:
        text = p.read_text()
        for m in re.finditer(r"\badapter(?:_class\([^)]*\))?\.(\w+)", text):
            used.setdefault(m.group(1), p.name)
        probes += [p.name for _ in re.finditer(r"(?:has|get)attr\((?:self\.)?(?:s\.)?adapter\b", text)]
    assert {"collate", "causal", "load_model", "generate_items", "setup_model"} <= set(used)  # the scan works
    assert not {m: f for m, f in used.items() if m not in MEMBERS}
    assert not probes


@pytest.mark.parametrize("kind", ["llava", "seq2seq"])
def test_generate_answers_in_a_batch_as_alone_and_keeps_the_mode(kind, llava_path, s2s_path):
    """batching.greedy_generate: left padding (decoder-only) and right-padded sources (encoder-decoder) change no
    answer, the prompt is cut from a decoder's output, and a training model is back in training mode after."""
    if kind == "llava":
        ad = llava(llava_path, prompt="USER: <video>\nWhat is {title}? ASSISTANT:")
    else:
        ad = s2s(s2s_path)
    samples = video_samples(n=3, frames=(4,))
    for i, s in enumerate(samples):
        s["meta"]["title"] = " ".join(["the clip"] * (1 + 3 * i))  # prompts of different lengths: padding
    model = ad.load_model().train()
    together = ad.generate(model, samples, max_new_tokens=6)
    assert model.training
    alone = [ad.generate(model, [s], max_new_tokens=6)[0] for s in samples]
    assert together == alone, (together, alone)
    assert kind == "seq2seq" or len(set(together)) > 1, together  # the tiny NLLB answers every source alike
