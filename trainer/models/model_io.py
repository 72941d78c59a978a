"""Checkpoints in and out: the files of a checkpoint folder or cached hub id, tokenizer and weights loading,
save_pretrained with LoRA merged; the module inside a DeepSpeed engine and its device. No model kind differs here.

transformers and peft are imported inside the functions that need them (heavy: seconds to import), so callers
that only read a checkpoint's files or unwrap an engine (run/checkpoint.py, run/loss.py, the planner) do not pay
for them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from vtt.trainer.models.model_config import ModelConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # = LOAD_DTYPES


def unwrap(model):
    """The transformers/peft module inside a DeepSpeed engine (or the model itself)."""
    wrappers = ("DeepSpeedEngine", "DistributedDataParallel")
    return getattr(model, "module", model) if type(model).__name__ in wrappers else model


def model_device(model) -> torch.device:
    return next(unwrap(model).parameters()).device


def checkpoint_file(model_path: str, name: str) -> Path | None:
    """A file of a local checkpoint folder or a cached hub checkpoint; None when it has none."""
    local = Path(model_path)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    # heavy: transformers (~1.5 s); this module loads without it
    from transformers.utils import cached_file
    found = cached_file(model_path, name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def read_json(model_path: str, name: str) -> dict | None:
    path = checkpoint_file(model_path, name)
    return json.loads(path.read_text()) if path else None


def load_tokenizer(model_path: str):
    # heavy: transformers (~1.5 s); this module loads without it
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:  # Llama tokenizers ship without one; labels mask padding anyway
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_pretrained(auto_cls, cfg: ModelConfig) -> Any:
    """auto_cls (an AutoModel class) from cfg.model_path in cfg.load_dtype; random_init: the config's own
    initialiser instead of the checkpoint's weights."""
    kwargs = {"dtype": TORCH_DTYPES[cfg.load_dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.random_init:
        # heavy: transformers (~1.5 s); this module loads without it
        from transformers import AutoConfig
        return auto_cls.from_config(AutoConfig.from_pretrained(cfg.model_path), **kwargs)
    return auto_cls.from_pretrained(cfg.model_path, **kwargs)


def merged_state_dict(model, state_dict: dict | None = None) -> tuple[torch.nn.Module, dict | None]:
    """(module to save, its state dict or None for "the module's own"). A peft model gives its base model and a
    state dict with W + scaling * B @ A merged in, computed from `state_dict` when given (ZeRO-3's gathered
    weights: the live parameters are partitioned) else from the live weights. Out of place: merge_adapter()
    would round the frozen bf16 base weights of a model that keeps training after the export."""
    model = unwrap(model)
    if not hasattr(model, "peft_config"):
        return model, state_dict
    # optional: peft (LoRA only)
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
