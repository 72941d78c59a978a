"""Training checkpoints: DeepSpeed's engine checkpoint + vtt's client state (step, every rank's data position
and RNG states), the last K kept, `--resume latest|PATH`.

Layout: RUN/checkpoints/step_00000100/ (DeepSpeed files + vtt_state.json once complete), RUN/checkpoints/latest.
DeepSpeed writes `latest` only after every file of a tag is written, so a run killed mid-save resumes from
the previous checkpoint; pruning never removes the tag `latest` names.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from vtt.shards.format import atomic_write_bytes

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "vtt_state.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, LoRA init, shuffles in user code)."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["device"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "device" in state:
        get_accelerator().set_rng_state(state["device"])


def _all_gather(obj):
    import deepspeed.comm as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, world_size: int):
        self.dir = Path(run_dir) / CKPT_DIR
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size

    # -------------------------------------------------------------- saving
    def save(self, engine, step: int, data_position: dict, extra: dict | None = None) -> Path:
        """Collective: every rank calls it. Each rank's data position and RNG state travel with the
        checkpoint (DeepSpeed writes client_state from data-parallel rank 0 only, hence the gather)."""
        import deepspeed.comm as dist
        tag = tag_for(step)
        client = {"vtt": {"step": step, "world_size": self.world_size, "data": _all_gather(data_position),
                          "rng": _all_gather(rng_state()), **(extra or {})}}
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client, save_latest=True)
        dist.barrier()
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size, "data": client["vtt"]["data"], **(extra or {})}
            atomic_write_bytes(self.dir / tag / STATE_FILE, json.dumps(meta, indent=1, default=str).encode())
            self.prune()
        dist.barrier()
        return self.dir / tag

    def tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))

    def latest_tag(self) -> str | None:
        p = self.dir / LATEST
        return p.read_text().strip() if p.is_file() else None

    def prune(self) -> list[str]:
        """Remove all but the newest keep_last checkpoints (never the one `latest` names)."""
        if self.keep_last <= 0:
            return []
        tags, latest = self.tags(), self.latest_tag()
        doomed = [t for t in tags[:-self.keep_last] if t != latest]
        for t in doomed:
            shutil.rmtree(self.dir / t, ignore_errors=True)
        return doomed

    # -------------------------------------------------------------- finding and loading
    def find(self, resume: str) -> tuple[Path, str] | None:
        """(load_dir, tag) for --resume: "latest" (None when this run has no checkpoint yet), a tag folder,
        a checkpoints folder holding `latest`, or another run's folder."""
        if resume == "latest":
            tag = self.latest_tag()
            if tag is None:
                return None
            return self._checked(self.dir, tag)
        p = Path(resume)
        if not p.exists():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        for folder in (p, p / CKPT_DIR):
            if (folder / LATEST).is_file():
                return self._checked(folder, (folder / LATEST).read_text().strip())
        return self._checked(p.parent, p.name)

    @staticmethod
    def _checked(folder: Path, tag: str) -> tuple[Path, str]:
        path = folder / tag
        if not path.is_dir() or not any(path.glob("*model_states.pt")):
            raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (no *model_states.pt inside)")
        return folder, tag

    def load(self, engine, folder: Path, tag: str) -> dict:
        """Load the engine state; return this rank's {step, data, ...} and restore its RNG states."""
        path, client = engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise CheckpointError(f"{folder / tag}: DeepSpeed could not load this checkpoint")
        state = (client or {}).get("vtt")
        if not state:
            raise CheckpointError(f"{folder / tag}: no vtt client state (not written by vtt-train?)")
        if state["world_size"] != self.world_size:
            raise CheckpointError(
                f"{folder / tag} was written by {state['world_size']} processes, this run has {self.world_size}: "
                "ZeRO checkpoints resume at the same world size only (convert it with DeepSpeed's universal "
                "checkpoint tools first)")
        set_rng_state(state["rng"][self.rank])
        return {"step": state["step"], "data": state["data"][self.rank],
                **{k: v for k, v in state.items() if k not in ("step", "data", "rng", "world_size")}}
