"""`ModelAdapter`: everything the rest of vtt-train, vtt-eval and vtt-caption may ask of a model family.

The loop, evaluation, export, the planner and the tools call an adapter through these members only
(tests/test_adapters.py checks every `adapter.<member>` they use is listed here, and that every registered
adapter has them all); one implementation per family lives in models/<family>.py, the registry that picks one
for a ModelConfig in models/registry.py. Anything else on an adapter is private to its family.

Words used below. A *sample* is one dict from the streaming reader (vtt.trainer.data.read): "key", "meta" (the
sidecar's fields), "text", and "frames" (a list of uint8 RGB arrays (H, W, 3), in time order) when the data is
read with frames. A *batch* is the dict `collate` returns, the model's forward kwargs plus "labels".
Per-sample failures (a missing template field, no frames, over the length limit) raise
`vtt.shards.conversation.SampleError` naming the sample's key; the data reader counts them by its on_corrupt
policy. Checkpoint problems found when the adapter is made (unsupported model type, no chat template) raise
ValueError or the trainer's ConfigError with the path in one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from vtt.trainer.models.model_config import ModelConfig


@runtime_checkable
class ModelAdapter(Protocol):
    """One model family's side of training: made from a ModelConfig by `vtt.trainer.models.registry.get_adapter`, which
    reads the checkpoint's config, tokenizer and processor files but no weights (cheap: milliseconds to a few
    seconds); weights load in `load_model`."""

    cfg: ModelConfig
    """The settings the adapter was made with (templates, prompt, LoRA, freezing, length limits)."""

    tokenizer: Any
    """The checkpoint's tokenizer (a transformers PreTrainedTokenizerBase), pad token set; exported with the model."""

    needs_frames: bool
    """Whether samples must carry decoded frames: False lets the reader skip JPEG decoding (text-only models)."""

    cast_buffers: bool
    """Whether DeepSpeed's bf16 mode must cast the model's buffers with its weights (M2M100's fp32 sinusoidal
    position table); False keeps buffers such as RoPE's inv_freq in fp32."""

    causal: bool
    """True: the logits at token t predict labels[t + 1] (decoder-only); False: logits and labels are aligned
    (encoder-decoder, whose decoder inputs are already shifted). vtt.trainer.run.loss shifts by it."""

    hidden_size: int
    """Width of the language model's hidden states: sizes DeepSpeed's communication buckets."""

    def load_model(self) -> torch.nn.Module:
        """The model with the checkpoint's weights (or its config's initialiser under cfg.random_init) in
        cfg.load_dtype on the CPU, set up for training by `setup`. Cost: reads every weight once."""
        ...

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """`setup_model(model, self.cfg)`: the model as it trains (see there); returns the model to use, which
        is a new wrapper under LoRA."""
        ...

    @staticmethod
    def setup_model(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
        """Gradient checkpointing, LoRA and freezing by the family's rules on a loaded model, on any device (the
        meta device too: the memory planner calls it on the class, without an adapter, to count exactly what
        trains). Raises ValueError when the options leave nothing trainable or LoRA's targets match nothing.
        No weights are read or copied."""
        ...

    def check_sample(self, sample: dict) -> None:
        """Raise SampleError naming the sample when this model cannot take it (missing template field, no or
        malformed frames, too long for the model's positions or cfg.max_length under overflow=drop). Cost: as
        much as collating it alone (the planner runs it on the first sample before training)."""
        ...

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """The batch for `samples`, checked as by `check_sample` (raises SampleError on the first bad one).
        Always: "input_ids" and "attention_mask" (B, L) right-padded (long; mask 1 on real tokens) and "labels"
        (long, -100 where no loss: prompts, video tokens, padding; the answer tokens and their end-of-turn
        token otherwise). Decoder-only (causal) models: labels are (B, L), the same positions as input_ids, plus
        the family's vision inputs (LLaVA: "pixel_values_videos" (B, T, 3, H, W) or "pixel_values" (B*T, 3, H,
        W); Qwen-VL: "pixel_values_videos" as flattened patches, "video_grid_thw" (B, 3), "mm_token_type_ids"
        (B, L), Qwen2.5-VL "second_per_grid_ts" (B,)). Encoder-decoder models: input_ids are the source, labels
        the target (B, Lt) and "decoder_input_ids" (B, Lt) the labels shifted right. CPU tensors; the loop moves
        them. Runs in data loader workers. Cost: O(tokens + frame pixels) of the batch.
        Decoder families also take `packed: bool = False` (data.packing, vtt.trainer.inputs.packing): then the samples
        are one row (B = 1) with no padding and no attention_mask, "position_ids" restarting at 0 per sample
        (Qwen-VL: (4, 1, N), text positions first, then the sample's own M-RoPE), each sample's first label
        -100; the loader passes packed=True only to a collate whose signature takes it."""
        ...

    def sample_length(self, sample: dict, frames: tuple[int, int, int] | None) -> tuple[int, ...]:
        """The tokens `sample` makes alone, exactly or closely, split by what an unpacked batch pads to its longest
        separately: LLaVA (video tokens, text tokens) (its clips are padded to the longest clip's frames, its text
        to the longest text), seq2seq (source, target), Qwen-VL (tokens,) (one padded row; videos are not padded).
        data.group_by_length sorts a window's samples by them (vtt.trainer.data.group). The sample's frames are not
        decoded yet ("frames" is None): `frames` is (count after the reader's pick, height, width) of those it will
        carry, None for data read without frames. Raises SampleError for what its text already tells (a missing
        template field, a bad conversation); the reader counts it by its on_corrupt policy. Cost: a tokenisation
        of the sample's text, no pixels."""
        ...

    def num_tokens(self, batch: dict) -> int:
        """Tokens the model reads for `batch` (throughput counts): real input tokens, plus target tokens for an
        encoder-decoder. Called on the collated batch while it is still on the host (no device sync)."""
        ...

    def export(self, model: torch.nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
        """Write a checkpoint `from_pretrained` loads into out_dir (made if missing) and return it: safetensors
        weights with LoRA merged (from `state_dict` when given: ZeRO-3's gathered weights), tokenizer, the
        source checkpoint's processor / chat-template files; the family's generation settings (NLLB's forced
        target language). `model` may be a DeepSpeed engine. Cost: one copy of the weights on the host."""
        ...

    def eval_items(self, sample: dict) -> list[dict]:
        """What to answer when scoring generation: one item per assistant turn of a conversation after the video
        (its history from the data, teacher forced) or one for the caption. Each holds "turn" (int), "question"
        and "reference" (str) for predictions.jsonl, plus what `generate_items` of the same adapter needs (e.g.
        the prompt's token ids); raises SampleError as `check_sample`."""
        ...

    def generate_items(self, model: torch.nn.Module, pairs: list[tuple[dict, dict]],
                       max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, one string per (sample, item from eval_items) pair, in order, in ONE generate call
        (the caller bounds the batch). `model` may be a DeepSpeed engine; its train/eval mode is restored.
        Cost: max_new_tokens forwards over the batch, prompts padded to the longest."""
        ...

    def generate(self, model: torch.nn.Module, samples: list[dict], max_new_tokens: int = 32) -> list[str]:
        """Greedy captions for samples (the caption prompt / source template, whatever else a sample carries),
        one string per sample, in one generate call, as `generate_items`."""
        ...
