"""The DeepSpeed config a run uses: generated from DeepSpeedSettings + OptimConfig, or an external JSON whose
"auto" values are filled from them the way transformers' integration does. Contradictions stop here, before
any process group or model exists.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtt.shards.settings import ConfigError
from vtt.trainer.config import (DEFAULT_GRAD_ACCUM, DEFAULT_MICRO_BATCH, DEFAULT_PRECISION, DEFAULT_ZERO_STAGE,
                                DeepSpeedSettings, OptimConfig)

AUTO = "auto"
QUIET_STEPS_PER_PRINT = 10**9  # vtt logs itself; DeepSpeed's own per-step prints only add noise
BUCKET_MIN, BUCKET_MAX = 2**20, 500_000_000  # elements; DeepSpeed's own default bucket is 5e8
BUCKETS_PER_STEP = 4  # enough to overlap the first reductions with the rest of backward on GPUs


class DeepSpeedConfigError(ConfigError):
    """The DeepSpeed config contradicts the settings, the world size or the hardware."""


@dataclass(frozen=True)
class Resolved:
    """The concrete numbers a run trains with, whichever source they came from."""
    zero_stage: int
    precision: str
    micro_batch_size: int
    grad_accum: int
    world_size: int
    autocast: bool = False  # bf16 by torch.autocast over fp32 trainable weights (use_autocast)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum


def read_external(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"{p}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"{p}: expected a JSON object")
    return data


def _get(d: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _concrete(v) -> bool:
    return v is not None and v != AUTO


def _pick(name: str, setting, external, default, source: str):
    """Setting (flag/YAML) vs the external JSON's concrete value: agree, fill or stop."""
    if setting is not None and _concrete(external) and setting != external:
        raise DeepSpeedConfigError(f"{source} sets {name}={external!r} but the vtt settings say {setting!r}: "
                                   f"set it to \"auto\" in {source} or drop the flag/YAML value")
    if setting is not None:
        return setting
    return external if _concrete(external) else default


def _json_precision(ext: dict, source: str) -> str | None:
    if _get(ext, "fp16.enabled") is True:
        raise DeepSpeedConfigError(f"{source}: fp16 is not supported (M2M100/NLLB gives NaN losses in fp16): "
                                   "use \"bf16\": {\"enabled\": true} or fp32")
    bf16 = _get(ext, "bf16.enabled", _get(ext, "bfloat16.enabled"))
    if bf16 is True:
        return "bf16"
    if bf16 is False:
        return "fp32"
    return None


def use_autocast(settings: DeepSpeedSettings, world_size: int, precision: str, full_finetune: bool,
                 external: bool, replica: bool = False) -> bool:
    """bf16 by torch.autocast (fp32 trainable weights, ZeRO-0, DeepSpeed's torch_autocast) rather than bf16
    weights with DeepSpeed's BF16_Optimizer, by default for a full fine-tune on one process, or on several where
    a whole replica fits each device (`replica`, default_stage). BF16_Optimizer adds,
    per trainable tensor and step, a gradient-accumulation hook (a cast and an add), a norm and a clip multiply
    (benchmarks/bench_ops.py: ~4 kernels per tensor, ~2,000 a step for NLLB-600M's ~510 tensors), which a GPU
    pays as launch latency on a short step (NLLB-600M micro 16 ran at 0.81x a plain loop, BENCHMARKS.md);
    autocast runs what the plain loop runs: foreach clipping, fused AdamW, 16 bytes per trainable parameter
    instead of 20. A LoRA run keeps BF16_Optimizer (few trainable tensors; a bf16 base stays bf16 either way),
    as do sharded runs (ZeRO-2 partitions the states) and offload."""
    if settings.autocast is not None:
        return settings.autocast
    return (precision == "bf16" and (world_size == 1 or replica) and full_finetune and not external
            and not settings.offload_optimizer and not settings.zero_stage)


def default_stage(settings: DeepSpeedSettings, world_size: int, precision: str, replica: bool = False) -> int:
    """ZeRO stage when neither the settings nor the JSON name one. One process: partitioning over one rank saves
    nothing, and ZeRO-2's per-parameter gradient hooks and bucket reductions were most of a small model's step
    (benchmarks/bench_step.py): fp32 takes stage 0 (the torch optimizer on the parameters), and so does bf16 by
    autocast (use_autocast, resolve); DeepSpeed's bf16 takes stage 1, which with fp32 gradient accumulation
    (generate) is its BF16_Optimizer - flat fp32 master weights and gradients - where bf16 stage 0 would
    accumulate gradients in bf16 and copy every gradient to a fresh fp32 tensor each step.
    Several processes: the same as one where a whole replica (weights, gradients, optimizer states) fits each
    device (`replica`: run/memory.py `chooses_replica`), since one all-reduce of the gradients a step beats
    ZeRO-1/2's partitioned reductions plus the all-gather of the updated weights (two CPU ranks,
    bench_step --world 2: ZeRO-0 0.92-0.97x a DDP loop, ZeRO-1 0.81-0.86x, ZeRO-2 0.73-0.87x); ZeRO-2 where it
    does not fit. Optimizer offload needs ZeRO >= 1."""
    if (world_size == 1 or replica) and not settings.offload_optimizer:
        return 1 if precision == "bf16" else 0
    return DEFAULT_ZERO_STAGE


def bucket_elements(trainable: int) -> int:
    """Gradient reduce / allgather bucket size from the trainable parameter count: BUCKETS_PER_STEP buckets per
    step, between 1M elements (hidden^2 gave a tiny model dozens of reductions per micro batch, NLLB-600M ~600)
    and DeepSpeed's 5e8."""
    return int(min(BUCKET_MAX, max(BUCKET_MIN, -(-trainable // BUCKETS_PER_STEP))))


def resolve(settings: DeepSpeedSettings, world_size: int, ext: dict | None = None,
            full_finetune: bool = False, replica: bool = False) -> Resolved:
    """Batch, ZeRO stage and precision from the settings and (optionally) an external config. `full_finetune`:
    no LoRA (use_autocast); `replica`: several processes whose devices each hold a whole replica
    (default_stage)."""
    external, ext = ext is not None, ext or {}
    src = settings.config_file or "the DeepSpeed config"
    precision = _pick("precision", settings.precision, _json_precision(ext, src), DEFAULT_PRECISION, src)
    autocast = use_autocast(settings, world_size, precision, full_finetune, external, replica)
    if autocast and external:
        raise DeepSpeedConfigError(f"{src}: deepspeed.autocast applies to generated configs; in a JSON of your "
                                   "own, set its \"torch_autocast\" section instead")
    stage = _pick("zero_optimization.stage", settings.zero_stage, _get(ext, "zero_optimization.stage"),
                  0 if autocast else default_stage(settings, world_size, precision, replica), src)
    micro = _pick("train_micro_batch_size_per_gpu", settings.micro_batch_size,
                  ext.get("train_micro_batch_size_per_gpu"), DEFAULT_MICRO_BATCH, src)
    ext_ga, ext_tbs = ext.get("gradient_accumulation_steps"), ext.get("train_batch_size")
    if settings.grad_accum is None and not _concrete(ext_ga) and _concrete(ext_tbs):
        ext_ga = _derive_accum(ext_tbs, world_size, micro, src)  # DeepSpeed's own rule
    ga = _pick("gradient_accumulation_steps", settings.grad_accum, ext_ga, DEFAULT_GRAD_ACCUM, src)
    r = Resolved(int(stage), precision, int(micro), int(ga), world_size, autocast)
    for name, want in (("train_batch_size", ext_tbs), ("deepspeed.train_batch_size", settings.train_batch_size)):
        if _concrete(want) and want != r.global_batch:
            raise DeepSpeedConfigError(
                f"{name}={want} but world size {world_size} x micro batch {r.micro_batch_size} x gradient "
                f"accumulation {r.grad_accum} = {r.global_batch}: fix one of them (or set it to \"auto\")")
    return r


def _derive_accum(tbs: int, world: int, micro: int, src: str) -> int:
    if tbs % (world * micro):
        raise DeepSpeedConfigError(f"{src}: train_batch_size={tbs} is not divisible by world size {world} x "
                                   f"micro batch {micro}")
    return tbs // (world * micro)


def _bucket(hidden: int, trainable: int | None) -> int:
    """Before the model is loaded (plan time) the trainable size is unknown: hidden^2 holds the place;
    engine.build_engine builds the config again with the real count."""
    return bucket_elements(trainable) if trainable else hidden * hidden


def _zero_section(stage: int, hidden: int, s: DeepSpeedSettings, device: str, trainable: int | None) -> dict:
    z: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return z
    overlap = s.overlap_comm if s.overlap_comm is not None else device != "cpu"
    z.update(overlap_comm=overlap, contiguous_gradients=True, reduce_bucket_size=_bucket(hidden, trainable),
             allgather_bucket_size=_bucket(hidden, trainable))
    if stage == 3:
        z.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                 stage3_param_persistence_threshold=10 * hidden,
                 stage3_gather_16bit_weights_on_model_save=True)
    if s.offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_param:
        z["offload_param"] = {"device": "cpu", "pin_memory": True}
    return z


def _optimizer_params(s: DeepSpeedSettings, optim: OptimConfig, device: str) -> dict:
    """torch AdamW; its fused (one-kernel) step on CUDA when the optimizer states stay on the GPU (DeepSpeed
    passes extra params through to torch.optim.AdamW; PR #8512: the default there was a per-tensor loop), the
    multi-tensor one elsewhere (torch's CPU default is the per-tensor loop)."""
    p = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
         "torch_adam": s.torch_adam}
    if s.torch_adam and not s.offload_optimizer:
        p["fused" if device == "cuda" else "foreach"] = True
    return p


def generate(r: Resolved, s: DeepSpeedSettings, optim: OptimConfig, hidden_size: int, cast_buffers: bool,
             device: str = "cuda", trainable: int | None = None) -> dict:
    """A complete DeepSpeed config from the settings alone (the LR schedule is vtt's own, see run/loop.py)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": r.micro_batch_size,
        "gradient_accumulation_steps": r.grad_accum,
        "train_batch_size": r.global_batch,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": r.precision == "bf16" and not r.autocast},
        "zero_optimization": _zero_section(r.zero_stage, hidden_size, s, device, trainable),
        "optimizer": {"type": "AdamW", "params": _optimizer_params(s, optim, device)},
        "steps_per_print": QUIET_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if s.offload_optimizer and s.torch_adam:
        cfg["zero_force_ds_cpu_optimizer"] = False
    if r.autocast:  # fp32 weights and buffers: nothing to cast, no BF16_Optimizer settings
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        return cfg
    if r.precision == "bf16" and cast_buffers:
        cfg["data_types"] = {"buffer_dtype": "bf16"}
    if r.precision == "bf16" and r.zero_stage == 1 and not s.offload_optimizer:
        cfg.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"  # -> BF16_Optimizer (default_stage)
    if r.precision == "bf16" and r.zero_stage in (1, 2):
        cfg["bf16"]["check_grad_overflow"] = False  # no loss scale to adjust: a per-step scan + all_reduce saved
    return cfg


class _Filler:
    """transformers' fill_match: "auto" takes vtt's value; a concrete value must agree or is reported."""

    def __init__(self, cfg: dict, source: str):
        self.cfg, self.source, self.mismatches = cfg, source, []

    def fill(self, dotted: str, value, must_match: bool = True) -> None:
        *parents, key = dotted.split(".")
        node = self.cfg
        for p in parents:
            node = node.get(p)
            if not isinstance(node, dict):
                return
        if node.get(key) == AUTO:
            node[key] = value
        elif must_match and key in node and node[key] != value:
            self.mismatches.append(f"  {dotted}={node[key]!r} but vtt has {value!r}")


def fill_auto(ext: dict, r: Resolved, s: DeepSpeedSettings, optim: OptimConfig, hidden_size: int,
              cast_buffers: bool, total_steps: int, trainable: int | None = None, device: str = "cuda") -> dict:
    """Fill an external config's "auto" values; concrete values that disagree with the settings stop."""
    cfg = copy.deepcopy(ext)
    f = _Filler(cfg, s.config_file or "DeepSpeed config")
    cfg.setdefault("train_micro_batch_size_per_gpu", r.micro_batch_size)
    cfg.setdefault("gradient_accumulation_steps", r.grad_accum)
    cfg.setdefault("train_batch_size", r.global_batch)
    for k, v in (("train_micro_batch_size_per_gpu", r.micro_batch_size),
                 ("gradient_accumulation_steps", r.grad_accum), ("train_batch_size", r.global_batch),
                 ("gradient_clipping", optim.grad_clip)):
        f.fill(k, v)
    cfg.setdefault("gradient_clipping", optim.grad_clip)
    _fill_precision(cfg, r)
    z = cfg.setdefault("zero_optimization", {})
    f.fill("zero_optimization.stage", r.zero_stage)
    z.setdefault("stage", r.zero_stage)
    for k, v in (("reduce_bucket_size", _bucket(hidden_size, trainable)),
                 ("allgather_bucket_size", _bucket(hidden_size, trainable)),
                 ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                 ("stage3_param_persistence_threshold", 10 * hidden_size),
                 ("stage3_gather_16bit_weights_on_model_save", True)):
        f.fill(f"zero_optimization.{k}", v, must_match=False)
    if r.zero_stage == 3:
        z.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if s.offload_optimizer:
        z.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
    if s.offload_param:
        z.setdefault("offload_param", {"device": "cpu", "pin_memory": True})
    _fill_optimizer(cfg, f, s, optim, device)
    _fill_scheduler(f, optim, total_steps)
    if r.precision == "bf16" and cast_buffers:
        cfg.setdefault("data_types", {}).setdefault("buffer_dtype", "bf16")
    cfg.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    if f.mismatches:
        raise DeepSpeedConfigError(f"{f.source} disagrees with the vtt settings:\n" + "\n".join(f.mismatches)
                                   + "\nset these to \"auto\" or change the flags/YAML to match")
    return cfg


def _fill_precision(cfg: dict, r: Resolved) -> None:
    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled", AUTO) == AUTO:
        bf16["enabled"] = r.precision == "bf16"
    if _get(cfg, "fp16.enabled") == AUTO:
        cfg["fp16"]["enabled"] = False


def _fill_optimizer(cfg: dict, f: _Filler, s: DeepSpeedSettings, optim: OptimConfig, device: str) -> None:
    if "optimizer" not in cfg:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas),
                                                        "eps": optim.eps, "weight_decay": optim.weight_decay}}
    params = cfg["optimizer"].setdefault("params", {})
    f.fill("optimizer.params.lr", optim.lr)
    f.fill("optimizer.params.betas", list(optim.betas))
    f.fill("optimizer.params.eps", optim.eps)
    f.fill("optimizer.params.weight_decay", optim.weight_decay)
    if str(cfg["optimizer"].get("type", "")).lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", s.torch_adam)
        offload = _get(cfg, "zero_optimization.offload_optimizer.device", "none") != "none"
        if params["torch_adam"] and offload:
            cfg.setdefault("zero_force_ds_cpu_optimizer", False)
        if params["torch_adam"] and not offload and not {"fused", "foreach"} & set(params):
            params["fused" if device == "cuda" else "foreach"] = True  # as generate(): _optimizer_params


def _fill_scheduler(f: _Filler, optim: OptimConfig, total_steps: int) -> None:
    warmup = max(1, optim.warmup_for(total_steps))  # deepspeed>=0.19.6 rejects warmup_num_steps <= 0
    f.fill("scheduler.params.warmup_min_lr", 0, must_match=False)
    f.fill("scheduler.params.warmup_max_lr", optim.lr)
    f.fill("scheduler.params.warmup_num_steps", warmup)
    f.fill("scheduler.params.total_num_steps", total_steps)
    f.fill("scheduler.params.cos_min_ratio", optim.min_lr_ratio, must_match=False)
    f.fill("scheduler.params.warmup_min_ratio", 0.0, must_match=False)


def remaining_auto(cfg: Any, prefix: str = "") -> list[str]:
    if isinstance(cfg, dict):
        return [k for key, v in cfg.items() for k in remaining_auto(v, f"{prefix}{key}.")]
    if isinstance(cfg, list):
        return [k for i, v in enumerate(cfg) for k in remaining_auto(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if cfg == AUTO else []


def validate(cfg: dict, r: Resolved, bf16_supported: bool, cast_buffers: bool, device: str) -> None:
    """Stop before training on anything DeepSpeed would reject late, or that would train wrongly."""
    left = remaining_auto(cfg)
    if left:
        raise DeepSpeedConfigError(f"\"auto\" values vtt cannot fill: {left}; give concrete values")
    tbs, micro, ga = cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    if tbs != r.world_size * micro * ga:
        raise DeepSpeedConfigError(f"train_batch_size={tbs} but world size {r.world_size} x micro batch {micro} x "
                                   f"gradient accumulation {ga} = {r.world_size * micro * ga}")
    if _get(cfg, "bf16.enabled") and not bf16_supported:
        raise DeepSpeedConfigError(f"bf16 is enabled but this {device} has no bf16 support (e.g. V100, T4): "
                                   "pass --precision fp32 (and drop bf16 from the DeepSpeed JSON)")
    if _get(cfg, "fp16.enabled") is True:
        raise DeepSpeedConfigError("fp16 is not supported by vtt-train: use bf16 or fp32")
    stage = _get(cfg, "zero_optimization.stage", 0)
    if _get(cfg, "zero_optimization.offload_param.device", "none") != "none" and stage != 3:
        raise DeepSpeedConfigError(f"zero_optimization.offload_param needs ZeRO stage 3, the config has {stage}")
    buffer_dtype = _get(cfg, "data_types.buffer_dtype")
    if buffer_dtype not in (None, "fp32") and not cast_buffers:
        raise DeepSpeedConfigError(f"data_types.buffer_dtype={buffer_dtype!r} would cast this model's fp32 buffers "
                                   "(Llama-family RoPE inv_freq) and spoil positions: remove it")
    if _get(cfg, "bf16.enabled") and cast_buffers and buffer_dtype != "bf16":
        raise DeepSpeedConfigError("this model (M2M100/NLLB) has fp32 buffers that break LayerNorm under bf16: "
                                   "set \"data_types\": {\"buffer_dtype\": \"bf16\"}")


def build(settings: DeepSpeedSettings, optim: OptimConfig, world_size: int, hidden_size: int,
          cast_buffers: bool, total_steps: int, bf16_supported: bool, device: str,
          resolved: Resolved | None = None, trainable: int | None = None) -> dict:
    """The final DeepSpeed config dict (generated or filled), validated. `trainable`: the loaded model's
    trainable parameter count (sizes the gradient buckets); None at plan time."""
    ext = read_external(settings.config_file) if settings.config_file else None
    r = resolved or resolve(settings, world_size, ext)
    cfg = (fill_auto(ext, r, settings, optim, hidden_size, cast_buffers, total_steps, trainable, device)
           if ext is not None
           else generate(r, settings, optim, hidden_size, cast_buffers, device, trainable))
    validate(cfg, r, bf16_supported, cast_buffers, device)
    return cfg
