"""Real tokens per micro batch with and without `data.packing` and `data.group_by_length`, on a corpus of mixed
lengths.

Writes vtt shards of conversation samples with 2-32 frames and 1-6 question/answer exchanges (lengths drawn from
a seeded RNG; each also has a `source` of 3-60 and a `target` of 2-40 words for seq2seq), reads one epoch through
the real loader and each tiny preset's collate, and prints per model and mode the fraction of a batch's tokens
that are real. A sample's real tokens are what it makes alone (collated on its own: its own frames, no padding),
so padding counts as waste whether it is pad tokens or the video tokens of frames repeated to the batch's longest
clip (LLaVA's unpacked batches). seq2seq counts source and target tokens (both are padded per batch).
Modes: plain (padded to the batch's longest), grouped (`data.group_by_length`, windows of `--group-window` micro
batches sorted by the adapter's sample_length), packed (decoder models only).

    python benchmarks/bench_packing.py [--samples 96 --micro 8 --models llava,qwen2_5_vl,seq2seq --time --json OUT]

`--time` also times forward + backward of each tiny model over the epoch's batches, packed (with the attention a
packed run picks: vtt's per-sample sdpa here, flash-attention varlen on CUDA where installed) and not (sdpa).
`--packed-attention sdpa` times transformers' block-diagonal sdpa mask instead (dense: O(row^2)).

Bar (issue 21): packed >= 95% real tokens.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from vtt.shards.format import frame_field, make_key, sha256_file, shard_name
from vtt.shards.index import ShardEntry, ShardIndex, write_index

WORDS = ("red blue green square circle moves left right fast slowly the a small large ball turns stops "
         "bright dark spinning falls rises behind front").split()


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def mixed_corpus(folder: Path, n: int, seed: int = 0, frames=(2, 32), turns=(1, 6), size: int = 16,
                 per_shard: int = 32) -> dict:
    """Shards of n conversation samples, frames and exchanges uniform in the given ranges; returns their stats."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    trng = random.Random(seed + 1000)  # seq2seq's fields: their own draws, so the conversations stay as they were
    entries, counts = [], {"frames": [], "turns": []}
    for s in range(0, n, per_shard):
        path = folder / shard_name(s // per_shard)
        with wds.TarWriter(str(path), mtime=0, encoder=False) as w:
            for i in range(s, min(s + per_shard, n)):
                t, k = rng.randint(*frames), rng.randint(*turns)
                conv = []
                for j in range(k):
                    q = ("<video>\n" if j == 0 else "") + _text(rng, 3, 12) + "?"
                    conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _text(rng, 2, 24)}]
                vid = f"clip-{i:05d}"
                meta = {"video_id": vid, "description": _text(rng, 4, 10), "conversations": conv,
                        "source": _text(trng, 3, 60), "target": _text(trng, 2, 40),
                        "vtt": {"source": f"{vid}.mp4", "timestamps": [0.25 * x for x in range(t)]}}
                sample = {"__key__": make_key(vid), "json": json.dumps(meta).encode(), "txt": b"-"}
                for x in range(t):
                    sample[frame_field(x, "jpg")] = _jpeg(nrng, size)
                w.write(sample)
                counts["frames"].append(t)
                counts["turns"].append(k)
        entries.append(ShardEntry(path.name, min(per_shard, n - s), path.stat().st_size, sha256_file(path)))
    write_index(folder, ShardIndex(tuple(entries), {"num_frames": frames[1], "size": [size, size]}))
    return counts


def tokens(batch: dict) -> int:
    """Token slots of a batch: its input ids, and for an encoder-decoder its target too."""
    return int(batch["input_ids"].numel()) + (int(batch["labels"].numel()) if "decoder_input_ids" in batch else 0)


class Measure:
    """A collate that also counts each sample's own tokens (the sample collated alone) and the batch's."""

    def __init__(self, adapter, keep: bool = False):
        self.adapter, self.real, self.total, self.batches, self.widest = adapter, 0, 0, 0, 0
        self.per_batch: list[int] = []  # token slots of each batch: the step's cost, its peak memory
        self.sizes: list[int] = []  # samples per batch
        self.kept = [] if keep else None

    def __call__(self, samples: list[dict], packed: bool = False) -> dict:
        batch = self.adapter.collate(samples, packed=packed) if packed else self.adapter.collate(samples)
        self.real += sum(tokens(self.adapter.collate([s])) for s in samples)
        self.total += tokens(batch)
        self.per_batch.append(tokens(batch))
        self.sizes.append(len(samples))
        self.batches += 1
        self.widest = max(self.widest, int(batch["input_ids"].shape[-1]))
        if self.kept is not None:
            self.kept.append(batch)
        return batch


def step_seconds(adapter, batches: list[dict], seed: int = 0) -> float:
    """Forward + backward of the summed token loss over the batches (fresh tiny model, fp32, this CPU/GPU)."""
    import time

    import torch

    from vtt.trainer.run.loss import forward_loss
    torch.manual_seed(seed)
    model = adapter.load_model().train()
    forward_loss(model, batches[0], adapter.causal).backward()  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        forward_loss(model, b, adapter.causal).backward()
    return time.perf_counter() - t0


def measure(model_path: str, kind: str, shards: Path, micro: int, packed: bool, timed: bool = False,
            attention: str | None = None, grouped: bool = False, window: int = 32, balanced: bool = False) -> dict:
    """One epoch of rank 0 of 1 through the loader: real / total tokens (+ the model's time on its batches)."""
    from vtt.trainer.models.registry import get_adapter
    from vtt.trainer.models.model_config import ModelConfig
    from vtt.trainer.data.loader import DataConfig, build_loader
    from vtt.trainer.inputs.packing import attention_for_packing
    texts = {"source_template": "{source}", "target_template": "{target}"} if kind == "seq2seq" else {}
    adapter = get_adapter(ModelConfig(kind=kind, model_path=model_path, **texts,
                                      attn_implementation=attention_for_packing(attention) if packed else None))
    m = Measure(adapter, keep=timed)
    data = DataConfig(str(shards), packing=packed, shuffle_buffer=64, group_by_length=grouped, group_window=window,
                      balance_tokens=balanced, decode_frames=adapter.needs_frames)
    loader = build_loader(data, m, micro, length_fn=adapter.sample_length)
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    out = {"packed": packed, "grouped": grouped, "balanced": balanced, "window": window if grouped else None,
           "batches": m.batches, "real_tokens": m.real, "batch_tokens": m.total,
           "real_fraction": m.real / max(m.total, 1), "widest_row": m.widest, "largest_batch": max(m.per_batch),
           "largest_over_mean": max(m.per_batch) * len(m.per_batch) / max(sum(m.per_batch), 1),
           "samples_per_batch": [min(m.sizes), max(m.sizes)]}
    if timed:
        out["fwd_bwd_s"] = step_seconds(adapter, m.kept)
    return out


# mode: (data.packing, data.group_by_length, data.balance_tokens)
MODES = {"plain": (False, False, False), "grouped": (False, True, False), "balanced": (False, False, True),
         "packed": (True, False, False), "packed_balanced": (True, False, True)}


def run(samples: int, micro: int, models: list[str], seed: int, work: Path, timed: bool = False,
        attention: str | None = None, modes: tuple[str, ...] = ("plain", "packed"), window: int = 32) -> list[dict]:
    from vtt.trainer.models.presets import build_tiny
    shards = work / "shards"
    stats = mixed_corpus(shards, samples, seed)
    out = []
    for name in models:
        kind, family = {"llava": ("llava", None), "seq2seq": ("seq2seq", None)}.get(name, ("qwen_vl", name))
        path = str(build_tiny(kind, work / name, family=family))
        for mode in modes:
            packed, grouped, balanced = MODES[mode]
            if packed and kind == "seq2seq":
                continue  # packing is for decoder models
            r = measure(path, kind, shards, micro, packed, timed, attention, grouped, window, balanced)
            out.append({"model": name, "mode": mode, "micro": micro, "samples": samples,
                        "frames": [min(stats["frames"]), max(stats["frames"])],
                        "turns": [min(stats["turns"]), max(stats["turns"])], **r})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--models", default="llava,qwen2_5_vl", help="llava, qwen2_vl, qwen2_5_vl, qwen3_vl, seq2seq")
    ap.add_argument("--modes", default="plain,packed", help="plain, grouped (data.group_by_length), "
                    "balanced (data.balance_tokens), packed, packed_balanced")
    ap.add_argument("--group-window", type=int, default=32, help="micro batches per length-sorted window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", action="store_true", help="also time forward + backward of the tiny model over "
                    "the epoch's batches, packed and not (attention: the model's default, sdpa)")
    ap.add_argument("--packed-attention", help="attn_implementation of the packed runs [default: what "
                    "--packing picks]")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(a.samples, a.micro, a.models.split(","), a.seed, Path(tmp), a.time, a.packed_attention,
                   tuple(a.modes.split(",")), a.group_window)
    print(f"{'model':<12} {'mode':<15} {'micro':>5} {'batches':>7} {'samples':>7} {'real tokens':>11} "
          f"{'batch tokens':>12} {'real':>6} {'largest':>7} {'/mean':>5}" + (f" {'fwd+bwd s':>9}" if a.time else ""))
    for r in rows:
        lo, hi = r["samples_per_batch"]
        print(f"{r['model']:<12} {r['mode']:<15} {r['micro']:>5} {r['batches']:>7} {f'{lo}-{hi}':>7} "
              f"{r['real_tokens']:>11} {r['batch_tokens']:>12} {r['real_fraction']:>6.1%} {r['largest_batch']:>7} "
              f"{r['largest_over_mean']:>5.2f}" + (f" {r['fwd_bwd_s']:>9.2f}" if a.time else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
