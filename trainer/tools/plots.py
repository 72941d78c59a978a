"""Pictures of a run: the loss curve (train + eval) from RUN/metrics.jsonl, and a contact sheet of
the frames a few shard samples carry, captioned with their text. Both go to W&B too when a run is
active in this process. Matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from vtt.shards.format import decode_frame, frame_fields, read_samples, split_member  # noqa: E402
from vtt.shards.index import read_index  # noqa: E402


def read_metrics(metrics_jsonl) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) as (step, loss) pairs; a torn last line (crash mid-write) is skipped."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is this a vtt-train run folder?)")
    train, evals = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                continue
            raise ValueError(f"{path}:{n}: not JSON: {e}") from e
        if "eval_loss" in row and _finite(row["eval_loss"]):
            evals.append((int(row["step"]), float(row["eval_loss"])))
        elif "loss" in row and _finite(row["loss"]):
            train.append((int(row["step"]), float(row["loss"])))
    return train, evals


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_loss(metrics_jsonl, png, title: str | None = None, wandb_key: str = "plots/loss_curve") -> Path:
    """Train loss per step and eval loss at its steps, one PNG; returns its path."""
    train, evals = read_metrics(metrics_jsonl)
    if not train and not evals:
        raise ValueError(f"{metrics_jsonl}: no loss or eval_loss values to plot")
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.5, color="tab:blue", label="train loss")
        if len(train) >= 10:
            ax.plot(*zip(*_smooth(train)), lw=2, color="tab:blue", label="train loss (smoothed)")
    if evals:
        ax.plot(*zip(*evals), "o-", lw=2, color="tab:orange", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    values = [v for _, v in train + evals]
    if min(values) > 0 and max(values) / min(values) > 20:  # losses falling by orders of magnitude
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title or Path(metrics_jsonl).parent.name)
    return _save(fig, png, wandb_key)


def _smooth(points: list[tuple[int, float]], window: int = 0) -> list[tuple[int, float]]:
    window = window or max(2, len(points) // 20)
    out = []
    for i in range(len(points)):
        chunk = points[max(0, i - window + 1):i + 1]
        out.append((points[i][0], sum(v for _, v in chunk) / len(chunk)))
    return out


def iter_shard_samples(shards_dir):
    """Samples of a shards folder in index order as {key, text, frames: [PIL.Image]} (no trainer deps)."""
    folder = Path(shards_dir)
    for entry in read_index(folder).shards:
        for key, members in read_samples(folder / entry.url):
            yield _sample(key, {parts[1]: data for name, data in members if (parts := split_member(name))})


def _sample(key: str, fields: dict[str, bytes]) -> dict:
    frames = [Image.fromarray(decode_frame(fields[f])) for f in frame_fields(fields)]  # the one decoder
    text = fields.get("txt", b"").decode("utf-8", errors="replace")
    return {"key": key, "text": text, "frames": frames}


def contact_sheet(shards_dir, png, n_samples: int = 6, max_frames: int = 8,
                  captions: dict[str, str] | None = None, wandb_key: str = "plots/contact_sheet",
                  keys: list[str] | None = None) -> Path:
    """One row per sample (its frames left to right in time order) titled key + caption: the first `n_samples`
    samples in index order, or the samples named by `keys` in that order (the folder is read until all are
    found: O(samples read)).

    `captions` (key -> text, may hold several lines) adds lines under the title, e.g. what trained models
    generated.
    """
    samples = _pick(shards_dir, n_samples, keys)
    if not samples:
        raise ValueError(f"{shards_dir}: no samples to show")
    cols = min(max_frames, max(len(s["frames"]) for s in samples)) or 1
    lines = 1 + max((len(captions[s["key"]].splitlines()) for s in samples if s["key"] in (captions or {})),
                    default=0)
    fig, axes = plt.subplots(len(samples), cols, figsize=(max(1.4 * cols, 5.5), (1.4 + 0.2 * lines) * len(samples)),
                             dpi=100, squeeze=False, gridspec_kw={"hspace": 0.1 + 0.17 * lines, "wspace": 0.05})
    for row, sample in zip(axes, samples):
        for i, ax in enumerate(row):
            ax.axis("off")
            if i < len(sample["frames"]):
                ax.imshow(sample["frames"][i], interpolation="nearest")
        title = f"{sample['key']}: {sample['text']}"
        if captions and sample["key"] in captions:
            title += "\n" + captions[sample["key"]]
        # left-aligned over the whole row: the title may run past the first frame's axes
        row[0].set_title(title, loc="left", fontsize=8)
    return _save(fig, png, wandb_key)


def _pick(shards_dir, n_samples: int, keys: list[str] | None) -> list[dict]:
    want, found = (list(dict.fromkeys(keys)) if keys is not None else None), {}
    for sample in iter_shard_samples(shards_dir):
        if want is None:
            found[sample["key"]] = sample
            if len(found) >= n_samples:
                break
        elif sample["key"] in want:
            found[sample["key"]] = sample
            if len(found) == len(want):
                break
    if want is None:
        return list(found.values())
    missing = [k for k in want if k not in found]
    if missing:
        raise ValueError(f"{shards_dir}: no sample(s) with key {missing}")
    return [found[k] for k in want]


def _save(fig, png, wandb_key: str | None) -> Path:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, bbox_inches="tight")
    plt.close(fig)
    log_image(png, wandb_key)
    return png


def log_image(png, key: str | None) -> bool:
    """Log `png` to the active W&B run, if any; True if logged.

    Only looks at wandb when this process already imported it: without an import there can be no
    active run, and importing wandb costs a second or two.
    """
    wandb = sys.modules.get("wandb")
    if not key or wandb is None or getattr(wandb, "run", None) is None:
        return False
    wandb.run.log({key: wandb.Image(str(png))})
    return True
