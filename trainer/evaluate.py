"""Evaluation: the per-token mean loss over the eval split (the same definition as the training loss)."""
from __future__ import annotations

import logging

import torch

from vtt.trainer.data import build_loader
from vtt.trainer.dist import DistEnv, all_reduce
from vtt.trainer.engine import to_device
from vtt.trainer.loss import forward_loss, label_count
from vtt.trainer.plan import Plan

log = logging.getLogger("vtt.train")


@torch.no_grad()
def evaluate(engine, plan: Plan, adapter, env: DistEnv, device, dtype) -> float:
    """Collective. Summed token loss / label tokens over every rank's eval batches (the same number of batches
    on every rank: ZeRO-3 needs it). Cost: one forward per eval batch (capped by run.eval_max_batches)."""
    cfg = plan.cfg
    loader = build_loader(cfg.data, adapter.collate, plan.resolved.micro_batch_size, env.rank, env.world_size,
                          split="eval")
    engine.eval()
    total, tokens = 0.0, 0
    for i, batch in enumerate(loader):
        if cfg.run.eval_max_batches and i >= cfg.run.eval_max_batches:
            break
        total += float(forward_loss(engine, to_device(batch, device, dtype), adapter.causal).item())
        tokens += label_count(batch, adapter.causal)
    engine.train()
    total, tokens = all_reduce([total, tokens], device)
    return total / max(tokens, 1)


def eval_and_log(engine, plan: Plan, adapter, env: DistEnv, device, dtype, tracker, step: int) -> float:
    loss = evaluate(engine, plan, adapter, env, device, dtype)
    tracker.log({"step": step, "eval_loss": loss})
    log.info("step %d eval_loss %.4f", step, loss)
    return loss
