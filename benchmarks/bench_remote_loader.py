"""The training loader's samples/s from a local shards folder and from the same shards on S3, in one run.

S3 is moto's standalone server on localhost (a real S3 HTTP endpoint, reached through s3fs with
AWS_ENDPOINT_URL, as tests/test_data_remote.py does). Both read the same tars with the same settings
(frames decoded, DataLoader workers, shuffle buffer, interleaved shards); the order alternates and the
best of --repeats counts, so a busy machine hurts both alike. Prints a table with the ratio remote/local.

    python benchmarks/bench_remote_loader.py [--samples 480] [--workers 2] [--frames 8] [--size 224]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_helpers import MotoServer, restore_env, set_env, upload  # noqa: E402

from vtt.shards.format import frame_field, make_key, sha256_file, shard_name  # noqa: E402
from vtt.shards.index import ShardEntry, ShardIndex, write_index  # noqa: E402
from vtt.trainer.data.loader import DataConfig, build_loader, unpin  # noqa: E402


def textured_jpeg(rng, size: int) -> bytes:
    """A frame with texture (JPEG size like a real 336px frame at q90, ~20-30 KB), not a flat colour."""
    import io

    import numpy as np
    from PIL import Image
    base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((size, size), Image.BILINEAR)).astype(np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(folder: Path, n: int, per_shard: int, frames: int, size: int) -> Path:
    import json

    import numpy as np
    import webdataset as wds
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pool = [textured_jpeg(rng, size) for _ in range(32)]  # encoding every frame would dominate the set-up
    entries = []
    for si in range(0, n, per_shard):
        path = folder / shard_name(si // per_shard)
        with wds.TarWriter(str(path), mtime=0, encoder=False) as w:
            for i in range(si, min(si + per_shard, n)):
                vid = f"clip-{i:05d}"
                sample = {"__key__": make_key(vid), "txt": b"a clip",
                          "json": json.dumps({"video_id": vid, "description": "a clip"}).encode()}
                for t in range(frames):
                    sample[frame_field(t, "jpg")] = pool[(i * frames + t) % len(pool)]
                w.write(sample)
        entries.append(ShardEntry(path.name, min(per_shard, n - si), path.stat().st_size, sha256_file(path)))
    write_index(folder, ShardIndex(tuple(entries), {}))
    return folder


def samples_per_s(folder: str, args) -> float:
    unpin()
    cfg = DataConfig(folder, num_workers=args.workers, shuffle_buffer=64, interleave_shards=4)
    loader = build_loader(cfg, list, micro_batch=args.micro_batch)
    n = len(loader)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    got = sum(len(next(it)) for _ in range(n - 1))
    return got / (time.perf_counter() - t0)


def resume_s(folder: str, args) -> float:
    """Seconds to the first batch of a loader resumed at mid-epoch (passes over half the epoch by headers)."""
    unpin()
    cfg = DataConfig(folder, num_workers=0, shuffle_buffer=64, interleave_shards=4)
    loader = build_loader(cfg, list, micro_batch=args.micro_batch)
    it = iter(loader)
    for _ in range(len(loader) // 2):
        next(it)
    state = loader.state()
    del it
    unpin()
    t0 = time.perf_counter()
    next(iter(build_loader(cfg, list, micro_batch=args.micro_batch, start=state)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=480)
    ap.add_argument("--per-shard", type=int, default=48)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    server = MotoServer().start()
    old = set_env(server)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = make_shards(Path(tmp) / "shards", args.samples, args.per_shard, args.frames, args.size)
            mb = sum(p.stat().st_size for p in local.glob("*.tar")) / 2**20
            url = upload(local, "s3://bench/shards")
            best = {"local": 0.0, "s3 (moto)": 0.0}
            server_cpu, remote_s, resume = 0.0, 0.0, {}
            for _ in range(args.repeats):
                for name, folder in (("local", str(local)), ("s3 (moto)", url)):
                    cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
                    best[name] = max(best[name], samples_per_s(folder, args))
                    resume[name] = min(resume.get(name, 1e9), resume_s(folder, args))
                    if name != "local":
                        server_cpu += cpu_seconds(server.proc.pid) - cpu0
                        remote_s += time.perf_counter() - t0
    finally:
        restore_env(old)
        server.stop()
    print(f"{args.samples} samples ({args.frames} textured JPEG frames of {args.size}x{args.size}, {mb:.1f} MiB in "
          f"{-(-args.samples // args.per_shard)} shards), {args.workers} workers, micro batch {args.micro_batch}, "
          f"best of {args.repeats}")
    print("| source | loader samples/s | first batch after a mid-epoch resume (s) |\n|---|---|---|")
    for name, v in best.items():
        print(f"| {name} | {v:.1f} | {resume[name]:.3f} |")
    print(f"| ratio remote/local | {best['s3 (moto)'] / best['local']:.2f} | |")
    print(f"the moto server used {server_cpu / remote_s:.2f} of this machine's {os.cpu_count()} CPU cores while "
          "serving the remote runs")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
