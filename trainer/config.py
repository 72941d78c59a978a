"""TrainConfig: every vtt-train setting in one typed tree, loaded from YAML and overridden by flags.

Sections: model (ModelConfig, models/model_config.py), data (DataConfig, data/loader.py), optim, deepspeed, run,
tracking.
Precedence: dataclass defaults < --config YAML < flags (`--set section.field=value` reaches any field).
Unknown sections or keys stop with the list of valid names.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml
from vtt.shards.format import ShardFormatError
from vtt.shards.index import read_index
from vtt.shards.settings import ConfigError, Flag, RawValue, coerce, values_of
from vtt.shards.storage import parse_options
from vtt.trainer.data.loader import DataConfig
from vtt.trainer.models.model_config import ModelConfig

PRECISIONS = ("bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("online", "offline", "disabled")
PRESETS = ("tiny",)
PACKED_KINDS = ("llava", "qwen_vl")  # data.packing: decoder-only language models (vtt.trainer.inputs.packing)
DEFAULT_ZERO_STAGE = 2
DEFAULT_PRECISION = "bf16"
DEFAULT_MICRO_BATCH = 4
DEFAULT_GRAD_ACCUM = 1


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (torch's: nothing compiles) with linear warmup then cosine decay to min_lr_ratio x lr."""
    lr: float = 1e-4
    weight_decay: float = 0.0  # not applied to biases and norm weights
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    warmup_steps: int | None = None  # None: warmup_ratio x total steps
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay and grad_clip must be >= 0, eps > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.warmup_ratio must be in [0, 1), min_lr_ratio in [0, 1]")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_ratio * total_steps)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of lr for optimizer step `step` (0-based)."""
        warmup = self.warmup_for(total_steps)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What the DeepSpeed config is generated from, or fills an external JSON's "auto" values with.

    None means: the external JSON's value when it has a concrete one, else the DEFAULT_* constant."""
    config_file: str | None = None  # external DeepSpeed JSON (may hold "auto")
    # 0..3; None: ds_config.default_stage (0 fp32 / 1 bf16 where a whole replica fits each device, else 2)
    zero_stage: int | None = None
    precision: str | None = None  # bf16 | fp32, default bf16; fp32 only when asked for
    micro_batch_size: int | str | None = None  # per GPU, default 4; "auto": the fastest that fits (run/memory.py)
    grad_accum: int | None = None  # default 1
    train_batch_size: int | None = None  # optional check: must equal world x micro x accumulation
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states (and step) on CPU
    offload_param: bool = False  # ZeRO-3 only: parameters on CPU
    # bf16 by torch.autocast over fp32 trainable weights, ZeRO-0 (DeepSpeed's torch_autocast; what a plain PyTorch
    # loop does) instead of bf16 weights with DeepSpeed's BF16_Optimizer, whose per-parameter hooks, norms and
    # copies cost a full fine-tune thousands of small kernels a step. None: on for bf16 full fine-tunes (no LoRA)
    # on one process (or several, each holding a replica) without offload or an external JSON (`use_autocast`)
    autocast: bool | None = None
    torch_adam: bool = True  # torch AdamW; False = DeepSpeed FusedAdam/CPUAdam (compiled on first use)
    overlap_comm: bool | None = None  # None: on for GPUs, off on DeepSpeed's CPU accelerator (nothing to overlap)
    # ZeRO-3: partition weights while from_pretrained loads them (zero.Init), for models too big for one
    # process's RAM. Off by default: LoRA layers added after loading would then differ in dtype.
    zero3_init: bool = False
    timeout_minutes: int = 30  # process-group timeout: a rank that dies surfaces as an error, not a hang
    # what `auto` settings and --plan fit into: the device's memory (torch.cuda where present, else this)
    device_memory_gb: float | None = None
    memory_headroom: float = 0.10  # fraction kept free (CUDA context, fragmentation)

    def __post_init__(self):
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"deepspeed.precision must be one of {PRECISIONS}, got {self.precision!r} "
                              "(fp16 is not offered: M2M100/NLLB gives NaN losses in fp16)")
        if isinstance(self.micro_batch_size, str) and self.micro_batch_size != "auto":
            raise ConfigError(f"deepspeed.micro_batch_size must be a number or 'auto', got {self.micro_batch_size!r}")
        if self.autocast and (self.precision == "fp32" or (self.zero_stage or 0) > 0 or self.offload_optimizer):
            raise ConfigError("deepspeed.autocast is bf16 mixed precision with ZeRO-0 and no offload: it cannot go "
                              f"with precision={self.precision}, zero_stage={self.zero_stage}, "
                              f"offload_optimizer={self.offload_optimizer}")
        if self.device_memory_gb is not None and not self.device_memory_gb > 0:
            raise ConfigError(f"deepspeed.device_memory_gb must be > 0, got {self.device_memory_gb}")
        if not 0 <= self.memory_headroom < 1:
            raise ConfigError(f"deepspeed.memory_headroom must be in [0, 1), got {self.memory_headroom}")
        for name in ("micro_batch_size", "grad_accum", "train_batch_size"):
            v = getattr(self, name)
            if isinstance(v, str):
                continue
            if v is not None and v < 1:
                raise ConfigError(f"deepspeed.{name} must be >= 1, got {v}")
        if self.timeout_minutes < 1:
            raise ConfigError("deepspeed.timeout_minutes must be >= 1")


# checkpoint selection: metric -> +1 higher is better, -1 lower is better
BEST_METRICS = {"eval_loss": -1, "exact_match": 1, "bleu": 1, "chrf": 1}


@dataclass(frozen=True)
class RunConfig:
    output_dir: str
    max_steps: int | None = None  # optimizer steps; None: epochs x steps per epoch (from index counts)
    epochs: float | None = None  # None and no max_steps: 1 epoch
    save_every: int = 500  # optimizer steps between checkpoints; 0 = only the final one
    keep_last: int = 2  # checkpoints kept (the newest); 0 = keep all
    eval_every: int = 0  # 0 = no evaluation during training (a final one runs when an eval set exists)
    eval_max_batches: int | None = None  # cap per evaluation pass (per rank); None = the whole eval set
    log_every: int = 10
    seed: int = 0  # model init / dropout RNG (the data order has its own data.seed)
    resume: str | None = None  # "latest" | a checkpoint folder | None
    preset: str | None = None  # "tiny": build a random tiny checkpoint into RUN/preset-<kind> and train it
    preset_family: str | None = None  # the tiny model's family: qwen_vl: qwen2_5_vl (default), qwen2_vl, qwen3_vl
    export: bool = True  # write RUN/final (save_pretrained) at the end
    save_final: bool = True  # a checkpoint at the last step too (to continue training later)
    progress_bar: bool = True
    eval_generate: bool = False  # at each eval also answer the eval set (vtt-eval): exact match, BLEU, chrF
    eval_generate_samples: int | None = 64  # samples answered per eval (generation is slow); None: all
    eval_generate_batch: int = 8
    keep_best: str | None = None  # keep the best checkpoint by eval_loss (lowest) or exact_match|bleu|chrf

    def __post_init__(self):
        if self.keep_best is not None and self.keep_best not in BEST_METRICS:
            raise ConfigError(f"run.keep_best must be one of {sorted(BEST_METRICS)}, got {self.keep_best!r}")
        if self.keep_best not in (None, "eval_loss") and not self.eval_generate:
            raise ConfigError(f"run.keep_best={self.keep_best} is a generation metric: it needs run.eval_generate")
        if self.eval_generate_batch < 1 or (self.eval_generate_samples is not None and self.eval_generate_samples < 1):
            raise ConfigError("run.eval_generate_batch and run.eval_generate_samples must be >= 1")
        if not self.output_dir:
            raise ConfigError("run.output_dir is required (--output-dir)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"run.max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"run.epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("give run.max_steps or run.epochs, not both")
        for name in ("save_every", "keep_last", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0")
        if self.log_every < 1:
            raise ConfigError("run.log_every must be >= 1")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ConfigError("run.eval_max_batches must be >= 1")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"run.preset must be one of {PRESETS}, got {self.preset!r}")


@dataclass(frozen=True)
class TrackingConfig:
    """Weights & Biases, global rank 0 only. Offline/disabled need no key or network."""
    wandb_project: str | None = None
    wandb_mode: str | None = None  # online | offline | disabled; None: online with a project, else disabled
    wandb_entity: str | None = None
    run_name: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"tracking.wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")

    @property
    def mode(self) -> str:
        """Explicit mode, else WANDB_MODE from the environment when a project is set, else disabled."""
        if self.wandb_mode:
            return self.wandb_mode
        if not self.wandb_project:
            return "disabled"
        env = os.environ.get("WANDB_MODE", "").strip()
        return env if env in WANDB_MODES else "online"


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    run: RunConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        if self.run.preset and Path(self.model.model_path) != preset_dir(self.run.output_dir, self.model.kind):
            raise ConfigError(f"run.preset={self.run.preset!r} trains {preset_dir(self.run.output_dir, self.model.kind)}"
                              f", but model.model_path is {self.model.model_path!r}: give one or the other")
        if (self.run.eval_generate or self.run.keep_best) and not self.data.has_eval:
            raise ConfigError("run.eval_generate / run.keep_best need an eval set: data.eval_shards (--eval-shards) "
                              "or data.eval_fraction (--eval-fraction)")
        if self.run.eval_every and not self.data.has_eval:
            raise ConfigError("run.eval_every needs an eval set: data.eval_shards (--eval-shards) or "
                              "data.eval_fraction (--eval-fraction)")
        if self.data.packing and self.model.kind not in PACKED_KINDS:
            raise ConfigError(f"data.packing (--packing) packs decoder models ({', '.join(PACKED_KINDS)}); "
                              f"model.kind={self.model.kind} is an encoder-decoder: leave packing off")
        ds = self.deepspeed
        if ds.offload_param and ds.zero_stage not in (None, 3):
            raise ConfigError("deepspeed.offload_param needs zero_stage 3")
        if ds.zero3_init and self.model.lora:
            raise ConfigError("deepspeed.zero3_init and model.lora do not mix (peft adds unpartitioned layers "
                              "after zero.Init): load with model.load_dtype=bfloat16 instead")

    def to_dict(self) -> dict:
        """Plain values for config.yaml and W&B; secrets among data.storage_options are redacted."""
        d = to_plain(dataclasses.asdict(self))
        d["data"]["storage_options"] = redact(d["data"]["storage_options"])
        return d


SECRET_KEY = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def redact(options: dict) -> dict:
    return {k: redact(v) if isinstance(v, dict) else ("<redacted>" if SECRET_KEY.search(k) else v)
            for k, v in options.items()}


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "run": RunConfig, "optim": OptimConfig,
                             "deepspeed": DeepSpeedSettings, "tracking": TrackingConfig}


def _default(cls: type, name: str):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


# vtt-train's flags, one row per field it sets (the fields live in their sections' dataclasses, some in other
# modules, so the rows are a table here): name, help and choices; the default shown in --help is the
# dataclass's (or, where it is None, the words for what None means), values converted as YAML and --set are.
FLAGS: tuple[Flag, ...] = (
    Flag("--model", "Model kind.", dest="kind", field="model.kind",
         type=click.Choice(["llava", "seq2seq", "qwen_vl"])),
    Flag("--model-path", "Hub id (from the local cache) or checkpoint folder.", field="model.model_path"),
    Flag("--preset", "Build a random tiny model into RUN/preset-<model> and train it (overrides --model-path).",
         field="run.preset", type=click.Choice(list(PRESETS))),
    Flag("--shards", "Shards folder written by vtt-prep (index.json + tars): a path or a URL (s3://bucket/prefix "
         "needs the s3 extra; gs:// etc. with their fsspec filesystem installed).", field="data.shards"),
    Flag("--eval-shards", "Held-out shards folder (path or URL) for the eval loss.", field="data.eval_shards"),
    Flag("--storage-option", "fsspec storage option for URL folders, repeatable (endpoint_url=..., profile=..., "
         "anon=true, client_kwargs.region_name=...); credentials otherwise come from AWS_* variables, profiles, "
         "roles.", dest="storage_options", field="data.storage_options", multiple=True, metavar="KEY=VALUE",
         convert=parse_options),
    Flag("--eval-fraction", "Or: hold out this fraction of keys of --shards.", field="data.eval_fraction"),
    Flag("--output-dir", "Run folder (configs, logs, checkpoints, final model).", short="-o",
         field="run.output_dir"),
    Flag("--deepspeed", 'External DeepSpeed JSON; "auto" values are filled from the settings.', dest="ds_file",
         field="deepspeed.config_file", type=click.Path(dir_okay=False), default_text="generated from the settings"),
    Flag("--zero-stage", "ZeRO stage.", field="deepspeed.zero_stage", type=click.IntRange(0, 3),
         default_text=f"0 (fp32, bf16 full fine-tune) or 1 (bf16 LoRA) where a whole replica fits each device "
                      f"(one process always), else {DEFAULT_ZERO_STAGE}"),
    Flag("--precision", "fp32 only when asked.", field="deepspeed.precision", type=click.Choice(list(PRECISIONS)),
         default_text=DEFAULT_PRECISION),
    Flag("--micro-batch", "Micro batch per GPU, or auto: the fastest that fits the device (with --set "
         "model.gradient_checkpointing=auto also choosing checkpointing).", field="deepspeed.micro_batch_size",
         metavar="N|auto", default_text=str(DEFAULT_MICRO_BATCH)),
    Flag("--device-memory", "Device memory to plan for where torch.cuda cannot tell (CPU runs, --plan for another "
         "machine).", field="deepspeed.device_memory_gb", metavar="GB"),
    Flag("--grad-accum", "Gradient accumulation steps.", field="deepspeed.grad_accum",
         default_text=str(DEFAULT_GRAD_ACCUM)),
    Flag("--offload-optimizer/--no-offload-optimizer", "ZeRO-Offload optimizer to CPU.",
         field="deepspeed.offload_optimizer"),
    Flag("--lr", "Peak learning rate.", field="optim.lr"),
    Flag("--warmup-steps", "Linear warmup steps.", field="optim.warmup_steps",
         default_text=f"{_default(OptimConfig, 'warmup_ratio'):.0%} of the steps"),
    Flag("--weight-decay", field="optim.weight_decay"),
    Flag("--grad-clip", "Max grad norm, 0 = off.", field="optim.grad_clip"),
    Flag("--max-steps", "Optimizer steps.", field="run.max_steps", default_text="--epochs 1 from the index counts"),
    Flag("--epochs", field="run.epochs"),
    Flag("--save-every", "Checkpoint every N steps; also one at the end (--set run.save_final=false: none).",
         field="run.save_every"),
    Flag("--keep-last", "Checkpoints kept; 0 = all.", field="run.keep_last"),
    Flag("--eval-every", "Eval loss every N steps (needs --eval-shards/--eval-fraction).", field="run.eval_every"),
    Flag("--eval-generate/--no-eval-generate", "At each eval also answer the eval set (as vtt-eval: exact match, "
         "BLEU, chrF into metrics.jsonl and RUN/eval/step_N/).", field="run.eval_generate"),
    Flag("--keep-best", "Keep the best checkpoint by this eval metric beside the last --keep-last "
         "(checkpoints/best.json).", field="run.keep_best", type=click.Choice(list(BEST_METRICS))),
    Flag("--log-every", "metrics.jsonl line every N steps.", field="run.log_every"),
    Flag("--seed", "Model/dropout seed.", field="run.seed"),
    Flag("--data-seed", "Shard/sample order seed.", field="data.seed"),
    Flag("--resume", "Resume from RUN's latest checkpoint (bare flag) or from a checkpoint folder.",
         field="run.resume", is_flag=False, flag_value="latest"),
    Flag("--lora/--no-lora", "LoRA (peft) on the language model.", field="model.lora"),
    Flag("--num-frames", "Frames per sample read from the shards' stored ones, when they hold more.",
         field="data.num_frames", default_text="all"),
    Flag("--frame-sampling", "With --num-frames: evenly spaced, or drawn per epoch from (data seed, epoch, sample "
         "key).", field="data.frame_sampling", type=click.Choice(["uniform", "random"])),
    Flag("--video-tokens", "Video-token budget per sample: caps --num-frames to the most frames whose video tokens "
         "fit.", field="data.video_tokens"),
    Flag("--gradient-checkpointing/--no-gradient-checkpointing", field="model.gradient_checkpointing"),
    Flag("--mask-history/--no-mask-history", "Conversations: loss on the last assistant turn only.",
         field="model.mask_history", default_text="every assistant turn"),
    Flag("--max-length", "Tokens per sample, video included; longer ones are dropped and counted, or cut (--set "
         "model.overflow=truncate_history).", field="model.max_length", default_text="the model's positions"),
    Flag("--packing/--no-packing", "Padding-free: a micro batch's samples in one row, attention kept inside each "
         "sample (llava, qwen_vl).", field="data.packing"),
    Flag("--group-by-length/--no-group-by-length", "Train batches of similar length: each data stream sorts the "
         "samples of data.group_window micro batches by their token count and emits the batches in a seeded "
         "order (less padding without --packing).", field="data.group_by_length"),
    Flag("--balance-tokens/--no-balance-tokens", "Train batches of about equal tokens: each data stream cuts the "
         "samples of data.group_window micro batches into batches of equal token cost (packed: summed tokens; "
         "else samples x longest), a varying number of samples each, --micro-batch on average.",
         field="data.balance_tokens"),
    Flag("--num-workers", "DataLoader workers per rank.", field="data.num_workers"),
    Flag("--on-corrupt", "Corrupt samples.", field="data.on_corrupt", type=click.Choice(["skip", "stop"])),
    Flag("--interleave-shards", "Shards each data stream reads at once.", field="data.interleave_shards"),
    Flag("--data-resume", "Resume whose epoch cannot continue exactly: refuse, or start the next epoch.",
         field="data.resume", type=click.Choice(["exact", "next_epoch"])),
    Flag("--export/--no-export", "Write RUN/final.", field="run.export"),
    Flag("--wandb-project", "W&B project (global rank 0 logs).", field="tracking.wandb_project"),
    Flag("--wandb-mode", field="tracking.wandb_mode", type=click.Choice(list(WANDB_MODES)),
         default_text="online with --wandb-project, else disabled"),
)


def overrides_from_flags(flags: dict, sets: tuple[str, ...] | list[str] = ()) -> dict:
    """The nested overrides of the flags given (None: left out, keeps the YAML's or the default) and the
    `--set section.field=value` strings (the most specific: they win)."""
    tree: dict = {}
    for path, value in values_of(list(FLAGS), flags).items():
        section, key = path.split(".")
        tree.setdefault(section, {})[key] = value
    run = tree.get("run", {})
    if "max_steps" in run and "epochs" not in run:  # a flag replaces the YAML's length, whichever kind
        run["epochs"] = None
    elif "epochs" in run and "max_steps" not in run:
        run["max_steps"] = None
    return merge(tree, parse_set(sets))


def preset_dir(output_dir: str | Path, kind: str) -> Path:
    return Path(output_dir) / f"preset-{kind}"


def to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x


# ------------------------------------------------------------------ building from nested dicts

def check_keys(cls: type, values: dict, name: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"{name} has: {', '.join(names)}")


def build_section(cls: type, values: dict, name: str):
    """Instantiate one section dataclass from a dict, rejecting unknown keys by name."""
    check_keys(cls, values, name)
    hints = typing.get_type_hints(cls)
    kwargs = {k: coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from e


def config_from_dict(tree: dict) -> TrainConfig:
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; sections are {list(SECTIONS)}")
    for name, cls in SECTIONS.items():  # misspelt keys first: they often explain the other errors
        check_keys(cls, tree.get(name) or {}, name)
    tree = apply_preset(tree)
    parts = {name: build_section(cls, tree.get(name) or {}, name) for name, cls in SECTIONS.items()
             if name in tree or name not in ("model", "data", "run")}
    for required, hint in (("model", "--model/--model-path"), ("data", "--shards"), ("run", "--output-dir")):
        if required not in parts:
            raise ConfigError(f"config section {required!r} is missing ({hint})")
    return TrainConfig(**packing_attention(parts))


def packing_attention(parts: dict) -> dict:
    """data.packing on a decoder model with no attention chosen: the one that keeps a packed row's samples apart
    without a (row x row) mask (vtt.trainer.inputs.packing.attention_for_packing)."""
    model, data = parts["model"], parts["data"]
    if not data.packing or model.kind not in PACKED_KINDS or model.attn_implementation:
        return parts
    # heavy: transformers (via packing); the config module loads without it
    from vtt.trainer.inputs.packing import attention_for_packing
    return {**parts, "model": dataclasses.replace(model, attn_implementation=attention_for_packing(None))}


def apply_preset(tree: dict) -> dict:
    """--preset tiny: the model is the one built into RUN/preset-<kind>, loaded like any checkpoint."""
    run, model = dict(tree.get("run") or {}), dict(tree.get("model") or {})
    if run.get("preset") and run.get("output_dir"):  # overrides the YAML's model_path
        model["model_path"] = str(preset_dir(run["output_dir"], model.get("kind", "llava")))
        return {**tree, "model": model}
    return tree


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: expected a mapping of sections ({list(SECTIONS)})")
    return tree


def parse_set(assignments: list[str] | tuple[str, ...]) -> dict:
    """`section.field=value` strings -> nested dict of RawValue (typed when the section is built)."""
    tree: dict = {}
    for a in assignments:
        key, sep, raw = a.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {a!r}: expected section.field=value, e.g. model.lora=true")
        tree.setdefault(parts[0], {})[parts[1]] = RawValue(raw)
    return tree


def load_config(config_file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """defaults < YAML file < overrides (nested dict, e.g. from CLI flags)."""
    tree = load_yaml(config_file) if config_file else {}
    return config_from_dict(merge(tree, overrides or {}))


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=1000)


def load_saved(run_dir: str | Path) -> dict:
    """The resolved config a run wrote (for comparing on resume)."""
    p = Path(run_dir) / "config.yaml"
    return yaml.safe_load(p.read_text()) if p.is_file() else {}


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return diffs


def preflight(cfg: TrainConfig, paths: bool = True) -> None:
    """What the settings need of the world, before anything is imported, built or written (a second, not the
    model's load): an external DeepSpeed JSON exists; with `paths`, the run folder can be made and every
    shards folder (path or URL) has a readable index.json (one small read each). A ConfigError naming the
    path and the problem otherwise."""
    ds = cfg.deepspeed.config_file
    if ds and not Path(ds).is_file():
        raise ConfigError(f"deepspeed.config_file {ds}: no such file")
    if not paths:
        return
    try:
        check_run_folder(Path(cfg.run.output_dir))
        for folder in dict.fromkeys(f for f in (cfg.data.shards, cfg.data.eval_shards) if f):
            read_index(folder, cfg.data.storage_options)  # StorageError (a URL) is a ShardFormatError
    except (ShardFormatError, NotADirectoryError, PermissionError) as e:
        raise ConfigError(str(e)) from e


def check_run_folder(out: Path) -> None:
    """--output-dir must be a folder (new, or an earlier run's) that this user can write, or be makeable."""
    if out.exists():
        if not out.is_dir():
            raise NotADirectoryError(f"{out}: is a file; --output-dir must be a folder (a new one or an earlier "
                                     "run's)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"{out}: run folder is not writable")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{out}: cannot make the run folder there, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: cannot make the run folder there, {parent} is not writable")
