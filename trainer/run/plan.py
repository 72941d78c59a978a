"""Everything `train(cfg)` checks before a process group exists: settings, shards, the model/data match, the
step plan and the DeepSpeed config. All ranks run it alike, so all fail alike (nobody waits on a dead peer)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vtt.trainer.config import TrainConfig, config_diff, dump_yaml, load_saved, preset_dir
from vtt.trainer.data.loader import build_loader, eval_batches, steps_per_epoch
from vtt.trainer.models.adapter import ModelAdapter
from vtt.trainer.run import ds_config as dsc
from vtt.trainer.run.memory import chooses_replica
from vtt.trainer.run.dist import DistEnv
from vtt.trainer.run.tracking import preflight as tracking_preflight

log = logging.getLogger("vtt.train")


def ensure_preset(cfg: TrainConfig) -> None:
    """--preset tiny: build RUN/preset-<kind> once; ranks race harmlessly (build aside, rename into place)."""
    if not cfg.run.preset:
        return
    # heavy: transformers (presets); only --preset needs it
    from vtt.trainer.models.presets import build_tiny
    target = preset_dir(cfg.run.output_dir, cfg.model.kind)
    if (target / "config.json").is_file():
        return
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    build_tiny(cfg.model.kind, tmp, family=cfg.run.preset_family, seed=cfg.run.seed)
    try:
        tmp.rename(target)
    except OSError:  # another rank won; identical content (same seed)
        shutil.rmtree(tmp, ignore_errors=True)


def data_config_for(cfg: TrainConfig, adapter: ModelAdapter) -> TrainConfig:
    """Text-only models skip JPEG decoding entirely."""
    if not adapter.needs_frames and cfg.data.decode_frames:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, decode_frames=False))
    return cfg


def check_first_sample(cfg: TrainConfig, adapter: ModelAdapter) -> None:
    """The model must fit the data: run the adapter's checks and collate on the first training sample."""
    data = dataclasses.replace(cfg.data, shuffle_buffer=0, num_workers=0, eval_shards=None, eval_fraction=0.0,
                               group_by_length=False, balance_tokens=False)  # the first sample, not a window's shortest
    loader = build_loader(data, list, micro_batch=1, rank=0, world_size=1, split="train")
    sample = next(iter(loader))[0]
    adapter.check_sample(sample)
    adapter.collate([sample])


def plan_steps(cfg: TrainConfig, micro: int, accum: int, world: int) -> tuple[int, int]:
    """(total optimizer steps, micro batches per rank per epoch)."""
    per_epoch = steps_per_epoch(cfg.data, micro, world)
    if per_epoch < accum:
        raise dsc.DeepSpeedConfigError(
            f"{cfg.data.shards}: one epoch is {per_epoch} micro batch(es) per rank, fewer than gradient "
            f"accumulation {accum}: lower --grad-accum/--micro-batch or add data")
    if cfg.run.max_steps is not None:
        return cfg.run.max_steps, per_epoch
    epochs = cfg.run.epochs or 1.0
    return max(1, math.ceil(epochs * per_epoch / accum)), per_epoch


@dataclass(frozen=True)
class RunPlan:
    """What a run was checked to be before any process group exists: the settings with `auto` resolved, the
    DeepSpeed config, the steps in all and per epoch (the data's own read order is data/order.ReadPlan)."""
    cfg: TrainConfig
    ds: dict
    resolved: dsc.Resolved
    total_steps: int
    micro_per_epoch: int


def prepare(cfg: TrainConfig, env: DistEnv, adapter: ModelAdapter) -> RunPlan:
    """All checks that need no process group; raises before training on any problem."""
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    from deepspeed.accelerator import get_accelerator
    tracking_preflight(cfg.tracking)
    s = cfg.deepspeed
    ext = dsc.read_external(s.config_file) if s.config_file else None
    r = dsc.resolve(s, env.world_size, ext, full_finetune=not cfg.model.lora, replica=chooses_replica(cfg))
    total, per_epoch = plan_steps(cfg, r.micro_batch_size, r.grad_accum, env.world_size)
    if cfg.data.has_eval:
        eval_batches(cfg.data, r.micro_batch_size, env.world_size)  # validates the eval shards now
    check_first_sample(cfg, adapter)
    acc = get_accelerator()
    ds = dsc.build(s, cfg.optim, env.world_size, adapter.hidden_size, adapter.cast_buffers, total,
                   bf16_supported=bool(acc.is_bf16_supported()), device=acc.device_name(), resolved=r)
    # config.yaml shows what the run resolved to, not "None = default"
    s = dataclasses.replace(s, zero_stage=r.zero_stage, precision=r.precision, micro_batch_size=r.micro_batch_size,
                            grad_accum=r.grad_accum, autocast=r.autocast if ext is None else s.autocast)
    return RunPlan(dataclasses.replace(cfg, deepspeed=s), ds, r, total, per_epoch)


def write_run_files(plan: RunPlan, run_dir: Path) -> None:
    cfg = plan.cfg
    old = load_saved(run_dir)
    if old and cfg.run.resume:
        changed = config_diff(old, cfg.to_dict())
        if changed:
            log.warning("settings differ from the run being resumed:\n  %s", "\n  ".join(changed))
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "ds_config.json").write_text(json.dumps(plan.ds, indent=2) + "\n")
