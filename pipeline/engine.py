"""Where the per-video tasks run: the one seam between run.py and a pool or a cluster.

run.py hands an engine picklable tasks in sample order and takes the results back in that order; it
stays the single writer of shards and ledger, so the engine decides where work runs, never what the
shards hold. Both engines give the same results for the same tasks, hence byte-identical shards.
  LocalEngine - worker processes on this machine (pool.ordered_map), the default.
  RayEngine   - Ray core tasks on a Ray cluster (engine_ray.py; ray is imported only there).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol

from .engine_ray import RayEngine
from .pool import ordered_map

ENGINES = ("local", "ray")


class Engine(Protocol):
    """Runs fn over items; a context manager that releases what it started."""

    def check(self) -> None:
        """Preflight before any work: raises ConfigError (one line) if this engine cannot run the job."""

    def map(self, fn: Callable, items: Iterable, workers: int, size: Callable = lambda r: 0) -> Iterator:
        """fn over items, results in input order. `workers` is the parallelism run.py asks for (the local
        pool's size; a cluster sizes by its CPUs); `size(result)` its bytes, for the reorder buffer."""

    def __enter__(self) -> "Engine": ...

    def __exit__(self, *exc) -> None: ...


class LocalEngine:
    """Worker processes on this machine: exactly what vtt-prep did before engines existed."""

    def check(self) -> None:
        pass  # ffmpeg and the data folder are checked by the run itself, on this machine

    def map(self, fn: Callable, items: Iterable, workers: int, size: Callable = lambda r: 0) -> Iterator:
        return ordered_map(fn, items, workers, size=size)

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc) -> None:
        pass


def make_engine(cfg) -> Engine:
    """The engine `cfg.engine` names (PrepConfig validated it); nothing is started yet."""
    if cfg.engine == "ray":
        return RayEngine(cfg)
    return LocalEngine()
