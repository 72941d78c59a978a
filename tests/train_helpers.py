"""Tiny real shards (WebDataset tars, JPEG frames, index.json) and a vtt-train runner for the trainer tests."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from vtt.shards.format import frame_field, make_key, sha256_file, shard_name
from vtt.shards.index import ShardEntry, ShardIndex, write_index

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")
MOTIONS = ("left", "right")
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def frame_jpeg(rgb, t: int, size: int) -> bytes:
    arr = np.zeros((size, size, 3), np.uint8)
    arr[...] = rgb
    x = (t * 3) % (size - 6)
    arr[size // 3: size // 3 + 6, x: x + 6] = 255  # a small white block that moves: frames differ
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_train_shards(folder, n: int = 24, per_shard: int = 8, frames: int = 4, size: int = 32,
                      start: int = 0) -> Path:
    """Shards in the vtt-prep format: {key}.json (sidecar + vtt block), {key}.txt, {key}.NNNN.jpg."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    names = list(COLOURS)
    for si in range(0, n, per_shard):
        path = folder / shard_name(si // per_shard)
        with wds.TarWriter(str(path), mtime=0, encoder=False) as w:
            for i in range(start + si, start + min(si + per_shard, n)):
                colour, shape, motion = names[i % 4], SHAPES[(i // 4) % 2], MOTIONS[(i // 8) % 2]
                desc = f"a {colour} {shape} moving {motion}"
                vid = f"clip-{i:04d}"
                meta = {"video_id": vid, "description": desc, "title": f"{colour} {shape}",
                        "vtt": {"source": f"{vid}.mp4", "timestamps": [0.1 * t for t in range(frames)]}}
                sample = {"__key__": make_key(vid), "json": json.dumps(meta).encode(), "txt": desc.encode()}
                for t in range(frames):
                    sample[frame_field(t, "jpg")] = frame_jpeg(COLOURS[colour], t, size)
                w.write(sample)
        entries.append(ShardEntry(path.name, min(per_shard, n - si), path.stat().st_size, sha256_file(path)))
    write_index(folder, ShardIndex(tuple(entries), {"num_frames": frames, "size": [size, size]}))
    return folder


def make_prep_shards(root, n_train: int = 24, n_heldout: int = 8) -> tuple[Path, Path, Path]:
    """Real vtt-prep output: its synthetic captioned clips (description + description_fr sidecars) through
    run_extract, 4 frames of 32x32, 8 samples a shard. Returns (train shards, heldout shards, heldout videos)."""
    from vtt.pipeline.config import PrepConfig
    from vtt.pipeline.run import run_extract
    from vtt.pipeline.sample_data import make_sample_data
    root = Path(root)
    make_sample_data(root / "data", n_train=n_train, n_heldout=n_heldout, seed=0)
    out = {}
    for split, name in (("train", "shards"), ("heldout", "eval")):
        cfg = PrepConfig(data_dir=root / "data" / split, out_dir=root / name, num_frames=4, size=(32, 32),
                         workers=2, quiet=True, shard_max_samples=8)
        report = run_extract(cfg)
        out[split] = root / name
        assert (root / name / "index.json").is_file(), report
    return out["train"], out["heldout"], root / "data" / "heldout"


def train_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def vtt_train(*args, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m vtt.trainer.cli ARGS` in a fresh process (DeepSpeed caches its process group per process)."""
    cmd = [PY, "-m", "vtt.trainer.cli", *map(str, args)]
    p = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of RUN/metrics.jsonl."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if "loss" in x], [x for x in lines if "eval_loss" in x]


def train_and_dump(argv: list[str], dump: str) -> None:
    """Run in a fresh process: parse vtt-train ARGV like the CLI, train, then save the live engine's logits on
    the first two samples of --eval-shards (index order) next to the batch, for the export round-trip test."""
    import torch

    from vtt.trainer import cli
    from vtt.trainer.run import loop
    from vtt.trainer.models.registry import get_adapter
    from vtt.trainer.config import load_config
    from vtt.trainer.data.loader import DataConfig, build_loader
    params = cli.main.make_context("vtt-train", list(argv)).params
    cfg = load_config(params["config_file"], cli.overrides_from_flags(params, params["sets"]))
    result = loop.train(cfg)
    adapter = get_adapter(cfg.model)
    eval_dir = cfg.data.eval_shards
    loader = build_loader(DataConfig(eval_dir, eval_shards=eval_dir, decode_frames=adapter.needs_frames), list,
                          micro_batch=2, split="eval")
    samples = next(iter(loader))
    batch = adapter.collate(samples)
    engine = result.engine
    model = engine.module
    model.eval()
    with torch.no_grad():
        logits = model(**loop.to_device(batch, "cpu", loop.engine_dtype(engine))).logits.float()
    torch.save({"batch": batch, "logits": logits, "keys": [s["key"] for s in samples]}, dump)
    cli.shutdown()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "train_and_dump":
    train_and_dump(sys.argv[3:], sys.argv[2])
