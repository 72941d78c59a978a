"""Tiny random Qwen-VL checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) saved like the real ones: config.json,
safetensors, a byte-level tokenizer with Qwen's special tokens and chat template, preprocessor_config.json and
video_preprocessor_config.json (the fields the Qwen image/video processors read), generation_config.json."""
from __future__ import annotations

import json
from pathlib import Path

import transformers as tf
from transformers import AutoModelForImageTextToText, GenerationConfig
from vtt.trainer.models.presets_tokenizer import build_tokenizer

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|video_pad|>", "<|image_pad|>"]
# Qwen2-VL's chat template (Qwen2.5-VL and Qwen3-VL write video parts the same way), string or part contents.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_PATCH = 8     # x merge 2 = 16: a 32x32 frame pair is 4 tokens, 64x64 is 16
# four layers, as the tiny llava (trainer/models/presets.py): room to tell questions apart and read the frames
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 2048}
# mrope_section halves of head_dim 16 split over (t, h, w). The base is 4, not the real 10^6: with 8 frequency
# pairs, 10^6 leaves the h and w sections rotating by hundredths of a radian across a 4x4 token grid, so the
# tiny model could not locate the shape and learnt no motion (demo direction 28% at 10^6, 77% at 10, 92% at 4)
TINY_ROPE = {"rope_type": "default", "rope_theta": 4.0, "mrope_section": [2, 3, 3]}
TINY_PIXELS = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
PROCESSORS = {"qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
              "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
              "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor")}


def qwen_tokenizer():
    tok = build_tokenizer(QWEN_SPECIAL, vocab_size=512, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                          unk="<|endoftext|>", add_bos=False)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def qwen_config(family: str, tok, text: dict, vision: dict, rope: dict):
    """A Qwen-VL config of `family` with the tokenizer's special token ids."""
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>"))}
    specials = {"bos_token_id": None, "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
                "pad_token_id": tok.pad_token_id}
    text = dict(text, vocab_size=len(tok), rope_parameters=rope, **specials)
    cls = {"qwen2_vl": tf.Qwen2VLConfig, "qwen2_5_vl": tf.Qwen2_5_VLConfig, "qwen3_vl": tf.Qwen3VLConfig}[family]
    cfg = cls(text_config=text, vision_config=vision, **ids)
    cfg.architectures = [{"qwen2_vl": "Qwen2VLForConditionalGeneration",
                          "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                          "qwen3_vl": "Qwen3VLForConditionalGeneration"}[family]]
    return cfg


def tiny_vision(family: str) -> dict:
    hidden = TINY_TEXT["hidden_size"]
    common = {"depth": 2, "patch_size": TINY_PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2_vl":
        return dict(common, embed_dim=32, hidden_size=hidden, mlp_ratio=2, num_heads=2)
    if family == "qwen2_5_vl":
        return dict(common, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                    window_size=32, fullatt_block_indexes=[1])
    return dict(common, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                num_position_embeddings=64, deepstack_visual_indexes=[0])


def write_qwen_processor_files(out: Path, family: str, patch_size: int, pixels: dict,
                               video_pixels: dict | None = None) -> None:
    """preprocessor_config.json / video_preprocessor_config.json as the Qwen checkpoints ship them."""
    proc, video_cls = PROCESSORS[family]
    mean, std = ([0.5] * 3, [0.5] * 3) if family == "qwen3_vl" else (
        [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": mean, "image_std": std, "do_convert_rgb": True, "patch_size": patch_size,
              "temporal_patch_size": 2, "merge_size": 2, "resample": 3, "processor_class": proc}
    image = dict(common, image_processor_type="Qwen2VLImageProcessor", size=dict(pixels),
                 min_pixels=pixels["shortest_edge"], max_pixels=pixels["longest_edge"])
    video = dict(common, video_processor_type=video_cls, size=dict(video_pixels or pixels),
                 do_sample_frames=False)
    for name, data in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video)):
        (out / name).write_text(json.dumps(data, indent=2) + "\n")


def build_tiny_qwen(out_dir: str | Path, family: str) -> Path:
    """A random tiny Qwen-VL of `family` in out_dir; a CPU step on 8 clips of 4 frames takes well under 1 s."""
    if family not in QWEN_FAMILIES:
        raise ValueError(f"unknown Qwen-VL family {family!r}: expected one of {QWEN_FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = qwen_tokenizer()
    rope = dict(TINY_ROPE, mrope_interleaved=True, mrope_section=[4, 2, 2]) if family == "qwen3_vl" else TINY_ROPE
    text = dict(TINY_TEXT, head_dim=16) if family == "qwen3_vl" else TINY_TEXT
    cfg = qwen_config(family, tok, text, tiny_vision(family), rope)
    model = AutoModelForImageTextToText.from_config(cfg)
    model.generation_config = GenerationConfig(eos_token_id=cfg.text_config.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # Qwen3-VL's video budget counts every frame (t*h*w); 16 frames of 64x64 fit without a resize
    video = {"shortest_edge": TINY_PIXELS["shortest_edge"], "longest_edge": 64 * 64 * 16} \
        if family == "qwen3_vl" else None
    write_qwen_processor_files(out, family, TINY_PATCH, TINY_PIXELS, video)
    return out


# Qwen/Qwen2.5-VL-7B-Instruct's config.json and preprocessor_config.json (no weights: GPU checks and the meta-device
# test). The tiny tokenizer stands in: its ids are below the vocabulary size.
QWEN25_7B = {
    "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
             "sliding_window": 32768, "max_window_layers": 28, "hidden_act": "silu"},
    "rope": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
               "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu"},
    "vocab_size": 152064,
    "pixels": {"shortest_edge": 3136, "longest_edge": 12845056},
}


def build_shaped_qwen(out_dir: str | Path) -> Path:
    """Config, tokenizer and processor files of Qwen2.5-VL-7B, no weights (ModelConfig(random_init=True))."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = qwen_tokenizer()
    d = QWEN25_7B
    cfg = qwen_config("qwen2_5_vl", tok, d["text"], d["vision"], d["rope"])
    cfg.text_config.vocab_size = d["vocab_size"]
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    # the 7B repo ships preprocessor_config.json only; its video processor reads min/max pixels from it
    write_qwen_processor_files(out, "qwen2_5_vl", 14, d["pixels"])
    (out / "video_preprocessor_config.json").unlink()
    return out
