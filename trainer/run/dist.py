"""Process environment and collectives: rank/world from any launcher, one process group per process, and the
small all-reduce the loop, eval and checkpoints share."""
from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def free_port() -> int:
    """A port no one listens on now (one machine's rendezvous; tests' servers)."""
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
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if local_rank is not None:  # the launcher's --local_rank wins over a stale environment
        os.environ["LOCAL_RANK"] = str(local_rank)
    return DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def init_distributed(env: DistEnv, timeout_minutes: int) -> str:
    """One process group per process (DeepSpeed caches it); returns the device this rank trains on."""
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(env.local_rank)
    else:
        skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), auto_mpi_discovery=False,
                               timeout=timedelta(minutes=timeout_minutes), verbose=False)
    return acc.device_name(env.local_rank) if acc.device_name() != "cpu" else "cpu"


def skip_shm_comm_op() -> None:
    """On DeepSpeed's CPU accelerator, do not build its shared-memory comm op (`deepspeed_shm_comm`).

    Why: DeepSpeed's torch backend loads that op in every `init_distributed` (comm/torch.py `build_shm_op`),
    which JIT-compiles C++ into TORCH_EXTENSIONS_DIR: 20-150 s of silence on a first run, and again whenever
    the cache is elsewhere (another checkout, a CI machine). Only `inference_all_reduce` (AutoTP inference
    layers) uses it; training's all_reduce, all_gather and reduce_scatter (ZeRO 0-3) go through
    torch.distributed's gloo, and without the op that inference path falls back to gloo too.
    `build_shm_op` returns None for an op that `deepspeed.ops.__compatible_ops__` marks incompatible; DeepSpeed
    keeps that dict cached in the module so such edits persist (probing it is what init_distributed does
    anyway)."""
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def quiet_deepspeed() -> None:

    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates: one warning per call, every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)


def all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """Collective: element-wise sum (or max) over ranks, in float64 so token counts stay exact."""
    # heavy: deepspeed (~3 s to import); loaded only where a run uses it
    import deepspeed.comm as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()
