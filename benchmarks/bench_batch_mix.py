"""Class mix of training micro batches on a folder-sorted corpus, by DataConfig.interleave_shards.

A corpus whose shards each hold neighbouring files of one class (videos sorted by folder = class, as
vtt-prep writes them) is the worst case for a streaming reader: with one shard per stream a micro batch
comes from one shard's shuffle-buffer window. Prints, per interleave value, the mean number of distinct
classes per micro batch over one epoch of every rank, the read time of that epoch (tar headers + the
.json/.txt members; frames are not decoded) and the time of the first batch after a mid-epoch resume.

    python benchmarks/bench_batch_mix.py [--classes 16 --shards-per-class 4 --per-shard 256 --buffer 64
                                          --micro 8 --world 2 --workers 0 --interleave 1,2,4,8]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import webdataset as wds

from vtt.shards.format import sha256_file, shard_name
from vtt.shards.index import ShardEntry, ShardIndex, write_index
from vtt.trainer.data.loader import DataConfig, build_loader


def sorted_corpus(folder: Path, classes: int, shards_per_class: int, per_shard: int) -> Path:
    """Shards in the vtt format with a one-byte frame each: class c fills shards c*spc .. (c+1)*spc-1."""
    entries, n = [], 0
    for s in range(classes * shards_per_class):
        path = folder / shard_name(s)
        with wds.TarWriter(str(path), mtime=0, encoder=False) as w:
            for _ in range(per_shard):
                key = f"c{s // shards_per_class:03d}_{n:07d}"
                w.write({"__key__": key, "json": json.dumps({"cls": s // shards_per_class}).encode(),
                         "txt": key.encode(), "0000.jpg": b"\xff"})
                n += 1
        entries.append(ShardEntry(path.name, per_shard, path.stat().st_size, sha256_file(path)))
    write_index(folder, ShardIndex(tuple(entries), {}))
    return folder


def classes_of(samples: list[dict]) -> list[int]:
    return [s["meta"]["cls"] for s in samples]


def mix(folder: Path, interleave: int, args) -> dict:
    cfg = DataConfig(str(folder), shuffle_buffer=args.buffer, interleave_shards=interleave,
                     num_workers=args.workers, decode_frames=False, seed=1)
    distinct, t0 = [], time.perf_counter()
    for rank in range(args.world):
        loader = build_loader(cfg, classes_of, args.micro, rank, args.world)
        it = iter(loader)
        distinct += [len(set(next(it))) for _ in range(len(loader))]
        if rank == 0:
            n = len(loader)
    read_s = time.perf_counter() - t0
    loader = build_loader(cfg, classes_of, args.micro, 0, args.world)
    it = iter(loader)
    for _ in range(n // 2):
        next(it)
    t1 = time.perf_counter()
    next(iter(build_loader(cfg, classes_of, args.micro, 0, args.world, start=loader.state())))
    return {"interleave": interleave, "distinct_per_batch": round(sum(distinct) / len(distinct), 2),
            "epoch_read_s": round(read_s, 2), "resume_first_batch_s": round(time.perf_counter() - t1, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--shards-per-class", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--buffer", type=int, default=64)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--interleave", default="1,2,4,8")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = sorted_corpus(Path(tmp), args.classes, args.shards_per_class, args.per_shard)
        print(json.dumps({"classes": args.classes, "samples": args.classes * args.shards_per_class * args.per_shard,
                          "per_shard": args.per_shard, "buffer": args.buffer, "micro": args.micro}))
        for k in (int(x) for x in args.interleave.split(",")):
            print(json.dumps(mix(folder, k, args)))


if __name__ == "__main__":
    main()
