"""RUN/final: the trained model as a save_pretrained checkpoint plus vtt_model.json (how to caption with it)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vtt.shards.index import read_index
from vtt.trainer.config import TrainConfig
from vtt.trainer.models.adapter import ModelAdapter
from vtt.trainer.run.dist import DistEnv
from vtt.trainer.run.plan import RunPlan

FINAL_DIR = "final"
MODEL_INFO_FILE = "vtt_model.json"  # beside the exported weights: how to caption with them (tools/caption.py)


def export_model(engine, adapter: ModelAdapter, plan: RunPlan, env: DistEnv, out_dir: Path) -> Path:
    """Collective. save_pretrained safetensors + tokenizer/processor files; ZeRO-3 gathers full weights first."""
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
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
    try:
        return read_index(cfg.data.shards, cfg.data.storage_options).settings
    except Exception:  # informational only
        return {}
