"""The DeepSpeed engine: model loaded by the adapter, parameter groups, vtt's LR schedule; dtype/device moves."""
from __future__ import annotations

import torch
from vtt.trainer.models.adapter import ModelAdapter
from vtt.trainer.run import ds_config as dsc
from vtt.trainer.run.plan import RunPlan


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as in every LLaVA/NLLB recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(plan: RunPlan, adapter: ModelAdapter):
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    import deepspeed
    cfg = plan.cfg
    hf_ds = None
    if plan.resolved.zero_stage == 3 and cfg.deepspeed.zero3_init:  # from_pretrained partitions while loading
        from transformers.integrations import HfDeepSpeedConfig  # heavy: transformers
        hf_ds = HfDeepSpeedConfig(plan.ds)
    torch.manual_seed(cfg.run.seed)  # same LoRA/new-head init on every rank
    model = adapter.load_model()
    if plan.resolved.autocast:  # autocast computes in bf16; what trains keeps fp32 weights (its master copy)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    ds = config_for_model(plan, adapter, model)
    lr_lambda = None
    if "scheduler" not in ds:
        optim, total = cfg.optim, plan.total_steps

        def lr_lambda(step: int) -> float:
            return optim.lr_factor(step, total)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds,
        lr_scheduler=(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)) if lr_lambda else None)
    engine._vtt_hf_ds = hf_ds  # keep alive: transformers holds it by weak reference
    engine._vtt_ds = ds  # the config it runs with (RUN/ds_config.json)
    if plan.resolved.world_size == 1 and plan.resolved.zero_stage == 0:
        # the data-parallel mean over one rank is the identity: skip DeepSpeed's flatten + all_reduce + copy
        # back of every gradient at each boundary
        engine.enable_backward_allreduce = False
    take_over_clipping(engine)
    return engine


def take_over_clipping(engine) -> None:
    """fp32 ZeRO-0: DeepSpeed clips with a Python loop of per-parameter norms over the whole module plus an
    all_reduce, and keeps no norm (grad_norm would log None); vtt clips instead (clip_gradients), same max norm.
    bf16 (DeepSpeed's BF16_Optimizer) and ZeRO >= 1 clip their own fp32 copies and keep the norm."""
    engine._vtt_clip, engine._vtt_grad_norm = 0.0, None
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled() and engine.gradient_clipping() > 0:
        engine._vtt_clip = engine.gradient_clipping()
        engine._config.gradient_clipping = 0.0  # what engine.gradient_clipping() returns


def clip_gradients(engine) -> None:
    """Before the update step (after DeepSpeed's all_reduce of the last backward): clip the trainable
    parameters' gradients to the run's max norm; the norm stays on the device until logged."""
    if engine._vtt_clip:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        engine._vtt_grad_norm = torch.nn.utils.clip_grad_norm_(params, engine._vtt_clip)


def config_for_model(plan: RunPlan, adapter: ModelAdapter, model: torch.nn.Module) -> dict:
    """plan.ds built again with the loaded model's trainable parameter count (gradient bucket sizes)."""
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return dsc.build(plan.cfg.deepspeed, plan.cfg.optim, plan.resolved.world_size, adapter.hidden_size,
                     adapter.cast_buffers, plan.total_steps, bf16_supported=bool(acc.is_bf16_supported()),
                     device=acc.device_name(), resolved=plan.resolved, trainable=trainable)


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """Float inputs (pixels) take the engine's compute dtype; ids and masks stay integer."""
    return {k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def autocast_context(engine, device):
    """The whole micro batch under DeepSpeed's torch_autocast, not only engine.forward: vtt's loss applies the
    output head outside it (run/loss.py), which would otherwise multiply in fp32."""
    on = bool(getattr(engine, "torch_autocast_enabled", lambda: False)())
    return torch.autocast(torch.device(device).type, dtype=engine.torch_autocast_dtype() if on else None,
                          enabled=on)


def engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float32
