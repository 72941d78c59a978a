"""`train(cfg)`: the one training loop behind vtt-train, for every model kind and launcher.

Order matters: everything that can be wrong with the settings, the shards or the model/data match is checked
on every rank *before* a process group exists (all ranks fail alike, nobody waits on a dead peer); then
DeepSpeed, resume, the loop (checkpoints, eval, metrics), the final checkpoint and the export.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from vtt.trainer import ds_config as dsc
from vtt.trainer.adapters import get_adapter
from vtt.trainer.checkpoint import CheckpointManager
from vtt.trainer.config import TrainConfig, config_diff, dump_yaml, load_saved, preset_dir
from vtt.trainer.data import agree_data, build_loader, eval_batches, pin_data, steps_per_epoch
from vtt.trainer.tracking import Tracker, preflight as tracking_preflight

log = logging.getLogger("vtt.train")

FINAL_DIR = "final"
SUMMARY_FILE = "summary.json"
MODEL_INFO_FILE = "vtt_model.json"  # beside the exported weights: how to caption with them (caption.py)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: dict[int, float] = field(default_factory=dict)  # optimizer step (1-based) -> mean loss
    eval_losses: dict[int, float] = field(default_factory=dict)
    export_dir: Path | None = None
    last_checkpoint: Path | None = None
    wall_s: float = 0.0
    summary: dict = field(default_factory=dict)  # also RUN/summary.json
    engine: object = field(default=None, repr=False)  # the live DeepSpeed engine (in-process callers)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


# ------------------------------------------------------------------ process environment

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(local_rank: int | None = None) -> DistEnv:
    """Rank/world from the launcher's environment (deepspeed, torchrun, MPI); a plain process is world 1."""
    if "OMPI_COMM_WORLD_RANK" in os.environ and "RANK" not in os.environ:  # deepspeed --launcher openmpi
        os.environ.update(RANK=os.environ["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
                          LOCAL_RANK=os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if local_rank is not None:  # the launcher's --local_rank wins over a stale environment
        os.environ["LOCAL_RANK"] = str(local_rank)
    return DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def init_distributed(env: DistEnv, timeout_minutes: int) -> str:
    """One process group per process (DeepSpeed caches it); returns the device this rank trains on."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), auto_mpi_discovery=False,
                               timeout=timedelta(minutes=timeout_minutes), verbose=False)
    return acc.device_name(env.local_rank) if acc.device_name() != "cpu" else "cpu"


def _quiet_deepspeed() -> None:
    import warnings

    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates: one warning per call, every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)


# ------------------------------------------------------------------ before any process group

def ensure_preset(cfg: TrainConfig) -> None:
    """--preset tiny: build RUN/preset-<kind> once; ranks race harmlessly (build aside, rename into place)."""
    if not cfg.run.preset:
        return
    from vtt.trainer.presets import build_tiny
    target = preset_dir(cfg.run.output_dir, cfg.model.kind)
    if (target / "config.json").is_file():
        return
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    build_tiny(cfg.model.kind, tmp, seed=cfg.run.seed)
    try:
        tmp.rename(target)
    except OSError:  # another rank won; identical content (same seed)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def data_config_for(cfg: TrainConfig, adapter) -> TrainConfig:
    """Text-only models skip JPEG decoding entirely."""
    if not adapter.needs_frames and cfg.data.decode_frames:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, decode_frames=False))
    return cfg


def check_first_sample(cfg: TrainConfig, adapter) -> None:
    """The model must fit the data: run the adapter's checks and collate on the first training sample."""
    data = dataclasses.replace(cfg.data, shuffle_buffer=0, num_workers=0, eval_shards=None, eval_fraction=0.0)
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
class Plan:
    cfg: TrainConfig
    ds: dict
    resolved: dsc.Resolved
    total_steps: int
    micro_per_epoch: int


def prepare(cfg: TrainConfig, env: DistEnv, adapter) -> Plan:
    """All checks that need no process group; raises before training on any problem."""
    from deepspeed.accelerator import get_accelerator
    tracking_preflight(cfg.tracking)
    s = cfg.deepspeed
    ext = dsc.read_external(s.config_file) if s.config_file else None
    r = dsc.resolve(s, env.world_size, ext)
    total, per_epoch = plan_steps(cfg, r.micro_batch_size, r.grad_accum, env.world_size)
    if cfg.data.has_eval:
        eval_batches(cfg.data, r.micro_batch_size, env.world_size)  # validates the eval shards now
    check_first_sample(cfg, adapter)
    acc = get_accelerator()
    ds = dsc.build(s, cfg.optim, env.world_size, adapter.hidden_size, adapter.cast_buffers, total,
                   bf16_supported=bool(acc.is_bf16_supported()), device=acc.device_name(), resolved=r)
    # config.yaml shows what the run resolved to, not "None = default"
    s = dataclasses.replace(s, zero_stage=r.zero_stage, precision=r.precision, micro_batch_size=r.micro_batch_size,
                            grad_accum=r.grad_accum)
    return Plan(dataclasses.replace(cfg, deepspeed=s), ds, r, total, per_epoch)


def write_run_files(plan: Plan, run_dir: Path) -> None:
    cfg = plan.cfg
    old = load_saved(run_dir)
    if old and cfg.run.resume:
        changed = config_diff(old, cfg.to_dict())
        if changed:
            log.warning("settings differ from the run being resumed:\n  %s", "\n  ".join(changed))
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "ds_config.json").write_text(json.dumps(plan.ds, indent=2) + "\n")


# ------------------------------------------------------------------ engine

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as in every LLaVA/NLLB recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(plan: Plan, adapter):
    import deepspeed
    cfg = plan.cfg
    hf_ds = None
    if plan.resolved.zero_stage == 3 and cfg.deepspeed.zero3_init:  # from_pretrained partitions while loading
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds = HfDeepSpeedConfig(plan.ds)
    torch.manual_seed(cfg.run.seed)  # same LoRA/new-head init on every rank
    model = adapter.load_model()
    lr_lambda = None
    if "scheduler" not in plan.ds:
        optim, total = cfg.optim, plan.total_steps

        def lr_lambda(step: int) -> float:
            return optim.lr_factor(step, total)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=plan.ds,
        lr_scheduler=(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)) if lr_lambda else None)
    engine._vtt_hf_ds = hf_ds  # keep alive: transformers holds it by weak reference
    return engine


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """Float inputs (pixels) take the engine's compute dtype; ids and masks stay integer."""
    return {k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float32


def forward_loss(engine, batch: dict) -> torch.Tensor:
    return engine(**batch).loss


def all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    import deepspeed.comm as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


# ------------------------------------------------------------------ the loop

class Window:
    """Metrics accumulated between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.loss, self.samples, self.tokens, self.wait, self.time = 0, 0.0, 0, 0, 0.0, 0.0

    def add(self, loss: float, samples: int, tokens: int, wait: float, seconds: float) -> None:
        self.steps += 1
        self.loss += loss
        self.samples += samples
        self.tokens += tokens
        self.wait += wait
        self.time += seconds

    def record(self, step: int, epoch: float, lr: float, grad_norm: float | None) -> dict:
        t = max(self.time, 1e-9)
        return {"step": step, "epoch": round(epoch, 4), "loss": self.loss / self.steps, "lr": lr,
                "grad_norm": grad_norm, "samples_per_s": self.samples / t, "tokens_per_s": self.tokens / t,
                "data_wait_frac": self.wait / t}


def grad_norm(engine) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if torch.is_tensor(g) else g)


def check_finite(loss: torch.Tensor, device, step: int, micro: int, env: DistEnv, last_ckpt: Path | None) -> None:
    """Collective: every rank learns whether any rank's loss is NaN/inf, so all stop together."""
    local = loss.detach().float().item()
    bad = all_reduce([0.0 if math.isfinite(local) else 1.0], device, op="max")[0]
    if bad:
        where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"loss is not finite at step {step} (micro batch {micro}; this rank {env.rank} has {local}): "
            f"stopped before the update; {where}. Lower the learning rate, check the data, or use "
            "--precision fp32 to rule out bf16 overflow")


def train_step(engine, it, plan: Plan, device, dtype, adapter, env: DistEnv, step: int,
               last_ckpt: Path | None) -> tuple[float, int, int, float]:
    """One optimizer step = grad_accum micro batches; returns (mean loss over ranks, samples, tokens, wait)."""
    loss_sum, samples, tokens, wait = 0.0, 0, 0, 0.0
    for micro in range(plan.resolved.grad_accum):
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        tokens += adapter.num_tokens(batch)
        samples += int(batch["input_ids"].shape[0])
        loss = forward_loss(engine, to_device(batch, device, dtype))
        check_finite(loss, device, step, micro, env, last_ckpt)
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach().float().item())
    total_loss, total_samples, total_tokens = all_reduce([loss_sum, samples, tokens], device)
    mean = total_loss / (plan.resolved.grad_accum * env.world_size)
    return mean, int(total_samples), int(total_tokens), wait


@torch.no_grad()
def evaluate(engine, plan: Plan, adapter, env: DistEnv, device, dtype) -> float:
    """Mean loss over the eval set (the same number of batches on every rank: ZeRO-3 needs it)."""
    cfg = plan.cfg
    loader = build_loader(cfg.data, adapter.collate, plan.resolved.micro_batch_size, env.rank, env.world_size,
                          split="eval")
    engine.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(loader):
        if cfg.run.eval_max_batches and i >= cfg.run.eval_max_batches:
            break
        total += float(forward_loss(engine, to_device(batch, device, dtype)).float().item())
        n += 1
    engine.train()
    total, n = all_reduce([total, n], device)
    return total / max(n, 1)


def export_model(engine, adapter, plan: Plan, env: DistEnv, out_dir: Path) -> Path:
    """RUN/final: save_pretrained safetensors + tokenizer/processor files; ZeRO-3 gathers full weights first."""
    import deepspeed.comm as dist
    state_dict = None
    if plan.resolved.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0 only
    if env.rank == 0:
        adapter.export(engine.module, out_dir, state_dict=state_dict) if state_dict is not None \
            else adapter.export(engine.module, out_dir)
        info = {"model": dataclasses.asdict(plan.cfg.model), "frames": frame_settings(plan.cfg),
                "trained_steps": plan.total_steps}
        (out_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
    dist.barrier()
    return out_dir


def frame_settings(cfg: TrainConfig) -> dict:
    """How the training frames were made (from the shards' index), so captioning a video matches them."""
    from vtt.shards.index import read_index
    try:
        return read_index(cfg.data.shards).settings
    except Exception:  # informational only
        return {}


def setup_logging(run_dir: Path, rank: int) -> None:
    vtt_log = logging.getLogger("vtt")
    vtt_log.setLevel(logging.INFO)
    if rank == 0 and not any(getattr(h, "_vtt_run", None) == str(run_dir) for h in vtt_log.handlers):
        h = logging.FileHandler(run_dir / "train.log")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._vtt_run = str(run_dir)
        vtt_log.addHandler(h)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch(loader, per_epoch: int) -> float:
    pos = loader.state()
    return pos["epoch"] + pos["batch"] / per_epoch


def train(cfg: TrainConfig, local_rank: int | None = None) -> TrainResult:
    """Train as configured; works in one plain process or under any launcher. Returns after the export."""
    t_start = time.perf_counter()
    env = dist_env(local_rank)
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, env.rank)
    ensure_preset(cfg)
    adapter = get_adapter(cfg.model)
    cfg = data_config_for(cfg, adapter)
    pin_data(cfg.data)  # every loader of this run reads index.json as it is now, whatever vtt-prep commits
    plan = prepare(cfg, env, adapter)
    cfg = plan.cfg
    log.info("checks passed in %.1fs: %d steps, global batch %d", time.perf_counter() - t_start,
             plan.total_steps, plan.resolved.global_batch)
    device = init_distributed(env, cfg.deepspeed.timeout_minutes)
    if agree_data(cfg.data):  # this rank read index.json across a vtt-prep commit: plan on rank 0's
        plan = prepare(cfg, env, adapter)
    _quiet_deepspeed()
    if env.rank == 0:
        write_run_files(plan, run_dir)
    engine = build_engine(plan, adapter)
    log.info("engine ready at %.1fs (ZeRO-%d, %s, world %d, device %s)", time.perf_counter() - t_start,
             plan.resolved.zero_stage, plan.resolved.precision, env.world_size, device)
    ckpt = CheckpointManager(run_dir, cfg.run.keep_last, env.rank, env.world_size)
    start_step, position, last_ckpt = 0, None, None
    found = ckpt.find(cfg.run.resume) if cfg.run.resume else None
    if found:
        state = ckpt.load(engine, *found)
        start_step, position, last_ckpt = state["step"], state["data"], found[0] / found[1]
        log.info("resumed from %s at step %d", last_ckpt, start_step)
    else:
        if cfg.run.resume:
            log.info("--resume latest: %s has no checkpoint yet, starting from step 0", ckpt.dir)
        seed_everything(cfg.run.seed + env.rank)  # dropout differs per rank, reproducibly
    tracker = Tracker(cfg.tracking, run_dir, env.rank, cfg.to_dict(), resume_step=start_step if found else None)
    try:
        result = run_loop(engine, plan, adapter, env, device, ckpt, tracker, start_step, position, last_ckpt)
    finally:
        tracker.close()
    log.info("training done at %.1fs", time.perf_counter() - t_start)
    if cfg.run.export:
        result.export_dir = export_model(engine, adapter, plan, env, run_dir / FINAL_DIR)
        log.info("exported %s at %.1fs", result.export_dir, time.perf_counter() - t_start)
    result.wall_s = time.perf_counter() - t_start
    result.engine = engine
    return result


def run_loop(engine, plan: Plan, adapter, env: DistEnv, device, ckpt: CheckpointManager, tracker: Tracker,
             start_step: int, position: dict | None, last_ckpt: Path | None) -> TrainResult:
    from tqdm import tqdm
    cfg, run = plan.cfg, plan.cfg.run
    dtype = engine_dtype(engine)
    loader = build_loader(cfg.data, adapter.collate, plan.resolved.micro_batch_size, env.rank, env.world_size,
                          split="train", start=position)
    it = iter(loader)
    result = TrainResult(Path(run.output_dir), start_step, last_checkpoint=last_ckpt)
    window, totals = Window(), Window()  # totals skip the first step (allocator/kernel warm-up)
    bar = tqdm(total=plan.total_steps, initial=start_step, disable=env.rank != 0 or not run.progress_bar,
               desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    engine.train()
    step = start_step
    while step < plan.total_steps:
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        loss, samples, tokens, wait = train_step(engine, it, plan, device, dtype, adapter, env, step + 1,
                                                 result.last_checkpoint)
        step += 1
        window.add(loss, samples, tokens, wait, time.perf_counter() - t0)
        if step > start_step + 1 or plan.total_steps - start_step == 1:
            totals.add(loss, samples, tokens, wait, time.perf_counter() - t0)
        result.losses[step] = loss
        if step % run.log_every == 0 or step == plan.total_steps:
            tracker.log(window.record(step, _epoch(loader, plan.micro_per_epoch), lr, grad_norm(engine)))
            bar.set_postfix(loss=f"{window.loss / window.steps:.4f}", lr=f"{lr:.2e}")
            window.reset()
        bar.update(1)
        if run.eval_every and cfg.data.has_eval and step % run.eval_every == 0:
            result.eval_losses[step] = _eval_and_log(engine, plan, adapter, env, device, dtype, tracker, step)
        if (run.save_every and step % run.save_every == 0) or (run.save_final and step == plan.total_steps):
            result.last_checkpoint = ckpt.save(engine, step, loader.state(), {"loss": loss})
    bar.close()
    if cfg.data.has_eval and plan.total_steps not in result.eval_losses and start_step < plan.total_steps:
        result.eval_losses[step] = _eval_and_log(engine, plan, adapter, env, device, dtype, tracker, step)
    result.steps = step
    corrupt = loader.corrupt
    if corrupt:
        log.warning("corrupt samples skipped: %s (first ones: %s)", corrupt, loader.corrupt_events[:5])
    result.summary = summarize(engine, plan, env, result, totals, corrupt)
    tracker.summary(result.summary)
    if env.rank == 0:
        (Path(run.output_dir) / SUMMARY_FILE).write_text(json.dumps(result.summary, indent=1) + "\n")
    return result


def param_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters; ZeRO-3 partitions report their full size through ds_numel."""
    total = trainable = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def peak_memory_gb() -> float | None:
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return None
    return acc.max_memory_allocated() / 2**30


def summarize(engine, plan: Plan, env: DistEnv, result: TrainResult, totals: Window, corrupt: dict) -> dict:
    """RUN/summary.json: what a benchmark or a person wants to know after a run (rank 0's view)."""
    n, n_train = param_counts(engine.module)
    t = max(totals.time, 1e-9)
    return {"steps": result.steps, "final_loss": result.losses.get(result.steps),
            "eval_loss": result.eval_losses.get(result.steps), "world_size": env.world_size,
            "zero_stage": plan.resolved.zero_stage, "precision": plan.resolved.precision,
            "global_batch": plan.resolved.global_batch, "params": n, "trainable_params": n_train,
            "timed_steps": totals.steps, "step_s": t / max(totals.steps, 1), "samples_per_s": totals.samples / t,
            "tokens_per_s": totals.tokens / t, "data_wait_frac": totals.wait / t,
            "peak_memory_gb": peak_memory_gb(), "corrupt": corrupt}


def _eval_and_log(engine, plan, adapter, env, device, dtype, tracker, step) -> float:
    loss = evaluate(engine, plan, adapter, env, device, dtype)
    tracker.log({"step": step, "eval_loss": loss})
    log.info("step %d eval_loss %.4f", step, loss)
    return loss
