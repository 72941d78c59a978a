"""vtt-prep extract into S3 vs into a local folder (and from S3 vs from local), the same clips, in one run.

S3 is moto's standalone server on localhost (a real S3 HTTP endpoint reached through s3fs with
AWS_ENDPOINT_URL, as tests/test_prep_s3_extract_out.py does). Every run extracts the same clips with the
same settings into an empty folder; the order of the variants rotates and the best of --repeats counts, so a
busy machine hurts all alike. Then a no-op rerun of each (nothing changed: the plan, the listing, no ffmpeg).
Prints a table with the ratio of each variant to local -> local.

    python benchmarks/bench_remote_extract.py [--clips 48] [--seconds 4] [--workers 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_helpers import MotoServer, restore_env, s3, set_env  # noqa: E402

from vtt.pipeline.config import PrepConfig  # noqa: E402
from vtt.pipeline.run import run_extract  # noqa: E402


def make_clips(folder: Path, n: int, seconds: float) -> Path:
    """n testsrc2 clips (640x360, 25 fps, a keyframe every second), each with its sidecar."""
    import json

    from clips import make_clip
    folder.mkdir(parents=True)
    for i in range(n):
        path = make_clip(folder / f"c{i:04d}.mp4", seconds=seconds, fps=25, size=(640, 360), gop=25,
                         pattern="testsrc2")
        path.with_suffix(".json").write_text(json.dumps(
            {"video_id": f"c{i:04d}", "description": f"clip {i}", "duration": seconds, "frames": int(25 * seconds)}))
    return folder


def upload_clips(local: Path, url: str) -> str:
    fs = s3()
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"{url}/{p.name}")
    return url


def timed_run(data, out, workers: int) -> tuple[float, int]:
    cfg = PrepConfig(data, out, workers=workers, quiet=True, num_frames=8, size=(336, 336),
                     shard_size="64MB")
    t0 = time.perf_counter()
    report = run_extract(cfg)
    assert report.exit_code == 0, report.failed[:3]
    return time.perf_counter() - t0, report.videos_ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    server = MotoServer().start()
    old = set_env(server)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            local_data = make_clips(root / "data", args.clips, args.seconds)
            s3().mkdir("bench")
            s3_data = upload_clips(local_data, "s3://bench/videos")
            variants = {"local -> local": (local_data, lambda r: root / f"out{r}"),
                        "local -> s3": (local_data, lambda r: f"s3://bench/out{r}/shards"),
                        "s3 -> local": (s3_data, lambda r: root / f"in{r}"),
                        "s3 -> s3": (s3_data, lambda r: f"s3://bench/both{r}/shards")}
            best, noop, outs = {}, {}, {}
            names = list(variants)
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                    data, out = variants[name]
                    wall, n = timed_run(data, out(r), args.workers)
                    assert n == args.clips
                    best[name] = min(best.get(name, wall), wall)
                    outs[name] = out(r)
            for name, (data, _) in variants.items():
                noop[name] = timed_run(data, outs[name], args.workers)[0]
            print_table(best, noop, args)
    finally:
        restore_env(old)
        server.stop()


def print_table(best: dict, noop: dict, args) -> None:
    base = best["local -> local"]
    print(f"\n{args.clips} clips of {args.seconds:g} s (640x360, 25 fps) -> 8 frames at 336x336 JPEG, "
          f"{args.workers} workers, best of {args.repeats}\n")
    print("| data -> shards | extract wall (s) | videos/s | x vs local -> local (speed) | no-op rerun (s) |")
    print("|---|---|---|---|---|")
    for name, wall in best.items():
        print(f"| {name} | {wall:.2f} | {args.clips / wall:.2f} | {base / wall:.2f} | {noop[name]:.2f} |")
    print(f"\nremote_vs_local_extract_ratio={base / best['local -> s3']:.2f}")


if __name__ == "__main__":
    main()
