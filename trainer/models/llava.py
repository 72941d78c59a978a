"""LLaVA-family adapter: prompt with the model's exact number of video tokens, frames -> pixel values with the
checkpoint's own size/mean/std, loss on answer tokens only."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForImageTextToText
from vtt.shards.conversation import SampleError
from vtt.trainer.inputs.chat import (
    FAMILY_TEMPLATES,
    PLACEHOLDERS,
    Turn,
    conversation_of,
    encode_conversation,
    fit_turns,
)
from vtt.trainer.inputs.images import to_pixel_values
from vtt.trainer.inputs.packing import pack, real_tokens
from vtt.trainer.inputs.text import encode, marks_word_starts, render, render_spans
from vtt.trainer.models.batching import greedy_generate, pad_right
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.models.model_io import load_pretrained, load_tokenizer, read_json, save_checkpoint
from vtt.trainer.models.model_setup import apply_lora, enable_gradient_checkpointing, set_trainable
from vtt.trainer.models.presets import PROCESSOR_CLASSES, write_vision_processor_files

VISION_PARTS = ["vision_tower", "video_tower", "image_tower"]
PROJECTOR_PARTS = ["multi_modal_projector", "vision_resampler", "image_newline"]
LLM_PARTS = ["language_model", "lm_head"]
# Each family's own chat format (as in the llava-hf chat templates); <video> becomes the model's video tokens.
DEFAULT_PROMPTS = {
    "llava_next_video": "USER: <video>\nDescribe this video. ASSISTANT:",
    "video_llava": "USER: <video>\nDescribe this video. ASSISTANT:",
    "llava": "USER: <video>\nDescribe this video. ASSISTANT:",
    "llava_onevision": "<|im_start|>user <video>\nDescribe this video.<|im_end|><|im_start|>assistant\n",
}
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json", "chat_template.jinja")
# Used when a checkpoint has no processor JSON: CLIP's statistics, which all llava-hf checkpoints use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VideoLayout:
    """How a LLaVA-family model sees a clip: which placeholder token, how many per frame, which pixel kwarg."""
    model_type: str
    token_id: int
    per_frame: int
    per_video: int      # extra tokens once per clip (OneVision's newline)
    pixel_key: str      # pixel_values_videos (B,T,3,H,W) or pixel_values (B*T,3,H,W) for image models
    image_size: int

    def num_tokens(self, frames: int) -> int:
        return frames * self.per_frame + self.per_video


def video_layout(config) -> VideoLayout:
    """Token count per clip, computed from the config the same way each model class computes its features."""
    mt = config.model_type
    if mt not in ("llava_next_video", "llava_onevision", "video_llava", "llava"):
        raise ValueError(f"model type {mt!r} is not a supported LLaVA video family "
                         "(llava_next_video, llava_onevision, video_llava, llava)")
    vc = config.vision_config
    size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
    patch = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
    grid = size // patch
    has_cls = vc.model_type in ("clip_vision_model",)  # SigLIP has no CLS token
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    per_image = grid * grid + (1 if has_cls and full else 0)
    if mt == "llava_next_video":  # AvgPool/MaxPool/Conv with kernel = stride: floor
        stride = config.spatial_pool_stride
        return VideoLayout(mt, config.video_token_id, (grid // stride) ** 2, 0, "pixel_values_videos", size)
    if mt == "llava_onevision":  # bilinear resize to ceil(g/2), plus one newline per video
        return VideoLayout(mt, config.video_token_id, math.ceil(grid / 2) ** 2, 1, "pixel_values_videos", size)
    if mt == "video_llava":  # video features keep CLS whatever the strategy
        return VideoLayout(mt, config.video_token_id, grid * grid + (1 if has_cls else 0), 0,
                           "pixel_values_videos", size)
    return VideoLayout(mt, config.image_token_id, per_image, 0, "pixel_values", size)  # llava: frames as images


def read_norm(model_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean/std from the checkpoint's video (else image) processor JSON."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        data = read_json(model_path, name)
        if data and "image_mean" in data and "image_std" in data:
            return tuple(data["image_mean"]), tuple(data["image_std"])
    return CLIP_MEAN, CLIP_STD


def setup_model(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """Checkpointing, LoRA and freezing on a loaded model (any device, meta too: vtt.trainer.run.memory)."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora:  # peft freezes all but the adapters; the projector keeps training (it is small)
        return apply_lora(model, cfg, keep_trainable=PROJECTOR_PARTS)
    frozen = (VISION_PARTS if cfg.freeze_vision or cfg.projector_only else []) + \
             (LLM_PARTS if cfg.freeze_llm or cfg.projector_only else [])
    set_trainable(model, frozen)
    return model


class LlavaAdapter:
    """vtt.trainer.models.adapter.ModelAdapter for the LLaVA families (video_layout)."""
    needs_frames = True
    cast_buffers = False  # RoPE inv_freq must stay fp32
    causal = True  # token t's logits predict label t+1 (vtt.trainer.run.loss)
    setup_model = staticmethod(setup_model)

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.config = AutoConfig.from_pretrained(cfg.model_path)
        self.layout = video_layout(self.config)
        self.hidden_size = self.config.text_config.hidden_size
        self.max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        self.tokenizer = load_tokenizer(cfg.model_path)
        self.mean, self.std = read_norm(cfg.model_path)
        self.placeholder = self.tokenizer.convert_ids_to_tokens(self.layout.token_id)
        self.prompt = cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPTS[self.layout.model_type]
        # The answer follows the prompt after one space ("ASSISTANT: a red ..."), unless the prompt ends in
        # whitespace (chatml "assistant\n") or the tokenizer prefixes words with "▁" itself (SentencePiece).
        self.answer_sep = "" if self.prompt[-1:].isspace() or marks_word_starts(self.tokenizer) else " "

    # -- model -------------------------------------------------------------------------------------------------
    def load_model(self) -> torch.nn.Module:
        return self.setup(load_pretrained(AutoModelForImageTextToText, self.cfg))

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        return setup_model(model, self.cfg)

    # -- samples -----------------------------------------------------------------------------------------------
    def check_sample(self, sample: dict) -> None:
        """Raise SampleError naming the sample when this model cannot take it."""
        self._check_frames(sample)
        if self._turns(sample) is not None:  # validated there; its length is checked on the real ids
            return
        key, frames = sample.get("key", "?"), sample["frames"]
        t = self.cfg.num_frames or len(frames)
        need = self.layout.num_tokens(t) + len(self._prompt_ids(sample)[0]) + 1
        if self.max_positions and need > self.max_positions:
            raise SampleError(f"sample {key!r}: {t} frames need {self.layout.num_tokens(t)} video tokens, "
                              f"{need} with the prompt, over the model's {self.max_positions} positions: "
                              "use fewer frames (--num-frames)")
        render(self.cfg.target_template, sample, "target_template")

    def _check_frames(self, sample: dict) -> None:
        key = sample.get("key", "?")
        frames = sample.get("frames")
        if frames is None or len(frames) == 0:
            raise SampleError(f"sample {key!r} has no frames, but {self.cfg.model_path} ({self.layout.model_type}) "
                              "needs video frames: were the shards written by vtt-prep with frames?")
        for arr in (np.asarray(f) for f in frames):
            if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or min(arr.shape[:2]) < 1:
                raise SampleError(f"sample {key!r}: frames must be uint8 RGB (T,H,W,3), got a frame of shape "
                                  f"{arr.shape} dtype {arr.dtype}")

    def _prompt_ids(self, sample: dict) -> tuple[list[int], int]:
        """Prompt token ids holding ONE placeholder token, and its index."""
        text, data = render_spans(self.prompt, sample, "prompt", markup={"<video>": self.placeholder})
        ids = encode(self.tokenizer, text, data)
        where = [i for i, t in enumerate(ids) if t == self.layout.token_id]
        if len(where) != 1:
            raise ValueError(f"prompt {text!r} tokenizes to {len(where)} {self.placeholder!r} tokens, expected 1")
        return ids, where[0]

    def _answer_ids(self, sample: dict) -> list[int]:
        target = render(self.cfg.target_template, sample, "target_template").strip()
        text = self.answer_sep + target  # the answer is data through and through
        ids = encode(self.tokenizer, text, [(0, len(text))], add_special_tokens=False)
        return ids[: self.cfg.max_target_len] + [self.tokenizer.eos_token_id]

    def _frames(self, frames, t: int) -> np.ndarray:
        frames = np.stack(frames) if isinstance(frames, list) else np.asarray(frames)
        if self.cfg.num_frames:  # uniform resample (repeats frames of short clips)
            idx = np.linspace(0, len(frames) - 1, self.cfg.num_frames).round().astype(int)
            frames = frames[idx]
        if len(frames) < t:  # pad to the batch's longest clip by repeating the last frame
            frames = np.concatenate([frames, np.repeat(frames[-1:], t - len(frames), axis=0)])
        return frames

    def _pixels(self, samples: list[dict]) -> tuple[torch.Tensor, int]:
        t = self.cfg.num_frames or max(len(s["frames"]) for s in samples)
        size = (self.layout.image_size, self.layout.image_size)
        pix = torch.stack([to_pixel_values(self._frames(s["frames"], t), size, self.mean, self.std)
                           for s in samples])
        return pix, t

    def _pixel_kwargs(self, pix: torch.Tensor) -> dict:
        if self.layout.pixel_key == "pixel_values":
            return {"pixel_values": pix.flatten(0, 1)}
        return {"pixel_values_videos": pix}

    def _expand(self, prompt: list[int], at: int, t: int) -> list[int]:
        return prompt[:at] + [self.layout.token_id] * self.layout.num_tokens(t) + prompt[at + 1:]

    def _packed_pixels(self, samples: list[dict]) -> tuple[torch.Tensor, list[int]]:
        """Packed rows: each clip keeps its own frames, all in one (1, sum T, 3, H, W) video, which the
        per-frame families (every one but OneVision) encode frame by frame and merge at the video tokens in order.
        OneVision appends one newline per video, so its clips stay a (B, T, ...) batch padded to the longest."""
        if self.layout.per_video:
            pix, t = self._pixels(samples)
            return pix, [t] * len(samples)
        size = (self.layout.image_size, self.layout.image_size)
        clips = [to_pixel_values(self._frames(s["frames"], 0), size, self.mean, self.std) for s in samples]
        return torch.cat(clips)[None], [len(c) for c in clips]

    def _sample_ids(self, sample: dict, t: int) -> tuple[list[int], list[int]]:
        turns = self._turns(sample)
        if turns is not None:
            return self._conversation_ids(sample, turns, t)
        prompt, at = self._prompt_ids(sample)
        prompt = self._expand(prompt, at, t)
        answer = self._answer_ids(sample)
        return prompt + answer, [-100] * len(prompt) + answer

    def collate(self, samples: list[dict], packed: bool = False) -> dict[str, torch.Tensor]:
        """Model kwargs: right-padded ids, mask, labels (-100 except answer + eos), pixel values; `packed`: one
        row without padding, position ids per sample, no mask (vtt.trainer.inputs.packing)."""
        for s in samples:
            self.check_sample(s)
        if packed:
            pix, ts = self._packed_pixels(samples)
        else:
            pix, t = self._pixels(samples)
            ts = [t] * len(samples)
        pairs = [self._sample_ids(s, t) for s, t in zip(samples, ts)]
        ids, labels = [x for x, _ in pairs], [y for _, y in pairs]
        if packed:
            return {**pack(ids, labels), **self._pixel_kwargs(pix)}
        input_ids = pad_right(ids, self.tokenizer.pad_token_id)
        attention = pad_right([[1] * len(x) for x in ids], 0)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": pad_right(labels, -100),
                **self._pixel_kwargs(pix)}

    def _turns(self, sample: dict) -> list[Turn] | None:
        return conversation_of(sample) if self.cfg.conversations else None

    def _conversation_ids(self, sample: dict, turns: list[Turn], t: int) -> tuple[list[int], list[int]]:
        """ids and labels of a conversation sample, within the length limit by `model.overflow`: drop (a
        SampleError, counted by the data's on_corrupt policy) or cut history exchanges from the front."""
        key, limit = sample.get("key", "?"), self.cfg.max_length or self.max_positions
        return fit_turns(key, turns, lambda ts: self._turn_ids(key, ts, t), limit, self.cfg.mask_history,
                         self.cfg.overflow)

    def _template(self) -> str:
        return self.tokenizer.chat_template or FAMILY_TEMPLATES[self.layout.model_type]

    def _turn_ids(self, key: str, turns: list[Turn], t: int) -> tuple[list[int], list[int]]:
        ids, labels, _, _ = encode_conversation(self.tokenizer, turns, self._template(), self.placeholder)
        where = [k for k, i in enumerate(ids) if i == self.layout.token_id]
        if len(where) != 1:
            raise SampleError(f"sample {key!r}: the rendered conversation holds {len(where)} video placeholders")
        at, n = where[0], self.layout.num_tokens(t)
        return (ids[:at] + [self.layout.token_id] * n + ids[at + 1:],
                labels[:at] + [-100] * n + labels[at + 1:])

    def sample_length(self, sample: dict, frames: tuple[int, int, int] | None) -> tuple[int, int]:
        """(video tokens of its frames (cfg.num_frames when the adapter resamples), the rest of its ids alone)."""
        t = self.cfg.num_frames or (frames[0] if frames else 1)
        video = self.layout.num_tokens(t)
        return video, len(self._sample_ids(sample, t)[0]) - video

    def num_tokens(self, batch: dict) -> int:
        return real_tokens(batch)

    # -- output ------------------------------------------------------------------------------------------------
    def export(self, model, out_dir, state_dict=None):
        """Loadable with from_pretrained; LoRA merged; processor JSON copied (written if the source had none)."""
        out = save_checkpoint(model, out_dir, self.tokenizer, self.cfg.model_path, PROCESSOR_FILES, state_dict)
        if not (out / "preprocessor_config.json").is_file():
            write_vision_processor_files(out, size=self.layout.image_size, mean=self.mean, std=self.std,
                                         patch_size=self.config.vision_config.patch_size,
                                         processor_class=PROCESSOR_CLASSES[self.layout.model_type])
        return out

    def eval_items(self, sample: dict) -> list[dict]:
        """What to answer for scoring: per assistant turn of a conversation (its history from the data, teacher
        forced), or the caption: [{turn, question, reference, ids (one placeholder), at}]."""
        self._check_frames(sample)
        turns = self._turns(sample)
        if turns is None:
            ids, at = self._prompt_ids(sample)
            question = render_spans(self.prompt, sample, "prompt")[0]
            reference = render(self.cfg.target_template, sample, "target_template").strip()
            return [{"turn": 0, "question": question, "reference": reference, "ids": ids, "at": at}]
        # one encoding of the whole conversation: the prompt of turn i is exactly what training puts before it
        ids, _, answers, starts = encode_conversation(self.tokenizer, turns, self._template(), self.placeholder)
        video_at = next(i for i, x in enumerate(turns) if any(p in x.text for p in PLACEHOLDERS))
        return [{"turn": a.turn, "question": turns[a.turn - 1].text, "reference": turns[a.turn].text,
                 "ids": ids[:k], "at": ids.index(self.layout.token_id)}
                for a, k in zip(answers, starts) if a.turn > video_at]  # not answers given before the video

    def generate_items(self, model, pairs: list[tuple[dict, dict]], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers for (sample, eval item) pairs in one batch (left-padded, frames as in training)."""
        pix, t = self._pixels([s for s, _ in pairs])
        prompts = [self._expand(item["ids"], item["at"], t) for _, item in pairs]
        return greedy_generate(model, self.tokenizer, prompts, max_new_tokens, self._pixel_kwargs(pix))

    def generate(self, model, samples: list[dict], max_new_tokens: int = 32) -> list[str]:
        """Greedy captions for samples (the caption prompt, whatever else the sample carries)."""
        for s in samples:
            self._check_frames(s)
        pairs = [(s, {"ids": ids, "at": at}) for s in samples for ids, at in [self._prompt_ids(s)]]
        return self.generate_items(model, pairs, max_new_tokens)
