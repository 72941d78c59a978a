"""What trains: freezing by parameter name, LoRA (peft) and gradient checkpointing on a loaded model; each
adapter's `setup_model` combines them by its own rules. Works on any device, the meta device too (the planner).
peft is imported inside apply_lora: heavy, and only LoRA runs need it.
"""
from __future__ import annotations

import re

import torch
from vtt.trainer.models.model_config import ModelConfig

# LoRA goes into the language model only: CLIP/SigLIP towers use the same projection names.
DEFAULT_LORA_TARGETS = {"llava": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$",
                        "seq2seq": r".*\.(q_proj|k_proj|v_proj|out_proj)$",
                        "qwen_vl": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"}


def set_trainable(model: torch.nn.Module, frozen_patterns: list[str]) -> None:
    """Freeze parameters whose names contain any of the patterns (after any LoRA wrapping)."""
    for name, p in model.named_parameters():
        if any(pat in name for pat in frozen_patterns):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the freezing options leave no trainable parameter")


def apply_lora(model: torch.nn.Module, cfg: ModelConfig, keep_trainable: list[str]):
    """Wrap with peft LoRA; parameters matching keep_trainable (e.g. the projector) stay trainable as well."""
    # optional: peft (LoRA only)
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
