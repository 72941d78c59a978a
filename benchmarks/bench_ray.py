"""vtt-prep --engine local vs --engine ray on the same clips, at equal workers, in one run.

    .venv/bin/python benchmarks/bench_ray.py [--clips 200] [--workers 2] [--repeat 1] [--corpus DIR]

Generates (once, cached in --corpus) short lavfi clips with sidecars, extracts them with each engine into
fresh shards folders (interleaved `--repeat` times, best run kept), checks both give the same bytes, and
prints: videos/s of each and the ratio; Ray's start time (not in the run: a cluster is up before a job);
the engine's own cost per video (a trivial task through the same ordered window, and the per-video
difference of the two runs); the peak object-store bytes sampled during the Ray run; the driver's cost
per video (writer + commits: the single writer's ceiling); and, on paper, the expected time for 1M and
10M clips on 10 and 100 nodes of 32 cores from the measured per-core rate.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from vtt.pipeline.config import PrepConfig  # noqa: E402
from vtt.pipeline.run import run_extract  # noqa: E402

SECONDS, SIZE, FPS = 2.0, "320x240", 25


def make_clip(path: Path, i: int) -> None:
    if path.exists():
        return
    tmp = path.with_name(".tmp-" + path.name)
    src = f"testsrc2=s={SIZE}:r={FPS}:d={SECONDS},hue=h={i * 7 % 360}"  # a different picture per clip
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src, "-c:v", "libx264", "-preset",
                    "ultrafast", "-pix_fmt", "yuv420p", "-g", "25", str(tmp)], check=True, timeout=120)
    path.with_suffix(".json").write_text(json.dumps({"video_id": path.stem, "description": f"clip {i}",
                                                     "duration": SECONDS}))
    tmp.rename(path)


def make_corpus(folder: Path, n: int, workers: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda i: make_clip(folder / f"c{i:05d}.mp4", i), range(n)))
    return folder


class StoreSampler:
    """Peak bytes, polled every `every` seconds, of the cluster's object store (plasma: results over Ray's
    100 KiB inline limit; asked from the raylets, needs grpcio) and of the driver's in-process memory store
    (the smaller results, inlined into the reply)."""

    def __init__(self, address: str, every: float = 0.05):
        import ray
        try:
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address
            import grpc  # noqa: F401 - the raylet query needs it (`pip install grpcio`; ray[default] has it)
            self.state, self.reply = get_state_from_address(address), get_memory_info_reply
        except ImportError:
            self.state = None
        self.core = ray._private.worker.global_worker.core_worker
        self.every, self.peak, self.peak_driver, self.samples = every, 0, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            if self.state is not None:
                self.peak = max(self.peak, self.reply(self.state).store_stats.object_store_bytes_used)
            self.peak_driver = max(self.peak_driver, self.core.get_local_memory_store_bytes_used())
            self.samples += 1
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


SMALL = {"num_frames": 8, "size": "224"}                          # ~55 KiB a sample: inlined replies
LARGE = {"num_frames": 32, "size": "448", "image_format": "png"}  # ~5 MB a sample: through the object store


def extract(data: Path, out: Path, workers: int, engine: str, settings: dict = SMALL):
    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepConfig(data, out, workers=workers, quiet=True, engine=engine, **settings)
    t0 = time.perf_counter()
    report = run_extract(cfg)
    wall = time.perf_counter() - t0
    assert report.exit_code == 0 and report.videos_ok > 0, report.failed[:3]
    return wall, report


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))} | {
        "index.json": (out / "index.json").read_bytes()}


def trivial_overhead(ray, workers: int, nbytes: int, n: int = 1000) -> tuple[float, float, float]:
    """ms per task through the Ray engine's ordered window and through the local pool, for a task that
    does nothing but return `nbytes` (a typical sample); and the driver's CPU ms per Ray task (all its
    threads: what caps one driver, however many nodes)."""
    from vtt.pipeline.engine_ray import ordered_tasks
    from vtt.pipeline.pool import ordered_map
    remote = ray.remote(_payload).options(num_cpus=1)
    list(ordered_tasks(ray, remote, [nbytes] * 50, 2 * workers, 64, 2**28, len, None))  # workers up
    t0, cpu0 = time.perf_counter(), time.process_time()
    list(ordered_tasks(ray, remote, [nbytes] * n, 2 * workers, 16 * workers, 2**28, len, None))
    t_ray = (time.perf_counter() - t0) / n * 1000
    cpu_ray = (time.process_time() - cpu0) / n * 1000
    t0 = time.perf_counter()
    list(ordered_map(_payload, [nbytes] * n, workers, size=len))
    t_local = (time.perf_counter() - t0) / n * 1000
    return t_ray, t_local, cpu_ray


def _payload(nbytes: int) -> bytes:
    return os.urandom(nbytes)


def paper_table(per_core: float, driver_s: float) -> list[str]:
    """Expected hours: the cluster's rate (cores x per-core rate) or the single writer's, whichever is lower."""
    rows = ["| clips | nodes x 32 cores | workers' rate (videos/s) | driver ceiling (videos/s) | expected time |",
            "|---|---|---|---|---|"]
    ceiling = 1 / driver_s if driver_s > 0 else float("inf")
    for n in (10**6, 10**7):
        for nodes in (10, 100):
            rate = min(nodes * 32 * per_core, ceiling)
            hours = n / rate / 3600
            rows.append(f"| {n / 1e6:g}M | {nodes} x 32 | {nodes * 32 * per_core:,.0f} | {ceiling:,.0f} | "
                        f"{hours:.1f} h{' (driver-bound)' if rate == ceiling else ''} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--corpus", type=Path, default=Path(os.environ.get(
        "VTT_BENCH_CORPUS", Path.home() / ".cache" / "vtt" / "bench-ray-corpus")))
    args = ap.parse_args()
    import ray
    t0 = time.perf_counter()
    data = make_corpus(args.corpus / f"{args.clips}", args.clips, args.workers)
    print(f"corpus: {args.clips} clips of {SECONDS:g} s {SIZE} ({time.perf_counter() - t0:.1f} s to make/find)")
    t0 = time.perf_counter()
    ctx = ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    t_init = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    best = {"local": None, "ray": None}
    gcs = ctx.address_info["gcs_address"]
    try:
        for _ in range(args.repeat):
            for engine in ("local", "ray"):
                with StoreSampler(gcs) as store:
                    wall, report = extract(data, tmp / engine, args.workers, engine)
                if best[engine] is None or wall < best[engine][0]:
                    best[engine] = (wall, report, store)
        same = shard_bytes(tmp / "local") == shard_bytes(tmp / "ray")
        mean_sample = best["ray"][1].bytes_written / best["ray"][1].videos_ok
        t_task, t_pool, cpu_task = trivial_overhead(ray, args.workers, int(mean_sample))
        with StoreSampler(gcs) as large:  # large samples: what the window bounds in the object store
            large_wall, large_report = extract(data, tmp / "large", args.workers, "ray", LARGE)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    report_lines(args, best, same, t_init, mean_sample, t_task, t_pool, cpu_task)
    mean_large = large_report.bytes_written / large_report.videos_ok
    print(f"  large samples ({LARGE}; {mean_large / 2**20:.1f} MiB each, {large_report.bytes_written / 2**20:.0f} "
          f"MiB in all, {large_wall:.1f} s): peak object store {_mib(large.peak, large.state)}, driver memory "
          f"store {large.peak_driver / 2**20:.2f} MiB; the window allows {2 * args.workers} running + "
          f"{16 * args.workers} buffered results ({18 * args.workers * mean_large / 2**20:.0f} MiB)")


def _mib(nbytes: int, state) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if state is not None else "n/a (pip install grpcio to ask the raylets)"


def report_lines(args, best, same, t_init, mean_sample, t_task, t_pool, cpu_task):
    n = best["local"][1].videos_ok
    vps = {e: n / best[e][0] for e in best}
    print(f"workers: {args.workers} (local pool processes = Ray CPUs); best of {args.repeat}")
    for e in ("local", "ray"):
        print(f"  --engine {e:5s}: {best[e][0]:6.1f} s  {vps[e]:6.2f} videos/s  ({vps[e] / args.workers:.2f} per core)")
    print(f"  ratio ray/local: {vps['ray'] / vps['local']:.2f}x   shards byte-identical: {same}")
    print(f"  ray.init (local Ray start, not in the run): {t_init:.1f} s")
    diff = (best["ray"][0] - best["local"][0]) / n * 1000
    print(f"  engine overhead per video: run difference {diff:+.1f} ms; trivial task returning "
          f"{mean_sample / 1024:.0f} KiB through the ordered window: ray {t_task:.2f} ms, local pool {t_pool:.2f} ms")
    store = best["ray"][2]
    print(f"  peak object store during the ray run: {_mib(store.peak, store.state)}, driver memory store "
          f"{store.peak_driver / 2**20:.2f} MiB ({store.samples} samples; mean sample {mean_sample / 1024:.0f} KiB, "
          f"under Ray's 100 KiB inline limit)")
    rep = best["ray"][1]
    # the single driver's share per video: writer and commits, plus its CPU per Ray task
    driver_s = (rep.seconds.get("write", 0) + rep.seconds.get("commit", 0)) / n + cpu_task / 1000
    worker_s = sum(v for k, v in rep.seconds.items() if k.startswith("worker_")) / n
    print(f"  driver (writer + commits + {cpu_task:.2f} ms CPU per Ray task) per video: {driver_s * 1000:.2f} ms; "
          f"worker wall per video: {worker_s:.3f} s")
    per_core = vps["ray"] / args.workers
    print(f"\non paper, from {per_core:.2f} videos/s per core (this machine's ray run) and the driver's "
          f"{driver_s * 1000:.2f} ms per video:")
    print("\n".join(paper_table(per_core, driver_s)))


if __name__ == "__main__":
    sys.exit(main())
