"""RayEngine: the per-video tasks as Ray core tasks on a Ray cluster (`vtt-prep extract --engine ray`).

One Ray task per video file (`num_cpus=1`; ffmpeg runs one thread per call). Ray retries a task whose
worker process or node died (MAX_RETRIES), not a Python exception: process_video returns failures as
data. A window of at most 2 x cluster CPUs tasks is in flight, and finished results wait for their turn
in a reorder buffer bounded by count and bytes as in pool.py, so one slow video holds one CPU, not the
run, and neither the object store nor the driver piles up frames. Results come back in input order to
the driver, which stays the single writer. Ray is imported here only, when --engine ray is asked for.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Iterable, Iterator

from vtt.shards.settings import ConfigError
from vtt.shards.storage import StorageError, is_url

from .discover_remote import check_data_url
from .extract import ffmpeg_version
from .frames import ExtractError
from .pool import REORDER_ITEMS_PER_WORKER, REORDER_MAX_BYTES, ordered_window
from .proc import ProcMissing, ProcTimeout, run
from .task import lost_outcome

MAX_RETRIES = 3                 # Ray's default, stated: a task whose worker or node dies is run again
PREFLIGHT_TIMEOUT_S = 120.0     # every node answers the check task within this (a fresh node starts a worker)
CONNECT_TIMEOUT_S = 5.0         # TCP reach of the head before ray.init, which retries a dead address for minutes
RAY_FLOOR = "2.60.0"


def missing_ray_message(error: BaseException) -> str:
    return (f"--engine ray needs Ray on this machine and every node: pip install -e .[ray] "
            f"(ray>={RAY_FLOOR}); importing it failed: {error}")


def import_ray():
    """The ray module, or ConfigError saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report, no prompt
    try:
        # optional: ray
        import ray
    except ImportError as e:
        raise ConfigError(missing_ray_message(e)) from None
    return ray


def forwarded_env() -> dict[str, str]:
    """The driver's AWS_* variables (keys, session token, AWS_ENDPOINT_URL, AWS_PROFILE...), given to the
    job's workers as Ray runtime_env env_vars: a bucket that the driver reaches through its environment is
    reached the same way on every node. A node's own profile or instance role is used when none is set."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.split("://")[-1].rpartition(":")
    return host, int(port)


def resolve_address(address: str | None) -> str:
    """What to pass to ray.init: "local" (start one; RAY_ADDRESS is ignored then) or a reachable address.

    `auto` is resolved as Ray does ($RAY_ADDRESS, then the cluster `ray start` last started here); the head
    must accept a TCP connection within CONNECT_TIMEOUT_S, as ray.init itself would retry for minutes."""
    if address is None:
        return "local"
    if address == "auto":
        # optional: ray
        from ray._private.services import canonicalize_bootstrap_address
        try:
            resolved = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise ConfigError("--ray-address auto: no running Ray cluster found on this machine "
                              "(start one with `ray start --head`, or give HOST:PORT)") from None
    else:
        resolved = address
    host, port = _host_port(resolved)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"Ray cluster {address}"
                          f"{f' ({resolved})' if resolved != address else ''}: cannot connect ({e})") from None
    return address


class RayEngine:
    """Ray core tasks; connects in check() (or starts a local Ray of cfg.workers CPUs), shuts down what
    it started on exit. Reuses a Ray this process is already connected to, and leaves it connected."""

    def __init__(self, cfg, on_lost: Callable | None = lost_outcome):
        self.cfg, self.on_lost = cfg, on_lost
        self.ray, self.started = None, False

    def check(self) -> None:
        """Ray importable, the cluster reachable, every node with CPUs running vtt's check task: ffmpeg and
        ffprobe there, the same ffmpeg as here, the data folder readable. Cost: one tiny task per node."""
        if self.ray is not None:
            return
        ray = import_ray()
        if not ray.is_initialized():
            address = resolve_address(self.cfg.ray_address)
            extra = {"num_cpus": self.cfg.workers, "include_dashboard": False} if address == "local" else {}
            env = forwarded_env()
            if env:
                extra["runtime_env"] = {"env_vars": env}
            try:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **extra)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"Ray cluster {address}: cannot connect: {str(e).splitlines()[0]}") from None
            self.started = True
        self.ray = ray
        try:
            check_nodes(ray, self.cfg)
        except BaseException:
            self.close()
            raise

    def map(self, fn: Callable, items: Iterable, workers: int, size: Callable = lambda r: 0) -> Iterator:
        """fn over items as Ray tasks, results in input order (`workers` is ignored: the cluster's CPUs
        size the window). Cost per video: one task (~0.5 ms) and its result's bytes over the network."""
        self.check()
        cpus = max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        remote = self.ray.remote(fn).options(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)
        return ordered_tasks(self.ray, remote, items, 2 * cpus, REORDER_ITEMS_PER_WORKER * cpus,
                             REORDER_MAX_BYTES, size, self.on_lost)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()  # a Ray we started stops; a cluster we joined is only left
        self.ray, self.started = None, False

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ordered_tasks(ray, remote, items: Iterable, max_running: int, max_buffered: int, max_bytes: int,
                  size: Callable, on_lost: Callable | None) -> Iterator:
    """`remote` over items; results in input order, in pool.ordered_window's bounds (the same window as the
    local pool). A fetched result's object is released at once (its ref dropped), so the object store holds
    at most the window's results."""
    item_of, running = {}, {}

    def submit(item):
        ref = remote.remote(item)
        item_of[ref] = item
        return ref

    def collect(refs):
        ray.wait(refs, num_returns=1)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # all that are ready now
        return [(ref, _fetch(ray, ref, item_of.pop(ref), on_lost)) for ref in done]
    try:
        yield from ordered_window(submit, collect, items, max_running, max_buffered, max_bytes, size, running)
    finally:
        for ref in running:  # on error or Ctrl-C: queued videos must not run on
            ray.cancel(ref, force=False)


def _fetch(ray, ref, item, on_lost: Callable | None):
    """The task's result; a task Ray gave up on (its worker or node died MAX_RETRIES + 1 times) becomes
    on_lost(item, error), failure as data. A Python exception inside the task is raised: process_video
    returns its own failures, so this means a broken node (vtt missing there, say)."""
    # optional: ray
    from ray.exceptions import RayError, RayTaskError
    try:
        return ray.get(ref)
    except RayTaskError as e:
        raise RuntimeError(f"a vtt-prep task failed on the Ray cluster: {str(e).strip().splitlines()[0]}") from e
    except RayError as e:
        if on_lost is None:
            raise
        return on_lost(item, e)


def node_report(spec, data_dir: str, storage: dict) -> dict:
    """Runs on each node (a Ray task): host, its ffmpeg version line, and the first problem found."""
    out = {"host": socket.gethostname(), "ffmpeg": None, "problem": None}
    try:
        out["ffmpeg"] = ffmpeg_version(spec)
        run([spec.ffprobe, "-hide_banner", "-version"], timeout=min(spec.timeout_s, 30))
    except ExtractError as e:
        out["problem"] = f"ffmpeg: {e.message}"
    except (ProcMissing, ProcTimeout) as e:
        out["problem"] = f"ffprobe: {e}"
    if out["problem"] is None and is_url(data_dir):
        try:
            check_data_url(data_dir, storage)
        except StorageError as e:
            out["problem"] = f"cannot read the data folder: {e}"
    elif out["problem"] is None and not os.path.isdir(data_dir):
        out["problem"] = (f"data folder {data_dir} is not there (a local folder must be on a filesystem "
                          f"every node mounts at the same path; or give a URL such as s3://bucket/videos)")
    return out


def check_nodes(ray, cfg) -> None:
    """ConfigError naming the first node that cannot do the work, or whose ffmpeg differs (another ffmpeg
    may give other pixels: the shards would depend on which node took a video)."""
    # optional: ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise ConfigError("the Ray cluster has no node with CPUs to run vtt-prep tasks")
    spec, probe = cfg.frame_spec(), ray.remote(node_report)
    refs = [probe.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(spec, str(cfg.data_dir), cfg.storage()) for n in nodes]
    deadline = time.monotonic() + PREFLIGHT_TIMEOUT_S
    versions = {}
    for node, ref in zip(nodes, refs):
        where = f"Ray node {node.get('NodeManagerAddress', node['NodeID'])}"
        try:
            report = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
        except Exception as e:  # a timeout, or a node that cannot even run vtt's code
            raise ConfigError(f"{where}: the check task failed ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                              f"every node needs vtt, ray and ffmpeg installed") from None
        if report["problem"]:
            raise ConfigError(f"{where} ({report['host']}): {report['problem']}")
        versions.setdefault(report["ffmpeg"], where)
    _same_ffmpeg(versions, spec)


def _same_ffmpeg(versions: dict[str, str], spec) -> None:
    try:
        here = ffmpeg_version(spec)
    except ExtractError:
        here = None  # the run records that failure itself, for every video
    if here is not None:
        versions.setdefault(here, "this machine")
    if len(versions) > 1:
        listed = "; ".join(f"{w}: {v}" for v, w in versions.items())
        raise ConfigError(f"the Ray nodes run different ffmpeg builds ({listed}); the shards would depend "
                          f"on which node extracted a video: install the same ffmpeg everywhere")
