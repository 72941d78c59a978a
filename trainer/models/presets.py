"""`--preset tiny`: random-initialised tiny checkpoints saved exactly like real ones (config + safetensors +
tokenizer + processor JSON + generation config), so the adapters load them through from_pretrained unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf
from transformers import AutoModelForImageTextToText, GenerationConfig, M2M100Config, M2M100ForConditionalGeneration
from vtt.trainer.models.presets_qwen import build_tiny_qwen
from vtt.trainer.models.presets_tokenizer import build_tokenizer

KINDS = ("llava", "seq2seq", "qwen_vl")
# CLIP's normalisation, as in llava-hf/LLaVA-NeXT-Video-7B-hf's preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LANG_CODES = ("eng_Latn", "fra_Latn", "deu_Latn", "spa_Latn", "ita_Latn", "por_Latn", "nld_Latn", "zho_Hans",
              "jpn_Jpan", "arb_Arab")
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<video>", "<image>"]
SEQ2SEQ_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # NLLB's order: bos 0, pad 1, eos 2, unk 3
TINY_IMAGE = 64
TINY_PATCH = 8
# Sizes of the tiny llava: a CPU step on 8 clips x 8 frames takes ~0.1-0.3 s. Four text layers, not two: a
# question's answer is read at the template's "ASSISTANT:", the same position for every question, so the model
# must first tell the questions apart and then read the frames; with two layers the demo's QA model stayed at
# chance for shape and direction for ~600 steps and then fitted the training clips (held-out direction 47% at
# 1000 steps, 70% at 2000). With four, the demo's lr decides: at 2e-3 its QA sat ~600 steps on a loss plateau
# whose escape depended on the seed (held-out direction 36-52%), at 1e-3 it answers like the captioner
# (README, demo section).
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
LLAVA_FAMILIES = ("llava_next_video", "llava_onevision", "video_llava", "llava")


def build_tiny(kind: str, out_dir: str | Path, *, family: str | None = None, seed: int = 0) -> Path:
    """Write a tiny random `kind` checkpoint into out_dir and return it; CPU-trainable in seconds.

    family picks the LLaVA class for kind='llava' (the preset is LLaVA-NeXT-Video; the others exist so the
    token-count logic of each family is tested against the real model classes) and the Qwen-VL generation for
    kind='qwen_vl' (qwen2_5_vl by default; qwen2_vl, qwen3_vl)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {KINDS}")
    if kind == "qwen_vl":
        torch.manual_seed(seed)
        return build_tiny_qwen(out_dir, family or "qwen2_5_vl")
    family = family or "llava_next_video"
    if kind == "llava" and family not in LLAVA_FAMILIES:
        raise ValueError(f"unknown llava family {family!r}: expected one of {LLAVA_FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "llava":
        _build_llava(out, family)
    else:
        _build_seq2seq(out)
    return out


def _llava_config(family: str, ids: dict, vocab: int):
    text_cls = tf.Qwen2Config if family == "llava_onevision" else tf.LlamaConfig
    text = text_cls(vocab_size=vocab, max_position_embeddings=1024, bos_token_id=ids["<s>"],
                    eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], **TINY_TEXT)
    vkw = dict(image_size=TINY_IMAGE, patch_size=TINY_PATCH, **TINY_VISION)
    grid = TINY_IMAGE // TINY_PATCH
    common = dict(text_config=text, image_token_index=ids["<image>"], pad_token_id=ids["<pad>"])
    if family == "llava_next_video":
        return tf.LlavaNextVideoConfig(
            vision_config=tf.CLIPVisionConfig(projection_dim=32, **vkw), video_token_index=ids["<video>"],
            image_grid_pinpoints=[[TINY_IMAGE, TINY_IMAGE]], image_seq_length=grid * grid,
            video_seq_length=(grid // 2) ** 2 * 8, **common)
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**vkw), video_token_index=ids["<video>"],
                                       image_grid_pinpoints=[[TINY_IMAGE, TINY_IMAGE]], **common)
    if family == "video_llava":
        return tf.VideoLlavaConfig(vision_config=tf.CLIPVisionConfig(projection_dim=32, **vkw),
                                   video_token_index=ids["<video>"], image_seq_length=grid * grid,
                                   video_seq_length=(grid * grid + 1) * 8, **common)
    return tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(projection_dim=32, **vkw),
                          image_seq_length=grid * grid, **common)


def _llava_tokenizer():
    tok = build_tokenizer(LLAVA_SPECIAL, vocab_size=512, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                          add_bos=True)
    tok.add_special_tokens({"additional_special_tokens": ["<video>", "<image>"]})
    return tok


def _seq2seq_tokenizer():
    tok = build_tokenizer(SEQ2SEQ_SPECIAL, vocab_size=512, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                          add_bos=False)
    tok.add_special_tokens({"additional_special_tokens": list(LANG_CODES) + ["<mask>"]})
    return tok


def _m2m_config(tok, dims: dict):
    """NLLB-200's shape of config: scale_embedding, eos as decoder start, tied embeddings, no layerdrop."""
    bos, pad, eos = (tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>"))
    return M2M100Config(scale_embedding=True, activation_function="relu", encoder_layerdrop=0.0,
                        decoder_layerdrop=0.0, bos_token_id=bos, pad_token_id=pad, eos_token_id=eos,
                        decoder_start_token_id=eos, tie_word_embeddings=True, **dims)


def _build_llava(out: Path, family: str) -> None:
    tok = _llava_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
    model = AutoModelForImageTextToText.from_config(_llava_config(family, ids, len(tok)))
    model.generation_config = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                                               pad_token_id=ids["<pad>"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    siglip = family == "llava_onevision"
    write_vision_processor_files(out, size=TINY_IMAGE, mean=[0.5] * 3 if siglip else CLIP_MEAN,
                                 std=[0.5] * 3 if siglip else CLIP_STD, patch_size=TINY_PATCH,
                                 processor_class=PROCESSOR_CLASSES[family])


# Real shapes for GPU throughput checks (weights cannot be downloaded there): llava-hf/LLaVA-NeXT-Video-7B-hf and
# facebook/nllb-200-distilled-600M as in their config.json. The tiny tokenizer stands in (its ids < vocab).
SHAPES = {
    "llava-next-video-7b": {
        "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
                 "rms_norm_eps": 1e-5},
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "image_size": 336, "patch_size": 14, "projection_dim": 768}},
    "nllb-600m": {"d_model": 1024, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 16,
                  "decoder_attention_heads": 16, "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096,
                  "vocab_size": 256206, "max_position_embeddings": 1024, "dropout": 0.1, "attention_dropout": 0.1},
}
SHAPE_KINDS = {"llava-next-video-7b": "llava", "nllb-600m": "seq2seq"}


def build_shaped(shape: str, out_dir: str | Path) -> Path:
    """Config, tokenizer and processor files of a full-size model, NO weights (billions of random numbers are
    faster to make on the GPU than to write and read): load it with ModelConfig(random_init=True)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: expected one of {sorted(SHAPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if SHAPE_KINDS[shape] == "llava":
        tok = _llava_tokenizer()
        ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
        dims = SHAPES[shape]
        text = tf.LlamaConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                              **dims["text"])
        cfg = tf.LlavaNextVideoConfig(vision_config=tf.CLIPVisionConfig(**dims["vision"]), text_config=text,
                                      video_token_index=ids["<video>"], image_token_index=ids["<image>"],
                                      pad_token_id=ids["<pad>"])
        size, patch = dims["vision"]["image_size"], dims["vision"]["patch_size"]
        write_vision_processor_files(out, size=size, mean=CLIP_MEAN, std=CLIP_STD, patch_size=patch)
    else:
        tok = _seq2seq_tokenizer()
        cfg = _m2m_config(tok, SHAPES[shape])
    cfg.architectures = [_ARCHITECTURES[cfg.model_type]]
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return out


_ARCHITECTURES = {"llava_next_video": "LlavaNextVideoForConditionalGeneration",
                  "m2m_100": "M2M100ForConditionalGeneration"}


PROCESSOR_CLASSES = {"llava_next_video": "LlavaNextVideoProcessor", "llava_onevision": "LlavaOnevisionProcessor",
                     "video_llava": "VideoLlavaProcessor", "llava": "LlavaProcessor"}


def write_vision_processor_files(out: Path, *, size: int, mean, std, patch_size: int,
                                 processor_class: str = "LlavaNextVideoProcessor") -> None:
    """The JSON files HF processors read (fields as in llava-hf checkpoints); vtt reads size/mean/std itself."""
    common = {"do_resize": True, "size": {"shortest_edge": size}, "do_center_crop": True,
              "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": True,
              "processor_class": processor_class}
    image = dict(common, image_processor_type="LlavaNextImageProcessor",
                 image_grid_pinpoints=[[size, size]])
    video = dict(common, video_processor_type="LlavaNextVideoVideoProcessor")
    proc = {"processor_class": processor_class, "patch_size": patch_size, "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1, "video_token": "<video>", "image_token": "<image>"}
    for name, data in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video),
                       ("processor_config.json", proc)):
        (out / name).write_text(json.dumps(data, indent=2) + "\n")


TINY_SEQ2SEQ = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 64,
                "decoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                "max_position_embeddings": 256, "dropout": 0.0, "attention_dropout": 0.0}


def _build_seq2seq(out: Path) -> None:
    tok = _seq2seq_tokenizer()
    cfg = _m2m_config(tok, {"vocab_size": len(tok), **TINY_SEQ2SEQ})
    model = M2M100ForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.eos_token_id, forced_bos_token_id=tok.convert_tokens_to_ids("eng_Latn"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
