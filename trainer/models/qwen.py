"""Qwen-VL adapter (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; family from config.json's model_type).

A clip becomes what the checkpoint's own processor makes of it: `pixel_values_videos` (flattened 2-frame patches),
`video_grid_thw`, the video tokens its processor writes into the text (Qwen3-VL: a `<t seconds>` stamp and its
own start/end tokens per temporal patch), `second_per_grid_ts` for Qwen2.5-VL and `mm_token_type_ids`, from which
the model's own get_rope_index builds the M-RoPE positions. Times come from the frames' real pts
(`vtt.timestamps`, written by vtt-prep). Pixels come from the checkpoint's video processor (AutoVideoProcessor)
where it imports (it needs torchvision); without torchvision, from `vtt.trainer.inputs.qwen_video`, a torch port of the
same steps (smart_resize, bicubic resize, rescale/normalise, temporal pairs, patch layout) that the tests check
against the processors where they run. Text goes through the checkpoint's chat template; loss on answers only.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText
from vtt.shards.conversation import SampleError
from vtt.shards import sample_meta
from vtt.trainer.config import ConfigError
from vtt.trainer.inputs.chat import PLACEHOLDERS, Turn, conversation_of, encode_conversation, fit_turns
from vtt.trainer.inputs.packing import pack, real_tokens
from vtt.trainer.inputs.qwen_video import QWEN_FAMILIES, VideoSpec, group_times, load_video_processor, video_inputs
from vtt.trainer.inputs.text import render
from vtt.trainer.models.batching import greedy_generate, pad_left, pad_right
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.models.model_io import load_pretrained, load_tokenizer, save_checkpoint
from vtt.trainer.models.model_setup import apply_lora, enable_gradient_checkpointing, set_trainable

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json", "chat_template.jinja")
DEFAULT_PROMPT = "<video>\nDescribe this video."
VISION_PART = "visual."
MERGER_PART = "visual.merger"
# the class whose get_rope_index makes a family's M-RoPE positions (packed rows: per sample)
ROPE_MODELS = {"qwen2_vl": "Qwen2VLModel", "qwen2_5_vl": "Qwen2_5_VLModel", "qwen3_vl": "Qwen3VLModel"}


def frame_times(sample: dict, n: int) -> list[float]:
    """The frames' real pts from vtt-prep's provenance; frame index / 24 fps (the processors' own fallback)
    when a shard lacks them (vtt.shards.sample_meta)."""
    return sample_meta.frame_times(sample.get("meta") or {}, n)


def setup_model(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """Checkpointing, LoRA and freezing on a loaded model (any device, meta too: vtt.trainer.run.memory)."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    keep = [MERGER_PART] if cfg.train_merger else []
    if cfg.lora:
        model = apply_lora(model, cfg, keep_trainable=keep + ([VISION_PART] if cfg.train_vision else []))
    frozen = [] if cfg.train_vision else [VISION_PART]
    frozen += ["language_model", "lm_head"] if cfg.freeze_llm else []
    for name, p in model.named_parameters():
        if any(f in name for f in frozen) and not any(k in name for k in keep):
            p.requires_grad_(False)
    set_trainable(model, [])  # raises when nothing is left to train
    return model


class QwenAdapter:
    """vtt.trainer.models.adapter.ModelAdapter for Qwen2-VL, Qwen2.5-VL and Qwen3-VL."""
    needs_frames = True
    cast_buffers = False  # RoPE inv_freq stays fp32
    causal = True
    setup_model = staticmethod(setup_model)

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.config = AutoConfig.from_pretrained(cfg.model_path)
        self.family = self.config.model_type
        if self.family not in QWEN_FAMILIES:  # a ConfigError: one line and exit 1 from vtt-train, before training
            raise ConfigError(f"{cfg.model_path}: model_type {self.family!r} is not a Qwen-VL family vtt trains "
                             f"(one of {QWEN_FAMILIES}); use --model llava or --model seq2seq for other models")
        self.hidden_size = self.config.text_config.hidden_size
        self.max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        self.tokenizer = load_tokenizer(cfg.model_path)
        if not self.tokenizer.chat_template:
            raise ConfigError(f"{cfg.model_path}: the tokenizer has no chat template; Qwen-VL prompts are rendered "
                             "through it (chat_template.jinja or tokenizer_config.json)")
        self.spec = VideoSpec.from_checkpoint(cfg.model_path, self.family)
        self.processor = load_video_processor(cfg.model_path)  # None without torchvision: the torch port
        self.video_id = self.config.video_token_id
        self.vision_start = self.tokenizer.convert_ids_to_tokens(self.config.vision_start_token_id)
        self.vision_end = self.tokenizer.convert_ids_to_tokens(self.config.vision_end_token_id)
        self.placeholder = self.vision_start + self.tokenizer.convert_ids_to_tokens(self.video_id) + self.vision_end
        self.prompt = cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPT

    # -- model -------------------------------------------------------------------------------------------------
    def load_model(self) -> torch.nn.Module:
        return self.setup(load_pretrained(AutoModelForImageTextToText, self.cfg))

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        return setup_model(model, self.cfg)

    # -- samples -----------------------------------------------------------------------------------------------
    def _frames(self, sample: dict) -> tuple[np.ndarray, list[float]]:
        key, frames = sample.get("key", "?"), sample.get("frames")
        if frames is None or len(frames) == 0:
            raise SampleError(f"sample {key!r} has no frames, but {self.cfg.model_path} ({self.family}) needs "
                              "video frames: were the shards written by vtt-prep with frames?")
        arr = np.stack([np.asarray(f) for f in frames])
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise SampleError(f"sample {key!r}: frames must be uint8 RGB (T,H,W,3) of one size, got {arr.shape} "
                              f"{arr.dtype}")
        times = frame_times(sample, len(arr))
        if self.cfg.num_frames:  # uniform resample; the times go with their frames
            idx = np.linspace(0, len(arr) - 1, self.cfg.num_frames).round().astype(int)
            arr, times = arr[idx], [times[i] for i in idx]
        if len(arr) < self.spec.temporal_patch_size:
            raise SampleError(f"sample {key!r}: {len(arr)} frame(s), fewer than one temporal patch of "
                              f"{self.spec.temporal_patch_size} for {self.cfg.model_path} (--num-frames)")
        return arr, times

    def _video(self, sample: dict) -> dict:
        frames, times = self._frames(sample)
        try:
            return video_inputs(frames, times, self.spec, self.processor)
        except ValueError as e:
            raise SampleError(f"sample {sample.get('key', '?')!r}: {e}") from None

    def _video_ids(self, video: dict) -> list[int]:
        """The tokens the family's processor puts where the chat template wrote <|video_pad|>."""
        t, h, w = (int(x) for x in video["video_grid_thw"])
        return self._video_ids_of(t, h * w // self.spec.merge_size ** 2, video["times"])

    def _video_ids_of(self, t: int, per_frame: int, times: list[float]) -> list[int]:
        """t temporal patches of per_frame tokens (Qwen3-VL: each after its `times` stamp)."""
        if self.family != "qwen3_vl":
            return [self.video_id] * (t * per_frame)
        ids = []
        for stamp in times:  # Qwen3VLProcessor.replace_video_token
            ids += self.tokenizer(f"<{stamp:.1f} seconds>", add_special_tokens=False).input_ids
            ids += [self.config.vision_start_token_id] + [self.video_id] * per_frame + [self.config.vision_end_token_id]
        return ids

    def _turns(self, sample: dict) -> list[Turn]:
        turns = conversation_of(sample) if self.cfg.conversations else None
        if turns is not None:
            return turns
        prompt = render(self.prompt, sample, "prompt")
        return [Turn("user", prompt), Turn("assistant", render(self.cfg.target_template, sample,
                                                                "target_template").strip())]

    def _text_ids(self, key: str, turns: list[Turn], generation: bool = False
                  ) -> tuple[list[int], list[int], int, list]:
        """ids (one <|video_pad|>), labels, the placeholder's index, and [(answer, its first token index)]."""
        ids, labels, answers, starts = encode_conversation(self.tokenizer, turns, self.tokenizer.chat_template,
                                                           self.placeholder, generation, add_special_tokens=False)
        where = [k for k, i in enumerate(ids) if i == self.video_id]
        if len(where) != 1:
            raise SampleError(f"sample {key!r}: the rendered conversation holds {len(where)} video placeholders")
        return ids, labels, where[0], list(zip(answers, starts))

    def _sample_ids(self, sample: dict, video: dict) -> tuple[list[int], list[int]]:
        """ids and labels within the length limit by `model.overflow` (drop: a counted SampleError, or cut the
        oldest exchanges)."""
        key, limit = sample.get("key", "?"), self.cfg.max_length or self.max_positions
        turns, vid = self._turns(sample), self._video_ids(video)

        def encode(ts: list[Turn]) -> tuple[list[int], list[int]]:
            ids, labels, at, _ = self._text_ids(key, ts)
            return ids[:at] + vid + ids[at + 1:], labels[:at] + [-100] * len(vid) + labels[at + 1:]
        return fit_turns(key, turns, encode, limit, self.cfg.mask_history, self.cfg.overflow)

    def check_sample(self, sample: dict) -> None:
        self._sample_ids(sample, self._video(sample))

    def _vision_kwargs(self, videos: list[dict], ids: list[list[int]], left: bool) -> dict:
        out = {"pixel_values_videos": torch.cat([v["pixel_values_videos"] for v in videos]),
               "video_grid_thw": torch.stack([v["video_grid_thw"] for v in videos])}
        if self.family == "qwen2_5_vl":
            out["second_per_grid_ts"] = torch.tensor([v["second_per_grid"] for v in videos], dtype=torch.float32)
        # 2 marks video tokens (ProcessorMixin.create_mm_token_type_ids); the model's get_rope_index reads it
        types = [[2 if i == self.video_id else 0 for i in x] for x in ids]
        out["mm_token_type_ids"] = (pad_left if left else pad_right)(types, 0)
        return out

    def collate(self, samples: list[dict], packed: bool = False) -> dict[str, torch.Tensor]:
        """Right-padded ids, mask, labels (-100 but answers + end-of-turn), video inputs, mm_token_type_ids;
        `packed`: one row without padding and per-sample M-RoPE positions (vtt.trainer.inputs.packing)."""
        videos = [self._video(s) for s in samples]
        pairs = [self._sample_ids(s, v) for s, v in zip(samples, videos)]
        ids, labels = [x for x, _ in pairs], [y for _, y in pairs]
        if packed:
            return self._packed(videos, ids, labels)
        return {"input_ids": pad_right(ids, self.tokenizer.pad_token_id),
                "attention_mask": pad_right([[1] * len(x) for x in ids], 0),
                "labels": pad_right(labels, -100),
                **self._vision_kwargs(videos, ids, left=False)}

    def _packed(self, videos: list[dict], ids: list[list[int]], labels: list[list[int]]) -> dict:
        """One row; position_ids (4, 1, N): the text positions restarting per sample (transformers builds the
        block-diagonal mask from them), then the model's own M-RoPE positions of each sample."""
        vision = self._vision_kwargs(videos, ids, left=False)
        mask = pad_right([[1] * len(x) for x in ids], 0).bool()
        extra = {"second_per_grid_ts": vision["second_per_grid_ts"]} if "second_per_grid_ts" in vision else {}
        rope, _ = self._rope_model().get_rope_index(
            pad_right(ids, self.tokenizer.pad_token_id), mm_token_type_ids=vision["mm_token_type_ids"],
            video_grid_thw=vision["video_grid_thw"], attention_mask=mask.long(), **extra)
        out = pack(ids, labels)
        out["position_ids"] = torch.cat([out["position_ids"][None], rope[:, mask][:, None]])
        vision["mm_token_type_ids"] = vision["mm_token_type_ids"][mask][None]
        return {**out, **vision}

    def _rope_model(self) -> torch.nn.Module:
        """The family's model class without weights or layers: its get_rope_index reads only the config, so the
        positions are the model's own (made lazily: the loader's workers get the adapter without it)."""
        if getattr(self, "_rope", None) is None:
            cls = getattr(transformers, ROPE_MODELS[self.family])
            stub = cls.__new__(cls)
            torch.nn.Module.__init__(stub)
            stub.config = self.config
            self._rope = stub
        return self._rope

    def sample_length(self, sample: dict, frames: tuple[int, int, int] | None) -> tuple[int]:
        """Its conversation's ids with the video tokens its frames resize to (the processor's smart_resize) and,
        Qwen3-VL, their time stamps (from the sample's timestamps, as collate makes them); a history cut by
        model.overflow is left out. `frames`: the (count, height, width) the loader hands over."""
        key = sample.get("key", "?")
        ids, _, _, _ = self._text_ids(key, self._turns(sample))
        if frames is None:
            return len(ids),
        t, h, w = frames
        times = frame_times(sample, t)
        if self.cfg.num_frames:  # collate's uniform resample (_frames)
            times = [times[i] for i in np.linspace(0, t - 1, self.cfg.num_frames).round().astype(int)]
        try:
            rh, rw = self.spec.resized(len(times), h, w)
        except ValueError as e:
            raise SampleError(f"sample {key!r}: {e}") from None
        patches = -(-len(times) // self.spec.temporal_patch_size)
        per_frame = (rh // self.spec.patch_size) * (rw // self.spec.patch_size) // self.spec.merge_size ** 2
        return len(ids) - 1 + len(self._video_ids_of(patches, per_frame,
                                                     group_times(times, self.spec.temporal_patch_size))),

    def num_tokens(self, batch: dict) -> int:
        return real_tokens(batch)

    # -- output ------------------------------------------------------------------------------------------------
    def export(self, model, out_dir, state_dict=None):
        """from_pretrained-loadable; LoRA merged; tokenizer, chat template and processor JSON copied."""
        return save_checkpoint(model, out_dir, self.tokenizer, self.cfg.model_path, PROCESSOR_FILES, state_dict)

    def eval_items(self, sample: dict) -> list[dict]:
        """Per assistant turn (its history from the data, teacher forced) or the caption:
        [{turn, question, reference, ids (one <|video_pad|>), at}]."""
        self._frames(sample)
        turns = self._turns(sample)
        # one encoding of the whole conversation: the prompt of turn i is exactly what training puts before it
        ids, _, at, answers = self._text_ids(sample.get("key", "?"), turns)
        video_at = next(i for i, x in enumerate(turns) if any(p in x.text for p in PLACEHOLDERS))
        return [{"turn": a.turn, "question": turns[a.turn - 1].text, "reference": turns[a.turn].text,
                 "ids": ids[:k], "at": at} for a, k in answers if a.turn > video_at]

    def generate_items(self, model, pairs: list[tuple[dict, dict]], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers for (sample, eval item) pairs in one left-padded batch."""
        videos = [self._video(s) for s, _ in pairs]
        prompts = [it["ids"][:it["at"]] + self._video_ids(v) + it["ids"][it["at"] + 1:]
                   for (_, it), v in zip(pairs, videos)]
        return greedy_generate(model, self.tokenizer, prompts, max_new_tokens,
                               self._vision_kwargs(videos, prompts, left=True))

    def generate(self, model, samples: list[dict], max_new_tokens: int = 32) -> list[str]:
        """Greedy captions (the caption prompt, whatever else the sample carries)."""
        pairs = []
        for s in samples:
            turns = [Turn("user", render(self.prompt, s, "prompt"))]
            ids, _, at, _ = self._text_ids(s.get("key", "?"), turns, generation=True)
            pairs.append((s, {"ids": ids, "at": at}))
        return self.generate_items(model, pairs, max_new_tokens)
