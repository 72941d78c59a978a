"""Model adapters: everything model-specific the training loop needs (load, check, collate, export, generate).

`get_adapter(ModelConfig)` returns a LlavaAdapter (LLaVA-family video models), a QwenAdapter (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL) or a Seq2SeqAdapter (NLLB/M2M100 or any AutoModelForSeq2SeqLM). Checkpoints load through from_pretrained from a hub id (offline cache) or a local folder;
the tiny presets take exactly that path.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vtt.trainer.text import SampleError, render, template_fields  # noqa: F401 (re-exported)

KINDS = ("llava", "seq2seq", "qwen_vl")
LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Each family's own chat format (as in the llava-hf chat templates); <video> becomes the model's video tokens.
DEFAULT_PROMPTS = {
    "llava_next_video": "USER: <video>\nDescribe this video. ASSISTANT:",
    "video_llava": "USER: <video>\nDescribe this video. ASSISTANT:",
    "llava": "USER: <video>\nDescribe this video. ASSISTANT:",
    "llava_onevision": "<|im_start|>user <video>\nDescribe this video.<|im_end|><|im_start|>assistant\n",
}
# LoRA goes into the language model only: CLIP/SigLIP towers use the same projection names.
DEFAULT_LORA_TARGETS = {"llava": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$",
                        "seq2seq": r".*\.(q_proj|k_proj|v_proj|out_proj)$",
                        "qwen_vl": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"}


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
    # conversation samples (sidecar `conversations`/`messages`; vtt.trainer.conversation)
    conversations: bool = True               # train on a sample's conversation when it has one; False: caption it
    mask_history: bool = False               # loss on the last assistant turn only (default: every one)
    max_length: int | None = None            # tokens per sample, video included (None: the model's positions)
    overflow: str = "drop"                   # over max_length: drop (counted) | truncate_history (oldest first)
    freeze_vision: bool = False
    freeze_llm: bool = False
    projector_only: bool = False
    train_vision: bool = False               # qwen_vl: the vision tower trains too (frozen by default)
    train_merger: bool = False               # qwen_vl: the vision-language merger trains (with LoRA too)
    gradient_checkpointing: bool | str = False  # "auto": vtt-train picks (vtt.trainer.memory.resolve_auto)
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


def get_adapter(cfg: ModelConfig):
    """The adapter for cfg.kind; it reads the checkpoint's config/tokenizer/processor files but no weights."""
    if cfg.kind == "llava":
        from vtt.trainer.adapter_llava import LlavaAdapter
        return LlavaAdapter(cfg)
    if cfg.kind == "qwen_vl":
        from vtt.trainer.adapter_qwen import QwenAdapter
        return QwenAdapter(cfg)
    from vtt.trainer.adapter_seq2seq import Seq2SeqAdapter
    return Seq2SeqAdapter(cfg)


def unwrap(model):
    """The transformers/peft module inside a DeepSpeed engine (or the model itself)."""
    wrappers = ("DeepSpeedEngine", "DistributedDataParallel")
    return getattr(model, "module", model) if type(model).__name__ in wrappers else model


def checkpoint_file(model_path: str, name: str) -> Path | None:
    """A file of a local checkpoint folder or a cached hub checkpoint; None when it has none."""
    local = Path(model_path)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from transformers.utils import cached_file
    found = cached_file(model_path, name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def read_json(model_path: str, name: str) -> dict | None:
    path = checkpoint_file(model_path, name)
    return json.loads(path.read_text()) if path else None


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:  # Llama tokenizers ship without one; labels mask padding anyway
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def set_trainable(model: torch.nn.Module, frozen_patterns: list[str]) -> None:
    """Freeze parameters whose names contain any of the patterns (after any LoRA wrapping)."""
    for name, p in model.named_parameters():
        if any(pat in name for pat in frozen_patterns):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the freezing options leave no trainable parameter")


def apply_lora(model: torch.nn.Module, cfg: ModelConfig, keep_trainable: list[str]):
    """Wrap with peft LoRA; parameters matching keep_trainable (e.g. the projector) stay trainable as well."""
    from peft import LoraConfig, get_peft_model
    targets = cfg.lora_targets or DEFAULT_LORA_TARGETS[cfg.kind]
    if "," in targets or re.fullmatch(r"[\w.]+", targets):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        raise ValueError(f"LoRA targets {targets!r} match no module of {cfg.model_path}: {e}") from None
    for name, p in model.named_parameters():
        if any(k in name for k in keep_trainable):
            p.requires_grad_(True)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    # Non-reentrant: works when the inputs' embeddings are frozen (LoRA, freeze_llm) without input grads hacks.
    if hasattr(model, "activation_checkpointing_enable"):  # the v5 name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False


def merged_state_dict(model, state_dict: dict | None = None) -> tuple[torch.nn.Module, dict | None]:
    """(module to save, its state dict or None for "the module's own"). A peft model gives its base model and a
    state dict with W + scaling * B @ A merged in, computed from `state_dict` when given (ZeRO-3's gathered
    weights: the live parameters are partitioned) else from the live weights. Out of place: merge_adapter()
    would round the frozen bf16 base weights of a model that keeps training after the export."""
    model = unwrap(model)
    if not hasattr(model, "peft_config"):
        return model, state_dict
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    base = model.get_base_model()
    prefix = "base_model.model."
    src = {k[len(prefix):] if k.startswith(prefix) else k: v
           for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    out = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in src.items() if ".lora_" not in k}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear) or getattr(module, "use_dora", {}).get(module.active_adapters[0]):
            raise NotImplementedError(f"export merges LoRA on Linear layers only, not {name} "
                                      f"({type(module).__name__})")
        key = f"{name}.weight"
        merged = out[key].float()
        for ad in module.active_adapters:
            delta = src[f"{name}.lora_B.{ad}.weight"].float() @ src[f"{name}.lora_A.{ad}.weight"].float()
            merged += (delta.T if module.fan_in_fan_out else delta) * module.scaling[ad]
        out[key] = merged.to(out[key].dtype)
    return base, out


def save_checkpoint(model, out_dir: str | Path, tokenizer, model_path: str, extra_files: tuple[str, ...],
                    state_dict: dict | None = None, generation_updates: dict | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer + the source checkpoint's processor files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module, sd = merged_state_dict(model, state_dict)
    if generation_updates and getattr(module, "generation_config", None) is not None:
        for k, v in generation_updates.items():
            setattr(module.generation_config, k, v)
    module.save_pretrained(out, state_dict=sd) if sd is not None else module.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in extra_files:
        src = checkpoint_file(model_path, name)
        if src is not None and src.resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
    return out


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_left(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s for s in seqs], dtype=torch.long)


def model_device(model) -> torch.device:
    return next(unwrap(model).parameters()).device


def common_load(auto_cls, cfg: ModelConfig) -> Any:
    kwargs = {"dtype": LOAD_DTYPES[cfg.load_dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.random_init:
        from transformers import AutoConfig
        return auto_cls.from_config(AutoConfig.from_pretrained(cfg.model_path), **kwargs)
    return auto_cls.from_pretrained(cfg.model_path, **kwargs)
