"""Seq2seq adapter (NLLB / M2M100 or any AutoModelForSeq2SeqLM): source and target text from templates over the
sidecar fields, NLLB language codes (source prefix, target prefix = forced BOS at generation)."""
from __future__ import annotations

import torch
from vtt.trainer.inputs.text import encode, render, render_spans
from vtt.trainer.models.batching import greedy_generate, pad_right
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.models.model_io import load_pretrained, load_tokenizer, save_checkpoint
from vtt.trainer.models.model_setup import apply_lora, enable_gradient_checkpointing

# Files some tokenizers keep beside tokenizer.json (NLLB's sentencepiece model) - copied on export if present.
EXTRA_FILES = ("sentencepiece.bpe.model",)


def setup_model(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """Checkpointing and LoRA on a loaded model (any device, meta too: vtt.trainer.run.memory)."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora:
        return apply_lora(model, cfg, keep_trainable=[])
    return model


class Seq2SeqAdapter:
    """vtt.trainer.models.adapter.ModelAdapter for encoder-decoder text models (NLLB/M2M100, T5, BART)."""
    needs_frames = False
    # M2M100's sinusoidal position table is an fp32 buffer: under DeepSpeed bf16 it must be cast with the weights.
    cast_buffers = True
    causal = False  # labels are aligned with the logits (vtt.trainer.run.loss)
    setup_model = staticmethod(setup_model)

    def __init__(self, cfg: ModelConfig):
        # heavy: transformers (~1.5 s); this module loads without it
        from transformers import AutoConfig
        self.cfg = cfg
        self.config = AutoConfig.from_pretrained(cfg.model_path)
        if not getattr(self.config, "is_encoder_decoder", False):
            raise ValueError(f"{cfg.model_path} ({self.config.model_type}) is not an encoder-decoder model: "
                             "--model seq2seq needs one (NLLB/M2M100, T5, BART, ...)")
        self.hidden_size = getattr(self.config, "d_model", None) or self.config.hidden_size
        self.tokenizer = load_tokenizer(cfg.model_path)
        self.src_id = self._lang_id(cfg.src_lang, "src_lang")
        self.tgt_id = self._lang_id(cfg.tgt_lang, "tgt_lang")
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit and max(cfg.max_source_len, cfg.max_target_len) > limit:
            raise ValueError(f"max_source_len/max_target_len ({cfg.max_source_len}/{cfg.max_target_len}) exceed "
                             f"the {limit} positions of {cfg.model_path}")

    def _lang_id(self, code: str | None, what: str) -> int | None:
        if code is None:
            return None
        tid = self.tokenizer.convert_tokens_to_ids(code)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"{what} {code!r} is not a token of {self.cfg.model_path}'s tokenizer "
                             "(NLLB codes look like eng_Latn, fra_Latn)")
        return tid

    def load_model(self) -> torch.nn.Module:
        # heavy: transformers (~1.5 s); this module loads without it
        from transformers import AutoModelForSeq2SeqLM
        return self.setup(load_pretrained(AutoModelForSeq2SeqLM, self.cfg))

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        return setup_model(model, self.cfg)

    def _encode(self, rendered: tuple[str, list], lang: int | None, limit: int) -> list[int]:
        """NLLB layout: [lang] tokens </s>; without a language, the tokenizer's own specials (+ </s>).
        Field values are text, never special tokens (vtt.trainer.inputs.text)."""
        eos = self.tokenizer.eos_token_id
        text, data = rendered
        if lang is not None:
            body = encode(self.tokenizer, text, data, add_special_tokens=False)
            return [lang] + body[: limit - 2] + [eos]
        ids = encode(self.tokenizer, text, data)
        ids = ids if ids and ids[-1] == eos else ids + [eos]
        return ids[: limit - 1] + [eos] if len(ids) > limit else ids

    def _source(self, sample: dict) -> list[int]:
        return self._encode(render_spans(self.cfg.source_template, sample, "source_template"), self.src_id,
                            self.cfg.max_source_len)

    def _target(self, sample: dict) -> list[int]:
        return self._encode(render_spans(self.cfg.target_template, sample, "target_template"), self.tgt_id,
                            self.cfg.max_target_len)

    def check_sample(self, sample: dict) -> None:
        """Raise SampleError naming the sample when a template field is missing."""
        render(self.cfg.source_template, sample, "source_template")
        render(self.cfg.target_template, sample, "target_template")

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """input_ids/attention_mask (source), labels (target, -100 padding) and the decoder inputs the model
        would shift from the labels itself (the loss is computed outside the model: vtt.trainer.run.loss)."""
        for s in samples:
            self.check_sample(s)
        src = [self._source(s) for s in samples]
        labels = pad_right([self._target(s) for s in samples], -100)
        return {"input_ids": pad_right(src, self.tokenizer.pad_token_id),
                "attention_mask": pad_right([[1] * len(x) for x in src], 0),
                "decoder_input_ids": self.decoder_inputs(labels), "labels": labels}

    def sample_length(self, sample: dict, frames: tuple[int, int, int] | None) -> tuple[int, int]:
        """(source, target) tokens: a batch pads each to its longest."""
        return len(self._source(sample)), len(self._target(sample))

    def decoder_inputs(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels shifted right behind the decoder start token, as M2M100/BART/T5 do when given labels."""
        pad = self.tokenizer.pad_token_id
        start = getattr(self.config, "decoder_start_token_id", None)
        out = labels.new_full(labels.shape, pad)
        out[:, 1:] = labels[:, :-1]
        out[:, 0] = pad if start is None else start
        return out.masked_fill_(out == -100, pad)

    def num_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())

    def export(self, model, out_dir, state_dict=None):
        # Plain `model.generate` on the export should produce the trained target language.
        updates = {"forced_bos_token_id": self.tgt_id} if self.tgt_id is not None else None
        return save_checkpoint(model, out_dir, self.tokenizer, self.cfg.model_path, EXTRA_FILES, state_dict,
                               generation_updates=updates)

    def eval_items(self, sample: dict) -> list[dict]:
        """One answer to score per sample: the target text for the source text."""
        return [{"turn": 0, "question": render(self.cfg.source_template, sample, "source_template"),
                 "reference": render(self.cfg.target_template, sample, "target_template").strip()}]

    def generate_items(self, model, pairs: list[tuple[dict, dict]], max_new_tokens: int = 32) -> list[str]:
        return self.generate(model, [s for s, _ in pairs], max_new_tokens)

    def generate(self, model, samples: list[dict], max_new_tokens: int = 32) -> list[str]:
        """Greedy target texts for the samples' source texts (forced target language when tgt_lang is set)."""
        options = {"forced_bos_token_id": self.tgt_id} if self.tgt_id is not None else {}
        return greedy_generate(model, self.tokenizer, [self._source(s) for s in samples], max_new_tokens,
                               encoder_decoder=True, **options)
