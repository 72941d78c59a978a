"""The adapter registry: model kind -> the family's ModelAdapter class (vtt.trainer.models.adapter), the only place
model kinds differ.

`get_adapter(ModelConfig)` returns a LlavaAdapter (LLaVA-family video models), a QwenAdapter (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL) or a Seq2SeqAdapter (NLLB/M2M100 or any AutoModelForSeq2SeqLM). Checkpoints load through
from_pretrained from a hub id (offline cache) or a local folder; the tiny presets take exactly that path.
A new family: a models/<family>.py with a class that has every ModelAdapter member, one row in ADAPTERS, its
kind in vtt.trainer.models.model_config.KINDS (tests/test_adapters.py checks the three agree).
"""
from __future__ import annotations

from vtt.trainer.models.adapter import ModelAdapter
from vtt.trainer.models.llava import LlavaAdapter
from vtt.trainer.models.qwen import QwenAdapter
from vtt.trainer.models.seq2seq import Seq2SeqAdapter
from vtt.trainer.models.model_config import ModelConfig

ADAPTERS: dict[str, type[ModelAdapter]] = {"llava": LlavaAdapter, "qwen_vl": QwenAdapter, "seq2seq": Seq2SeqAdapter}


def adapter_class(kind: str) -> type[ModelAdapter]:
    """The class for a ModelConfig kind (validated there), for what needs no adapter instance: its
    `setup_model` on a meta-device model (vtt.trainer.run.memory)."""
    return ADAPTERS[kind]


def get_adapter(cfg: ModelConfig) -> ModelAdapter:
    """The adapter for cfg.kind; it reads the checkpoint's config/tokenizer/processor files but no weights."""
    return ADAPTERS[cfg.kind](cfg)
