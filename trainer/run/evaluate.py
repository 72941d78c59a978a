"""Evaluation: the per-token mean loss over the eval split (the same definition as the training loss)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from vtt.trainer.data.loader import build_loader
from vtt.trainer.models.adapter import ModelAdapter
from vtt.trainer.run.dist import DistEnv, all_reduce
from vtt.trainer.run.ds_engine import autocast_context, to_device
from vtt.trainer.run.loss import forward_loss, label_count
from vtt.trainer.run.plan import RunPlan
from vtt.trainer.tools.gen_eval import EvalConfig, evaluate_model

log = logging.getLogger("vtt.train")


@torch.no_grad()
def evaluate(engine, plan: RunPlan, adapter: ModelAdapter, env: DistEnv, device, dtype) -> float:
    """Collective. Summed token loss / label tokens over every rank's eval batches (the same number of batches
    on every rank: ZeRO-3 needs it). Cost: one forward per eval batch (capped by run.eval_max_batches)."""
    cfg = plan.cfg
    loader = build_loader(cfg.data, adapter.collate, plan.resolved.micro_batch_size, env.rank, env.world_size,
                          split="eval")
    engine.eval()
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: no per-batch sync
    for i, batch in enumerate(loader):
        if cfg.run.eval_max_batches and i >= cfg.run.eval_max_batches:
            break
        with autocast_context(engine, device):
            total += forward_loss(engine, to_device(batch, device, dtype), adapter.causal).double()
        tokens += label_count(batch, adapter.causal)
    engine.train()
    total, tokens = all_reduce([total.item(), tokens], device)
    return total / max(tokens, 1)


def eval_and_log(engine, plan: RunPlan, adapter: ModelAdapter, env: DistEnv, device, dtype, tracker, step: int) -> float:
    loss = evaluate(engine, plan, adapter, env, device, dtype)
    tracker.log({"step": step, "eval_loss": loss})
    log.info("step %d eval_loss %.4f", step, loss)
    return loss


def generate_and_log(engine, plan: RunPlan, adapter: ModelAdapter, env: DistEnv, device, tracker, step: int) -> dict:
    """Collective. Answers the eval set (vtt-eval's path, capped by run.eval_generate_samples) and logs
    eval_exact_match / eval_bleu / eval_chrf; files go to RUN/eval/step_NNNNNNNN/. Rank 0 generates; under
    ZeRO-3 every rank runs the same generation (its parameters are partitioned) and only rank 0 writes."""

    run = plan.cfg.run
    out = Path(run.output_dir) / "eval" / f"step_{step:08d}"
    cfg = EvalConfig("", plan.cfg.data.shards, str(out), batch_size=run.eval_generate_batch,
                     limit=run.eval_generate_samples)
    metrics = {}
    if env.rank == 0 or plan.resolved.zero_stage == 3:
        engine.eval()
        metrics = evaluate_model(adapter, engine.module, cfg, data=plan.cfg.data, write=env.rank == 0,
                                 progress=False)
        engine.train()
    keys = ("n", "exact_match", "bleu", "chrf")
    values = all_reduce([float(metrics.get(k) or 0.0) if env.rank == 0 else 0.0 for k in keys], device)
    result = dict(zip(keys, values))
    tracker.log({"step": step, **{f"eval_{k}": v for k, v in result.items()}})
    log.info("step %d eval exact_match %.3f bleu %.1f chrf %.1f (%d answers, %s)", step, result["exact_match"],
             result["bleu"], result["chrf"], result["n"], out)
    return result
