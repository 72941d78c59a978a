"""Training checkpoints: DeepSpeed's engine checkpoint + vtt's client state (step, every rank's data position
and RNG states), the last K kept, `--resume latest|PATH`.

Layout: RUN/checkpoints/step_00000100/ (DeepSpeed files, one `vtt_done.rankN.json` per rank, `vtt_state.json`),
RUN/checkpoints/latest. Save protocol, all ranks: DeepSpeed writes its files (no `latest`: DeepSpeed's rank 0
would write it before the other ranks finish theirs); each rank fsyncs the folder's files and writes its done
file; barrier; rank 0 checks every done file, then writes `vtt_state.json` (the completion marker: the file list
with sizes) atomically, then `latest`, then prunes. A checkpoint is complete only with a marker whose files are
all there at their sizes; resume takes the newest complete one, so `latest` is only a hint (kept for DeepSpeed's
own tools such as zero_to_fp32.py), and a kill at any instant resumes from a whole checkpoint.

Frozen parameters (LoRA base, frozen towers) are left out of the checkpoint: they are reloaded from the model
path at resume, so a LoRA save writes the adapters and their optimizer state, not the base model.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from vtt.shards.format import TMP_PREFIX, atomic_write_bytes
from vtt.trainer.models.model_io import checkpoint_file
from vtt.trainer.run.faults import crash_point

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LATEST = "latest"
BEST_FILE = "best.json"  # run.keep_best: which checkpoint is the best so far (kept beside the last K)
STATE_FILE = "vtt_state.json"  # the completion marker, written last
DONE_PREFIX = "vtt_done.rank"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, LoRA init, shuffles in user code)."""
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["device"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    from deepspeed.accelerator import get_accelerator
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "device" in state:
        get_accelerator().set_rng_state(state["device"])


def _all_gather(obj):
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    import deepspeed.comm as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def has_frozen(module: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def _data_files(path: Path) -> list[Path]:
    """DeepSpeed's files of a tag folder (not vtt's markers, not temp files)."""
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((TMP_PREFIX, DONE_PREFIX))
                  and p.name != STATE_FILE)


def sync_files(path: Path) -> dict[str, int]:
    """fsync every file of the tag folder (this node's writes reach the disk); {relative name: size}.
    Cost: one open + fsync per file of one checkpoint."""
    files = {}
    for p in _data_files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            files[str(p.relative_to(path))] = os.fstat(fd).st_size
        finally:
            os.close(fd)
    return files


def incomplete_reason(path: Path) -> str | None:
    """None for a complete checkpoint, else why not. Cost: one stat per file of the checkpoint."""
    marker = path / STATE_FILE
    if not marker.is_file():
        return f"no {STATE_FILE} (the save was interrupted before every rank finished)"
    try:
        files = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError) as e:
        return f"unreadable {STATE_FILE}: {e}"
    if files is None:  # written by an older vtt (marker after a barrier over all ranks' files): trusted
        return None if any(path.glob("*model_states.pt")) else "no *model_states.pt inside"
    for name, size in files.items():
        p = path / name
        if not p.is_file() or p.stat().st_size != size:
            return f"{name} is missing or not {size} bytes as {STATE_FILE} records"
    return None


def frozen_source(model_path: str) -> dict:
    """Where the frozen weights a checkpoint leaves out reload from: the model folder (a hub id resolves to its
    cache snapshot, named by commit) and its weight files' sizes and mtimes. Cost: one stat per file."""
    folder = Path(model_path)
    if not folder.is_dir():
        config = checkpoint_file(model_path, "config.json")
        if config is None:
            return {"model_path": model_path}
        folder = config.parent
    weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir())
               if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file()}
    return {"model_path": model_path, "folder": str(folder.resolve()), "weights": weights}


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, world_size: int,
                 model_path: str | None = None):
        self.dir = Path(run_dir) / CKPT_DIR
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self.model_path = model_path  # where frozen weights reload from (recorded, compared at resume)

    # -------------------------------------------------------------- saving
    def save(self, engine, step: int, data_position: dict, extra: dict | None = None) -> Path:
        """Collective: every rank calls it. Each rank's data position and RNG state travel with the
        checkpoint (DeepSpeed writes client_state from data-parallel rank 0 only, hence the gather)."""
        # heavy: deepspeed (~3 s to import); loaded only where a run uses it
        import deepspeed.comm as dist
        tag = tag_for(step)
        path = self.dir / tag
        if self.rank == 0 and path.exists():  # debris of an interrupted save of this step (never complete:
            shutil.rmtree(path)                # resume starts after the newest complete one)
        client = {"vtt": {"step": step, "world_size": self.world_size, "data": _all_gather(data_position),
                          "rng": _all_gather(rng_state()), **(extra or {})}}  # the gathers also order the rmtree
        crash_point("save-begin", self.rank)
        frozen = has_frozen(engine.module)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client, save_latest=False,
                               exclude_frozen_parameters=frozen)
        crash_point("rank-files", self.rank)
        atomic_write_bytes(path / f"{DONE_PREFIX}{self.rank}.json", json.dumps(sync_files(path)).encode())
        crash_point("rank-done", self.rank)
        dist.barrier()
        problem = self._commit(path, step, client["vtt"]["data"], frozen, extra) if self.rank == 0 else None
        problem = _all_gather(problem)[0]  # every rank raises alike instead of waiting on rank 0
        if problem:
            raise CheckpointError(problem)
        return path

    def _commit(self, path: Path, step: int, data: list, frozen: bool, extra: dict | None) -> str | None:
        """Rank 0, after the barrier: the marker (only if every rank's done file is there), `latest`, prune."""
        missing = [r for r in range(self.world_size) if not (path / f"{DONE_PREFIX}{r}.json").is_file()]
        if missing:
            return (f"{path}: ranks {missing} finished their save but rank 0 cannot see their done files: "
                    "checkpoints need a folder all ranks share")
        files = {str(p.relative_to(path)): p.stat().st_size for p in _data_files(path)}
        meta = {"step": step, "world_size": self.world_size, "data": data, "frozen_excluded": frozen,
                "files": files, **(extra or {})}
        if frozen and self.model_path:
            meta["frozen_source"] = frozen_source(self.model_path)
        atomic_write_bytes(path / STATE_FILE, json.dumps(meta, indent=1, default=str).encode())
        crash_point("marker", self.rank)
        atomic_write_bytes(self.dir / LATEST, path.name.encode())
        crash_point("latest", self.rank)
        self.prune()
        return None

    def tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))

    def latest_tag(self) -> str | None:
        p = self.dir / LATEST
        return p.read_text().strip() if p.is_file() else None

    def prune(self) -> list[str]:
        """Remove incomplete checkpoints (crash debris: called once every rank has finished the current save)
        and all but the newest keep_last complete ones. Cost: one stat per file of each checkpoint."""
        tags, best = self.tags(), (self.best() or {}).get("tag")
        complete = [t for t in tags if incomplete_reason(self.dir / t) is None]
        doomed = [t for t in tags if t not in complete]
        if self.keep_last > 0:
            doomed += [t for t in complete[:-self.keep_last] if t != best]  # the best one stays beside them
        for t in doomed:
            shutil.rmtree(self.dir / t, ignore_errors=True)
        return doomed

    def mark_best(self, step: int, metric: str, value: float) -> None:
        """Rank 0: checkpoints/best.json names the (complete) checkpoint of `step` as the best by `metric`."""
        if self.rank == 0:
            record = {"tag": tag_for(step), "step": step, "metric": metric, "value": value}
            atomic_write_bytes(self.dir / BEST_FILE, json.dumps(record, indent=1).encode())

    def best(self) -> dict | None:
        """best.json, if a run with keep_best wrote one: {tag, step, metric, value}."""
        p = self.dir / BEST_FILE
        return json.loads(p.read_text()) if p.is_file() else None

    # -------------------------------------------------------------- finding and loading
    def find(self, resume: str) -> tuple[Path, str] | None:
        """(load_dir, tag) for --resume: "latest" = the newest complete checkpoint of this run (None when it has
        none yet), a tag folder (must be complete), or a checkpoints folder / another run's folder (its newest
        complete one)."""
        if resume == "latest":
            return newest_complete(self.dir)
        p = Path(resume)
        if not p.exists():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        if TAG_RE.match(p.name) or any(p.glob("*model_states.pt")):
            reason = incomplete_reason(p)
            if reason:
                raise CheckpointError(f"{p}: not a complete checkpoint: {reason}")
            return p.parent, p.name
        for folder in (p / CKPT_DIR, p):
            found = newest_complete(folder)
            if found:
                return found
        raise CheckpointError(f"--resume {resume}: no complete checkpoint in {p} or {p / CKPT_DIR}")

    def load(self, engine, folder: Path, tag: str) -> dict:
        """Load the engine state; return this rank's {step, data, ...} and restore its RNG states. A checkpoint
        without frozen weights keeps the ones the model was loaded with (from the model path)."""
        frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
        load_fn = _partial_loader(folder / tag, frozen) if frozen else None
        if frozen:
            self._check_frozen_source(folder / tag)
        path, client = engine.load_checkpoint(str(folder), tag=tag, custom_load_fn=load_fn)
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


    def _check_frozen_source(self, path: Path) -> None:
        """The frozen weights come from the model path, not the checkpoint: say so when it changed since."""
        saved = json.loads((path / STATE_FILE).read_text()).get("frozen_source") if (path / STATE_FILE).is_file() \
            else None
        if saved and self.model_path and frozen_source(self.model_path) != saved:
            log.warning("%s leaves out the frozen weights, which reload from %s, and those changed since the "
                        "checkpoint was written (then: %s; now: %s): the resumed run trains on another base",
                        path, self.model_path, saved, frozen_source(self.model_path))


def newest_complete(folder: Path) -> tuple[Path, str] | None:
    """(folder, tag) of the newest complete checkpoint; incomplete newer ones are logged and skipped."""
    if not folder.is_dir():
        return None
    tags = sorted((p.name for p in folder.iterdir() if p.is_dir() and TAG_RE.match(p.name)), reverse=True)
    hint = (folder / LATEST).read_text().strip() if (folder / LATEST).is_file() else None
    for tag in tags:
        reason = incomplete_reason(folder / tag)
        if reason is None:
            if hint and hint != tag:
                log.warning("%s names %s, the newest complete checkpoint is %s: resuming from it",
                            folder / LATEST, hint, tag)
            return folder, tag
        log.warning("skipping incomplete checkpoint %s: %s", folder / tag, reason)
    return None


def _partial_loader(path: Path, frozen: set[str]):
    """DeepSpeed custom_load_fn: load a state dict that lacks (only) frozen parameters; anything else missing
    or unexpected is an error, as a strict load would make it."""
    def load(src: dict, dst: torch.nn.Module) -> None:
        result = dst.load_state_dict(src, strict=False)
        missing = sorted(set(result.missing_keys) - frozen)
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, unexpected "
                                  f"{sorted(result.unexpected_keys)[:5]}")
    return load
