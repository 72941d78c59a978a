"""`vtt-eval MODEL_OR_RUN --shards DIR --out DIR`: score a model by its answers, not its loss.

Every assistant turn of every conversation sample is answered with its history from the data (teacher forced),
and a caption sample's caption is generated, greedily, in batches of `--batch-size` answers (memory stays bounded
whatever the shards hold). Writes `predictions.jsonl` (one line per answer: key, turn, question, reference,
prediction) and `metrics.json`: n, exact_match (after whitespace and case normalisation), corpus BLEU and chrF
(sacrebleu), overall and per value of each `--group-by` metadata field.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import click
import torch
from tqdm import tqdm
from vtt.shards.conversation import SampleError
from vtt.shards.format import ShardFormatError
from vtt.shards.index import read_index
from vtt.trainer.data.loader import CorruptSampleError, DataConfig, build_loader
from vtt.trainer.models.adapter import ModelAdapter
from vtt.trainer.tools.caption import load_info, model_config, model_dir

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class EvalConfig:
    model: str                         # RUN or RUN/final (an export of vtt-train)
    shards: str
    out: str
    batch_size: int = 8                # answers generated together
    group_by: tuple[str, ...] = ()     # metadata fields to break the metrics down by
    max_new_tokens: int = 64
    limit: int | None = None           # samples (None: all)
    kind: str | None = None            # only for exports without vtt_model.json
    device: str | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("batch_size, max_new_tokens and limit must be >= 1")


def preflight(cfg: EvalConfig) -> None:
    """EvalConfig's checks that need the file system (as trainer.config.preflight for TrainConfig), before the
    model loads: an exported model, a shards folder with a readable index.json, an OUT that can
    be made (one line each, naming the path)."""
    model_dir(cfg.model)
    read_index(cfg.shards)
    parent = Path(cfg.out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{cfg.out}: cannot make the output folder there, {parent} is a file")


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def scores(preds: list[str], refs: list[str]) -> dict:
    # heavy: sacrebleu; only scoring needs it
    import sacrebleu
    if not preds:
        return {"n": 0, "exact_match": None, "bleu": None, "chrf": None}
    exact = sum(normalise(p) == normalise(r) for p, r in zip(preds, refs)) / len(preds)
    return {"n": len(preds), "exact_match": exact, "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
            "chrf": sacrebleu.corpus_chrf(preds, [refs]).score}


def _samples(cfg: EvalConfig, decode_frames: bool, data=None) -> Iterator[dict]:
    """The eval samples once each, in index order (the eval split of the loader: no shuffle): cfg.shards, or
    the eval split of a training DataConfig (`data`: its eval_shards or eval_fraction)."""

    if data is None:
        data = DataConfig(cfg.shards, eval_shards=cfg.shards, decode_frames=decode_frames)
    data = dataclasses.replace(data, decode_frames=decode_frames, num_workers=0)
    loader = build_loader(data, list, micro_batch=1, split="eval")
    for i, (sample,) in enumerate(loader):
        if cfg.limit is not None and i >= cfg.limit:
            return
        yield sample


def _batches(adapter: ModelAdapter, samples: Iterator[dict], size: int) -> Iterator[list[tuple[dict, dict]]]:
    batch = []
    for s in samples:
        for item in adapter.eval_items(s):
            batch.append((s, item))
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def evaluate_model(adapter: ModelAdapter, net, cfg: EvalConfig, data=None, write: bool = True,
                   progress: bool = True) -> dict:
    """Answer, write predictions.jsonl as it goes, return (and write) metrics.json. Cost: one generate call per
    `batch_size` answers; memory: one batch of samples plus the answer strings. `data`: a training DataConfig
    whose eval split to answer instead of cfg.shards; write=False: compute only (ZeRO-3's other ranks)."""

    out = Path(cfg.out)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / PREDICTIONS_FILE if write else os.devnull, "w") as f, \
            tqdm(desc="vtt-eval", unit="answer", disable=not progress) as bar:
        for batch in _batches(adapter, _samples(cfg, adapter.needs_frames, data), cfg.batch_size):
            for (s, item), pred in zip(batch, adapter.generate_items(net, batch, cfg.max_new_tokens)):
                row = {"key": s["key"], "turn": item["turn"], "question": item["question"],
                       "reference": item["reference"], "prediction": pred}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows.append((row, {g: (s.get("meta") or {}).get(g) for g in cfg.group_by}))
            bar.update(len(batch))
    metrics = scores([r["prediction"] for r, _ in rows], [r["reference"] for r, _ in rows])
    for g in cfg.group_by:
        groups = defaultdict(list)
        for r, values in rows:
            groups[str(values[g])].append(r)
        metrics[f"by_{g}"] = {v: scores([r["prediction"] for r in rs], [r["reference"] for r in rs])
                              for v, rs in sorted(groups.items())}
    if write:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def run_eval(cfg: EvalConfig) -> dict:
    """Load the exported model the way vtt-caption does and evaluate it on cfg.shards."""

    # heavy: transformers (model registry); -h stays light
    from vtt.trainer.models.registry import get_adapter
    mdir = model_dir(cfg.model)
    adapter = get_adapter(model_config(mdir, load_info(mdir, cfg.kind), cfg.kind))
    net = adapter.load_model().to(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return evaluate_model(adapter, net, cfg)


@click.command(help=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1] + "\n\nExit status: 0 done, "
               "1 a vtt error (one line on stderr; OUT is removed if this run made it), 2 bad flags or paths "
               "(MODEL, --shards, --out), nothing written.",
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--shards", required=True, help="Shards folder to answer (its index order).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for predictions and metrics.")
@click.option("--batch-size", default=8, show_default=True, help="Answers generated together.")
@click.option("--group-by", multiple=True, help="Metadata field to break the metrics down by (repeatable).")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--limit", type=int, help="Only the first N samples.")
@click.option("--model", "kind", type=click.Choice(["llava", "seq2seq", "qwen_vl"]), help="Only for exports without "
              "vtt_model.json.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: cuda if available].")
@click.version_option(package_name="vtt")
def main(model, shards, out, batch_size, group_by, max_new_tokens, limit, kind, device):
    try:
        cfg = EvalConfig(model, shards, out, batch_size, tuple(group_by), max_new_tokens, limit, kind, device)
        preflight(cfg)
    except (ValueError, click.UsageError) as e:  # ShardFormatError/StorageError are ValueErrors
        click.echo(f"vtt-eval: error: {e.message if isinstance(e, click.UsageError) else e}", err=True)
        sys.exit(2)
    created = not Path(out).exists()
    try:
        m = run_eval(cfg)
    except known_errors() as e:
        click.echo(f"vtt-eval: error: {e}", err=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        sys.exit(1)
    click.echo(f"vtt-eval: {m['n']} answers, exact match {m['exact_match']:.3f}, BLEU {m['bleu']:.1f}, "
               f"chrF {m['chrf']:.1f} -> {Path(out) / METRICS_FILE}" if m["n"] else "vtt-eval: nothing to answer")


def known_errors() -> tuple[type[BaseException], ...]:
    return ShardFormatError, SampleError, CorruptSampleError, click.UsageError, OSError


if __name__ == "__main__":
    main()
