"""vtt-prep ledger benchmark: what a shard commit, a no-op plan and opening the ledger cost as it grows.

    .venv/bin/python benchmarks/bench_ledger.py [--sizes 10000,100000,1000000] [--commit-records 1000]
                                                [--legacy-max 100000] [--dir DIR]

Per size N, a synthetic ledger of N ok videos in shards of 10 000 (the 1M ledger has 100 shards, as a
1M-video run would) is built directly through vtt.shards.ledger (no ffmpeg) and stored as checkpoint 0
in a temp shards folder. A fresh process then measures:
  open      read_ledger (newest checkpoint + commits after it)
  commit    one shard commit as vtt-prep does it: a new shard of --commit-records videos put into
            the ledger, write_ledger (the create-if-absent commit file, fsynced) + index.json (median of 7)
  no-op     make_plan over N unchanged videos (stat fast path; the N videos point at 1 000 real
  plan      files, so the stats hit the page cache like a rerun's would) and the run's final
            commit, which finds nothing changed and writes nothing
  checkpoint  writing the whole state once (done when the log holds N/2 changed records: amortised
            per changed record, not per commit)
  rss       peak resident memory of that process (ru_maxrss)
  legacy    for N <= --legacy-max: the single ledger.json rewrite every commit did before the log
The last line is `commit_ratio_1M_vs_10k=<x>`: commit time at the largest size over the smallest.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD = 10_000
REPEATS = 7
FILES = 1_000


def _fingerprint(stat, i: int):
    """The stat of one of the real files, with a hash of its own (real hashes do not compress)."""
    return type(stat)(stat.size, stat.mtime_ns, hashlib.sha256(str(i).encode()).hexdigest())


def _build(folder: Path, n: int) -> dict:
    """N records through the ledger API, written as checkpoint 0; the 1 000 real files they point at."""
    from vtt.shards.index import ShardEntry
    from vtt.shards.ledger import Fingerprint, Ledger, VideoRecord, checkpoint_bytes, checkpoint_name
    from vtt.shards.store import LocalStore
    files = folder / "videos"
    files.mkdir(parents=True)
    stats = []
    for i in range(FILES):
        p = files / f"f{i:04d}.mp4"
        p.write_bytes(b"x" * (1000 + i))
        st = p.stat()
        stats.append(Fingerprint(st.st_size, st.st_mtime_ns, f"{i:064x}"))
    ledger = Ledger(settings={"num_frames": 8, "size": "224x224"}, settings_hash="h" * 64)
    records, shards = {}, {}
    for i in range(n):
        url = f"shard-{i // SHARD:06d}.tar"
        src = f"d{i % 100:02d}/v{i:07d}.mp4"
        records[src] = VideoRecord(source=src, status="ok", video_id=f"v{i:07d}", key=f"v{i:07d}",
                                   video=_fingerprint(stats[i % FILES], i), sidecar=None, settings_hash="h" * 64,
                                   ffmpeg_version="ffmpeg version 6.1.1", shard=url, nframes=8, nbytes=120_000)
    for i in range(0, n, SHARD):
        url = f"shard-{i // SHARD:06d}.tar"
        shards[url] = ShardEntry(url, min(SHARD, n - i), 120_000 * min(SHARD, n - i), "0" * 64)
    ledger = Ledger(settings=ledger.settings, settings_hash=ledger.settings_hash, records=records, shards=shards)
    ledger.version = 0
    t0 = time.perf_counter()
    data = checkpoint_bytes(ledger)
    LocalStore(folder).put_if_absent(checkpoint_name(0), data)
    return {"checkpoint_s": time.perf_counter() - t0, "checkpoint_mb": len(data) / 1e6}


def _measure(folder: Path, n: int, commit_records: int, legacy: bool) -> dict:
    from vtt.pipeline.discover import Video
    from vtt.pipeline.commit import sync_index
    from vtt.pipeline.rerun_plan import make_plan
    from vtt.shards.format import atomic_write_bytes
    from vtt.shards.index import ShardEntry
    from vtt.shards.ledger import Fingerprint, VideoRecord, commit_name, ledger_bytes, read_ledger, write_ledger
    from vtt.shards.store import LEDGER_DIR
    out = {}
    t0 = time.perf_counter()
    ledger = read_ledger(folder)
    out["open_s"] = time.perf_counter() - t0
    gc.freeze()  # as run_extract does after reading the ledger
    out["rss_open_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert len(ledger.records) == n
    videos = [Video(source=r.source, path=folder / "videos" / f"f{int(r.source[-11:-4]) % FILES:04d}.mp4",
                    sidecar_path=None, video_id=r.video_id, key=r.key) for r in ledger.records.values()]
    t0 = time.perf_counter()
    plan, _ = make_plan(videos, ledger, ledger.settings_hash, rebuild=False)
    wrote = write_ledger(folder, ledger)
    out["noop_plan_s"] = time.perf_counter() - t0
    assert len(plan.unchanged) == n and not wrote
    gc.freeze()  # as run_extract does after planning
    times, cpu = [], []
    for c in range(REPEATS):
        ledger.log_records = 0  # time the commit itself; the checkpoint it triggers now and then is timed apart
        number = ledger.next_shard_number()
        url = f"shard-{number:06d}.tar"
        fp = Fingerprint(1, 1, "f" * 64)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(commit_records):
            src = f"new/{c}/{i:07d}.mp4"
            ledger.records[src] = VideoRecord(source=src, status="ok", video_id=src, key=f"n{c}_{i}", video=fp,
                                              settings_hash=ledger.settings_hash, ffmpeg_version="ffmpeg",
                                              shard=url, nframes=8, nbytes=1)
        ledger.shards[url] = ShardEntry(url, commit_records, commit_records, "0" * 64)
        assert write_ledger(folder, ledger)
        sync_index(folder, ledger)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out["commit_s"], out["commit_cpu_s"] = statistics.median(times), statistics.median(cpu)
    out["commit_kb"] = (folder / LEDGER_DIR / commit_name(ledger.version)).stat().st_size / 1e3
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the legacy write's
    if legacy:
        t0 = time.perf_counter()
        atomic_write_bytes(folder / "legacy-ledger.json", ledger_bytes(ledger))
        out["legacy_commit_s"] = time.perf_counter() - t0
    return out


def _child(args) -> None:
    folder = Path(args.child_dir)
    if args.phase == "build":
        result = _build(folder, args.n)
    else:
        result = _measure(folder, args.n, args.commit_records, args.n <= args.legacy_max)
    print(json.dumps(result))


def _run_child(phase: str, folder: Path, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--child-dir", str(folder), "--n", str(n),
           "--commit-records", str(args.commit_records), "--legacy-max", str(args.legacy_max)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if res.returncode != 0:
        sys.exit(f"bench_ledger {phase} {n}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--commit-records", type=int, default=1000)
    ap.add_argument("--legacy-max", type=int, default=100_000)
    ap.add_argument("--dir", default=None, help="where the synthetic shards folders go (default: a temp dir)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--child-dir", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return _child(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-ledger-", dir=args.dir))
    rows = []
    try:
        for n in sizes:
            folder = root / f"n{n}"
            t0 = time.perf_counter()
            row = {"n": n, **_run_child("build", folder, n, args), **_run_child("measure", folder, n, args)}
            row["total_s"] = time.perf_counter() - t0
            rows.append(row)
            shutil.rmtree(folder)
            print(f"# {n}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _table(rows, args.commit_records)


def _table(rows: list[dict], commit_records: int) -> None:
    base = rows[0]
    print(f"\n| videos | shard commit ({commit_records} videos): wall | x vs {base['n']:,} | CPU | commit file | "
          f"legacy ledger.json write | no-op plan | open | checkpoint write (size) | peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        legacy = f"{r['legacy_commit_s']:.2f} s" if "legacy_commit_s" in r else "(skipped)"
        print(f"| {r['n']:,} | {r['commit_s'] * 1e3:.1f} ms | {r['commit_s'] / base['commit_s']:.2f} | "
              f"{r['commit_cpu_s'] * 1e3:.1f} ms | {r['commit_kb']:.0f} kB | {legacy} | "
              f"{r['noop_plan_s']:.2f} s | {r['open_s']:.2f} s | {r['checkpoint_s']:.2f} s "
              f"({r['checkpoint_mb']:.1f} MB) | {r['rss_mb']:.0f} MB |")
    print(f"commit_ratio_1M_vs_10k={rows[-1]['commit_s'] / base['commit_s']:.2f}")


if __name__ == "__main__":
    main()
