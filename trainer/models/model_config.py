"""ModelConfig: which model to train and how samples become its inputs (the `model:` section of TrainConfig).

Validated without I/O and without torch, so the CLIs can build and check one before loading anything heavy.
`KINDS` are the registry's keys (vtt.trainer.models.registry).
"""
from __future__ import annotations

from dataclasses import dataclass

from vtt.trainer.inputs.text import template_fields

KINDS = ("llava", "seq2seq", "qwen_vl")
LOAD_DTYPES = ("float32", "bfloat16", "float16")  # torch dtypes by these names: vtt.trainer.models.model_io


@dataclass(frozen=True)
class ModelConfig:
    """What model to train and how to turn samples into its inputs; one field per CLI flag."""
    kind: str = "llava"
    model_path: str = ""
    prompt: str | None = None                # llava: holds "<video>" once; None: the model family's chat format
    target_template: str = "{description}"  # over sidecar fields (sample["meta"]) plus {text} and {key}
    source_template: str = "{description}"  # seq2seq source text
    src_lang: str | None = None              # seq2seq language codes, e.g. eng_Latn -> fra_Latn (NLLB)
    tgt_lang: str | None = None
    max_source_len: int = 256
    max_target_len: int = 128
    num_frames: int | None = None            # llava: resample every clip to this many frames (None: keep)
    # conversation samples (sidecar `conversations`/`messages`; vtt.trainer.inputs.chat)
    conversations: bool = True               # train on a sample's conversation when it has one; False: caption it
    mask_history: bool = False               # loss on the last assistant turn only (default: every one)
    max_length: int | None = None            # tokens per sample, video included (None: the model's positions)
    overflow: str = "drop"                   # over max_length: drop (counted) | truncate_history (oldest first)
    freeze_vision: bool = False
    freeze_llm: bool = False
    projector_only: bool = False
    train_vision: bool = False               # qwen_vl: the vision tower trains too (frozen by default)
    train_merger: bool = False               # qwen_vl: the vision-language merger trains (with LoRA too)
    gradient_checkpointing: bool | str = False  # "auto": vtt-train picks (vtt.trainer.run.memory.resolve_auto)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str | None = None          # regex (full match) over module names, or comma list of name
                                             # suffixes (matches vision towers too); None: per-kind default
    load_dtype: str = "float32"
    attn_implementation: str | None = None
    random_init: bool = False                # weights from the config's initialiser, not the checkpoint
                                             # (GPU throughput checks on presets.build_shaped folders)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {KINDS}")
        if not self.model_path:
            raise ValueError("model_path is empty: give a hub id, a local checkpoint folder or --preset tiny")
        if self.load_dtype not in LOAD_DTYPES:
            raise ValueError(f"load_dtype {self.load_dtype!r} is not one of {sorted(LOAD_DTYPES)}")
        for name in ("max_source_len", "max_target_len", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise ValueError(f"gradient_checkpointing must be true, false or 'auto', got {self.gradient_checkpointing!r}")
        if self.overflow not in ("drop", "truncate_history"):
            raise ValueError(f"overflow must be 'drop' or 'truncate_history', got {self.overflow!r}")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError(f"max_length must be >= 8 or None, got {self.max_length}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 or None, got {self.num_frames}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("target_template", "source_template", "prompt"):
            if getattr(self, name) is not None:
                template_fields(getattr(self, name), name)  # raises on malformed templates
        if self.kind in ("llava", "qwen_vl") and self.prompt is not None and self.prompt.count("<video>") != 1:
            raise ValueError(f"prompt must contain '<video>' exactly once, got {self.prompt!r}")
        if self.kind == "seq2seq" and (self.freeze_vision or self.freeze_llm or self.projector_only):
            raise ValueError("freeze_vision/freeze_llm/projector_only apply to llava models only")
        if self.kind != "qwen_vl" and (self.train_vision or self.train_merger):
            raise ValueError("train_vision/train_merger apply to qwen_vl models only")
        if self.kind == "qwen_vl" and (self.freeze_vision or self.projector_only):
            raise ValueError("qwen_vl freezes the vision tower by default (model.train_vision=true trains it; "
                             "model.train_merger=true the merger): freeze_vision/projector_only do not apply")
        if self.projector_only and self.lora:
            raise ValueError("projector_only and lora contradict each other (LoRA trains the language model)")
