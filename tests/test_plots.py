"""trainer/tools/plots.py: loss curve and contact sheet PNGs from real files of the formats they read."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vtt.shards.format import sha256_file, shard_name
from vtt.shards.index import ShardEntry, ShardIndex, write_index
from vtt.trainer.tools import plots

COLOURS = [(220, 30, 30), (30, 180, 30), (30, 60, 240)]


def _jpeg(rgb, x) -> bytes:
    img = np.full((32, 32, 3), 90, np.uint8)
    img[8:20, x:x + 12] = rgb
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_shards(folder, n=3, frames=4):
    """A shards folder by the contract (tar members + index.json), written without vtt-prep."""
    folder.mkdir()
    tar_path = folder / shard_name(0)
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n):
            members = {f"clip{i}.txt": f"caption number {i}".encode(),
                       f"clip{i}.json": json.dumps({"video_id": f"clip{i}"}).encode()}
            members.update({f"clip{i}.{t:04d}.jpg": _jpeg(COLOURS[i % 3], 4 * t) for t in range(frames)})
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    entry = ShardEntry(tar_path.name, n, tar_path.stat().st_size, sha256_file(tar_path))
    write_index(folder, ShardIndex(shards=(entry,)))
    return folder


def _write_metrics(path, steps=30):
    rows = [{"step": s, "epoch": 0, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, steps + 1)]
    rows += [{"step": s, "eval_loss": 2.0 / s} for s in (10, 20, 30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 31, "lo')  # torn tail
    return path


def test_read_metrics_splits_train_and_eval_and_skips_torn_tail(tmp_path):
    train, evals = plots.read_metrics(_write_metrics(tmp_path / "metrics.jsonl"))
    assert len(train) == 30 and train[0] == (1, 3.0)
    assert evals == [(10, 0.2), (20, 0.1), (30, 2.0 / 30)]


def test_read_metrics_names_file_on_bad_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        plots.read_metrics(p)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plots.read_metrics(tmp_path / "missing.jsonl")


def test_plot_loss_writes_png(tmp_path):
    png = plots.plot_loss(_write_metrics(tmp_path / "metrics.jsonl"), tmp_path / "out" / "loss.png")
    img = Image.open(png)
    assert img.format == "PNG" and img.width >= 400
    # both curves drawn: blue train and orange eval pixels are present
    arr = np.asarray(img.convert("RGB")).astype(int)
    orange = (arr[..., 0] > 200) & (arr[..., 1] > 100) & (arr[..., 1] < 160) & (arr[..., 2] < 60)
    blue = (arr[..., 2] > 150) & (arr[..., 0] < 80)
    assert orange.sum() > 50 and blue.sum() > 50


def test_plot_loss_rejects_empty(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no loss"):
        plots.plot_loss(p, tmp_path / "x.png")


def test_contact_sheet_shows_frames_of_each_sample(tmp_path):
    shards = _write_shards(tmp_path / "shards")
    samples = list(plots.iter_shard_samples(shards))
    assert [s["key"] for s in samples] == ["clip0", "clip1", "clip2"]
    assert samples[1]["text"] == "caption number 1" and len(samples[1]["frames"]) == 4
    png = plots.contact_sheet(shards, tmp_path / "sheet.png", n_samples=2,
                              captions={"clip0": "model says hi"})
    arr = np.asarray(Image.open(png).convert("RGB")).astype(int)
    red = (arr[..., 0] > 180) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
    green = (arr[..., 1] > 140) & (arr[..., 0] < 80) & (arr[..., 2] < 80)
    blue = (arr[..., 2] > 180) & (arr[..., 0] < 80) & (arr[..., 1] < 100)
    assert red.sum() > 100 and green.sum() > 100  # the two samples asked for
    assert blue.sum() == 0                         # and not the third


def test_contact_sheet_shows_the_samples_asked_for_in_that_order(tmp_path):
    shards = _write_shards(tmp_path / "shards")
    png = plots.contact_sheet(shards, tmp_path / "sheet.png", keys=["clip2", "clip0"],
                              captions={"clip2": "a: wrong\nb: right", "clip0": "a: right"})
    arr = np.asarray(Image.open(png).convert("RGB")).astype(int)
    red = (arr[..., 0] > 180) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
    green = (arr[..., 1] > 140) & (arr[..., 0] < 80) & (arr[..., 2] < 80)
    blue = (arr[..., 2] > 180) & (arr[..., 0] < 80) & (arr[..., 1] < 100)
    assert blue.sum() > 100 and red.sum() > 100 and green.sum() == 0
    rows_blue, rows_red = np.nonzero(blue.any(axis=1))[0], np.nonzero(red.any(axis=1))[0]
    assert rows_blue.max() < rows_red.min()  # clip2 above clip0
    with pytest.raises(ValueError, match="no sample"):
        plots.contact_sheet(shards, tmp_path / "x.png", keys=["nope"])


def test_images_go_to_active_wandb_run(tmp_path, monkeypatch):
    import wandb  # a declared dependency: never skip this test
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    assert plots.log_image(png, "plots/x") is False  # no run yet
    run = wandb.init(project="vtt-test", dir=str(tmp_path), mode="offline")
    try:
        assert plots.log_image(png, "plots/x") is True
    finally:
        run.finish()
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/plots/x_*.png"))
    assert media, "W&B did not store the logged image"
