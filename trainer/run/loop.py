"""`train(cfg)`: the one training loop behind vtt-train, for every model kind and launcher.

Order matters: everything that can be wrong with the settings, the shards or the model/data match is checked
on every rank *before* a process group exists (run/plan.py: all ranks fail alike, nobody waits on a dead peer); then
DeepSpeed (run/dist.py, run/ds_engine.py), resume, the loop (checkpoints, eval, metrics), the final checkpoint and
the export.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from vtt.trainer.config import BEST_METRICS, TrainConfig
from vtt.trainer.data.loader import agree_data, build_loader, pin_data
from vtt.trainer.inputs.packing import batch_samples
from vtt.trainer.models.adapter import ModelAdapter
from vtt.trainer.models.registry import get_adapter
from vtt.trainer.run.checkpoint import CheckpointManager, tag_for
from vtt.trainer.run.dist import DistEnv, dist_env, init_distributed, quiet_deepspeed
from vtt.trainer.run.ds_engine import autocast_context, build_engine, clip_gradients, engine_dtype, to_device
from vtt.trainer.run.evaluate import eval_and_log, generate_and_log
from vtt.trainer.run.export import FINAL_DIR, export_model
from vtt.trainer.run.loss import forward_loss, label_count, step_scale
from vtt.trainer.run.memory import needs_resolution, resolve_auto
from vtt.trainer.run.plan import RunPlan, data_config_for, ensure_preset, prepare, write_run_files
from vtt.trainer.run.tracking import Tracker

__all__ = ["train", "TrainResult", "NonFiniteLossError", "prepare", "data_config_for", "dist_env", "to_device",
           "engine_dtype", "forward_loss", "FINAL_DIR"]

log = logging.getLogger("vtt.train")

SUMMARY_FILE = "summary.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: dict[int, float] = field(default_factory=dict)  # optimizer step (1-based) -> per-token mean loss
    eval_losses: dict[int, float] = field(default_factory=dict)
    export_dir: Path | None = None
    last_checkpoint: Path | None = None
    wall_s: float = 0.0
    summary: dict = field(default_factory=dict)  # also RUN/summary.json
    engine: object = field(default=None, repr=False)  # the live DeepSpeed engine (in-process callers)


class Window:
    """Metrics accumulated between two log lines; its loss is the per-token mean over the window's steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.loss_sum, self.label_tokens, self.samples, self.tokens = 0, 0.0, 0, 0, 0
        self.wait, self.time = 0.0, 0.0

    def add(self, step: StepStats, seconds: float) -> None:
        self.steps += 1
        self.loss_sum += step.loss * step.label_tokens
        self.label_tokens += step.label_tokens
        self.samples += step.samples
        self.tokens += step.tokens
        self.wait += step.wait
        self.time += seconds

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.label_tokens, 1)

    def record(self, step: int, epoch: float, lr: float, grad_norm: float | None) -> dict:
        t = max(self.time, 1e-9)
        return {"step": step, "epoch": round(epoch, 4), "loss": self.loss, "lr": lr,
                "grad_norm": grad_norm, "samples_per_s": self.samples / t, "tokens_per_s": self.tokens / t,
                "data_wait_frac": self.wait / t}


@dataclass(frozen=True)
class StepStats:
    loss: float          # per-token mean over every micro batch of every rank
    label_tokens: int    # tokens that carry the loss, all ranks
    samples: int         # all ranks
    tokens: int          # input tokens (throughput), all ranks
    wait: float          # seconds this rank waited for data


def grad_norm(engine) -> float | None:
    """The last update's gradient norm (a host read: called at log steps only)."""
    g = getattr(engine, "_vtt_grad_norm", None)
    g = engine.get_global_grad_norm() if g is None else g
    if g is None:
        return None
    return float(g.item() if torch.is_tensor(g) else g)


def check_finite(losses: list[torch.Tensor], loss_sum: float, bad: bool, step: int, env: DistEnv,
                 last_ckpt: Path | None) -> None:
    """Stop before the update when any rank's loss of this step is NaN/inf (`bad` is the all-ranks verdict, so
    all ranks stop together). Costs nothing more unless it fires: the values are already on the host."""
    if not bad:
        return
    micro = [i for i, x in enumerate(losses) if not math.isfinite(float(x))]
    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
    raise NonFiniteLossError(
        f"loss is not finite at step {step} (micro batch(es) {micro or 'of another rank'}; this rank {env.rank}'s "
        f"summed token loss is {loss_sum}): stopped before the update; {where}. Lower the learning rate, check "
        "the data, or use --precision fp32 to rule out bf16 overflow")


def next_batches(it, n: int) -> tuple[list[dict], float]:
    """The step's n micro batches up front (their label tokens are counted before any forward); seconds waited."""
    t0 = time.perf_counter()
    batches = [next(it) for _ in range(n)]
    return batches, time.perf_counter() - t0


def _all_reduce_async(t: torch.Tensor):
    """Start a sum over ranks of t in place; returns the handle to wait on. The step's two small collectives
    run behind compute this way: the token count behind the first forward, the totals behind the last backward
    (at two CPU ranks, waiting on each at once cost ~10% of a tiny model's step: bench_step --world 2)."""
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    import deepspeed.comm as dist
    return dist.all_reduce(t, async_op=True)


def start_loss_scale(local_tokens: int, env: DistEnv, device) -> Callable[[], float | torch.Tensor]:
    """step_scale from the step's label tokens on all ranks; call the result for it. Counted on the host (labels
    are CPU tensors until to_device); with several ranks summed on the device and left there: no host wait."""
    if env.world_size == 1:
        scale = step_scale(1, local_tokens)
        return lambda: scale
    t = torch.tensor(float(local_tokens), dtype=torch.float64, device=device)
    work = _all_reduce_async(t)

    def scale():
        work.wait()
        return (env.world_size / t.clamp(min=1)).float()
    return scale


def start_step_totals(loss_sum: torch.Tensor, host: list[int], env: DistEnv,
                      device) -> Callable[[], tuple[float, list[float], bool]]:
    """The step's one host sync, started (after the last forward) and finished by calling the result (after
    the last backward, before the update): (this rank's summed loss, all ranks' [loss, *host], whether any
    rank's loss is not finite). One collective for all of it with several ranks."""
    if env.world_size == 1:
        def local_totals():
            local = loss_sum.item()
            return local, [local, *host], not math.isfinite(local)
        return local_totals
    t = torch.cat([loss_sum.double().reshape(1), (~torch.isfinite(loss_sum)).double().reshape(1),
                   torch.tensor(host, dtype=torch.float64, device=device)])
    local = t[0].clone()
    work = _all_reduce_async(t)

    def totals():
        work.wait()
        vals = t.tolist()
        return local.item(), [vals[0], *vals[2:]], vals[1] > 0
    return totals


def train_step(engine, it, plan: RunPlan, device, dtype, adapter: ModelAdapter, env: DistEnv, step: int,
               last_ckpt: Path | None) -> StepStats:
    """Collective. One optimizer step = grad_accum micro batches, the loss a per-token mean over all its micro
    batches and ranks. Gradients are those of that same mean (run/loss.py), so
    they do not depend on how the global batch is split into ranks x micro batches x accumulation.
    Host syncs: one per step, before the update (the NaN stop and the step's loss); the micro batches' losses
    stay on the device until then."""
    batches, wait = next_batches(it, plan.resolved.grad_accum)
    local = sum(label_count(b, adapter.causal) for b in batches)
    pending_scale = start_loss_scale(local, env, device)  # its collective runs behind the first forward
    losses, samples, tokens, last = [], 0, 0, len(batches) - 1
    for micro, batch in enumerate(batches):
        tokens += adapter.num_tokens(batch)
        samples += batch_samples(batch)
        with autocast_context(engine, device):
            loss = forward_loss(engine, to_device(batch, device, dtype), adapter.causal)
        losses.append(loss.detach().float())
        if micro == last:  # the totals' collective runs while the last backward does
            totals = start_step_totals(torch.stack(losses).sum(), [local, samples, tokens], env, device)
        if micro == 0:
            scale = pending_scale()
        engine.backward(loss * scale, scale_wrt_gas=False)
        if micro == last:  # DeepSpeed updates in this step() call: check first
            mine, (total_loss, global_tokens, total_samples, total_tokens), bad = totals()
            check_finite(losses, mine, bad, step, env, last_ckpt)
            clip_gradients(engine)
        engine.step()
    global_tokens = int(global_tokens)
    return StepStats(total_loss / max(global_tokens, 1), global_tokens, int(total_samples), int(total_tokens), wait)


def setup_logging(run_dir: Path, rank: int) -> None:
    vtt_log = logging.getLogger("vtt")
    vtt_log.setLevel(logging.INFO)
    if rank == 0 and not any(getattr(h, "_vtt_run", None) == str(run_dir) for h in vtt_log.handlers):
        h = logging.FileHandler(run_dir / "train.log")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._vtt_run = str(run_dir)
        vtt_log.addHandler(h)


def seed_everything(seed: int) -> None:

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
    if needs_resolution(cfg):  # `auto` micro batch / checkpointing, a video-token budget: before the model
        res = resolve_auto(cfg)
        cfg = res.cfg
        log.info("memory plan: %s", res.summary())
        if env.rank == 0:  # the choice is part of what the user asked for: shown, not only logged
            print(f"vtt-train: {res.summary()}", file=sys.stderr)
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
    quiet_deepspeed()
    engine = build_engine(plan, adapter)
    plan = dataclasses.replace(plan, ds=engine._vtt_ds)  # buckets sized from the loaded model
    if env.rank == 0:
        write_run_files(plan, run_dir)
    log.info("engine ready at %.1fs (ZeRO-%d, %s, world %d, device %s)", time.perf_counter() - t_start,
             plan.resolved.zero_stage, plan.resolved.precision, env.world_size, device)
    ckpt = CheckpointManager(run_dir, cfg.run.keep_last, env.rank, env.world_size, cfg.model.model_path)
    start_step, position, last_ckpt = 0, None, None
    found = ckpt.find(cfg.run.resume) if cfg.run.resume else None
    if found:
        state = ckpt.load(engine, *found)
        start_step, position, last_ckpt = state["step"], state["data"], found[0] / found[1]
        log.info("resumed from %s at step %d", last_ckpt, start_step)
    else:
        if cfg.run.resume:
            log.info("--resume latest: %s has no complete checkpoint yet, starting from step 0", ckpt.dir)
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


def run_loop(engine, plan: RunPlan, adapter: ModelAdapter, env: DistEnv, device, ckpt: CheckpointManager,
             tracker: Tracker, start_step: int, position: dict | None, last_ckpt: Path | None) -> TrainResult:
    cfg, run = plan.cfg, plan.cfg.run
    dtype = engine_dtype(engine)
    loader = build_loader(cfg.data, adapter.collate, plan.resolved.micro_batch_size, env.rank, env.world_size,
                          split="train", start=position, length_fn=adapter.sample_length)
    it = iter(loader)
    result = TrainResult(Path(run.output_dir), start_step, last_checkpoint=last_ckpt)
    window, totals = Window(), Window()  # totals skip the first step (allocator/kernel warm-up)
    bar = tqdm(total=plan.total_steps, initial=start_step, disable=env.rank != 0 or not run.progress_bar,
               desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    engine.train()
    best = Best.restore(run.keep_best, ckpt)
    step = start_step
    while step < plan.total_steps:
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        stats = train_step(engine, it, plan, device, dtype, adapter, env, step + 1, result.last_checkpoint)
        step += 1
        window.add(stats, time.perf_counter() - t0)
        if step > start_step + 1 or plan.total_steps - start_step == 1:
            totals.add(stats, time.perf_counter() - t0)
        result.losses[step] = loss = stats.loss
        if step % run.log_every == 0 or step == plan.total_steps:
            tracker.log(window.record(step, _epoch(loader, plan.micro_per_epoch), lr, grad_norm(engine)))
            bar.set_postfix(loss=f"{window.loss:.4f}", lr=f"{lr:.2e}")
            window.reset()
        bar.update(1)
        better = False
        if run.eval_every and cfg.data.has_eval and step % run.eval_every == 0:
            better = _eval_all(engine, plan, adapter, env, device, dtype, tracker, step, result, best)
        if better or (run.save_every and step % run.save_every == 0) or (run.save_final and step == plan.total_steps):
            result.last_checkpoint = ckpt.save(engine, step, loader.state(), {"loss": loss})
            if better:
                ckpt.mark_best(step, run.keep_best, best.value)
    bar.close()
    if cfg.data.has_eval and plan.total_steps not in result.eval_losses and start_step < plan.total_steps:
        if _eval_all(engine, plan, adapter, env, device, dtype, tracker, step, result, best):
            if result.last_checkpoint is None or result.last_checkpoint.name != tag_for(step):
                result.last_checkpoint = ckpt.save(engine, step, loader.state(), {"loss": result.losses[step]})
            ckpt.mark_best(step, run.keep_best, best.value)
    result.steps = step
    corrupt = loader.corrupt
    if corrupt:
        log.warning("corrupt samples skipped: %s (first ones: %s)", corrupt, loader.corrupt_events[:5])
    result.summary = summarize(engine, plan, env, result, totals, corrupt)
    tracker.summary(result.summary)
    if env.rank == 0:
        (Path(run.output_dir) / SUMMARY_FILE).write_text(json.dumps(result.summary, indent=1) + "\n")
    return result


@dataclass
class Best:
    """run.keep_best: the best value of its metric so far (restored from checkpoints/best.json on resume)."""
    metric: str | None
    value: float | None = None

    @classmethod
    def restore(cls, metric: str | None, ckpt: CheckpointManager) -> "Best":
        saved = ckpt.best() if metric else None
        return cls(metric, saved["value"] if saved and saved.get("metric") == metric else None)

    def update(self, metrics: dict) -> bool:
        if self.metric is None or self.metric not in metrics:
            return False
        v, sign = metrics[self.metric], BEST_METRICS[self.metric]
        if self.value is not None and sign * v <= sign * self.value:
            return False
        self.value = v
        return True


def _eval_all(engine, plan: RunPlan, adapter: ModelAdapter, env: DistEnv, device, dtype, tracker, step: int,
              result: TrainResult, best: Best) -> bool:
    """Eval loss (+ generation metrics with run.eval_generate); True when run.keep_best's metric improved."""
    metrics = {"eval_loss": eval_and_log(engine, plan, adapter, env, device, dtype, tracker, step)}
    result.eval_losses[step] = metrics["eval_loss"]
    if plan.cfg.run.eval_generate:
        metrics.update(generate_and_log(engine, plan, adapter, env, device, tracker, step))
    return best.update(metrics)


def param_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters; ZeRO-3 partitions report their full size through ds_numel."""
    total = trainable = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def peak_memory_gb() -> float | None:
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return None
    return acc.max_memory_allocated() / 2**30


def summarize(engine, plan: RunPlan, env: DistEnv, result: TrainResult, totals: Window, corrupt: dict) -> dict:
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
