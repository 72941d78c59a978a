"""trainer/data/loader.py on real WebDataset tars written here with webdataset.TarWriter (tiny Pillow images)."""
import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vtt.shards.format import ShardFormatError, frame_field, sha256_file, shard_name
from vtt.shards.index import ShardEntry, ShardIndex, write_index
from vtt.trainer.data.loader import (CorruptSampleError, DataConfig, StreamPosition, build_loader, eval_batches,
                                     in_eval_slice, steps_per_epoch)


def image_bytes(value: int, ext: str = "jpg", size=(6, 8)) -> bytes:
    arr = np.zeros((*size, 3), np.uint8)
    arr[..., 0], arr[..., 1] = value % 256, (value * 7) % 256
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG" if ext == "jpg" else "PNG")
    return buf.getvalue()


def write_shards(folder, sizes, *, frames=2, ext="jpg", damage=None, start=0, prefix="v", meta=None, first=0):
    """Shards of `sizes` samples each (numbered from `first`), keys v0000...; damage: {key: 'jpeg'|'json'|'frames'};
    meta(key, n): extra sidecar fields."""
    folder.mkdir(parents=True, exist_ok=True)
    damage, entries, n = damage or {}, [], start
    for si, size in enumerate(sizes):
        path = folder / shard_name(first + si)
        with wds.TarWriter(str(path), mtime=0, encoder=False) as w:
            for _ in range(size):
                key = f"{prefix}{n:04d}"
                fields = {"video_id": key, "n": n, **(meta(key, n) if meta else {})}
                sample = {"__key__": key, "json": json.dumps(fields).encode(),
                          "txt": f"text {key}".encode()}
                for t in range(frames):
                    sample[frame_field(t, ext)] = image_bytes(n + t, ext)
                bad = damage.get(key)
                if bad == "jpeg":
                    sample[frame_field(1, ext)] = sample[frame_field(1, ext)][:40]
                elif bad == "json":
                    sample["json"] = b"{not json"
                elif bad == "frames":
                    sample = {k: v for k, v in sample.items() if not k[0].isdigit()}
                w.write(sample)
                n += 1
        entries.append(ShardEntry(path.name, size, path.stat().st_size, sha256_file(path)))
    write_index(folder, ShardIndex(tuple(entries), {"test": True}))
    return folder


def keys_of(samples):
    return [s["key"] for s in samples]


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def one_epoch(cfg, micro, rank, world):
    """The rank's batches of epoch 0, and proof that epoch 1 starts right after them."""
    loader = build_loader(cfg, keys_of, micro, rank, world)
    n = len(loader)
    batches = take(loader, n + 1)
    assert loader.state()["epoch"] == 1 and loader.state()["batch"] == 1, loader.state()
    return batches[:n]


@pytest.mark.parametrize("sizes,workers", [([4] * 8, 0), ([4] * 8, 2), ([8, 8], 2)])
def test_ranks_get_disjoint_complete_splits(tmp_path, sizes, workers):
    # [8, 8] with 2 ranks x 2 workers: fewer shards than streams -> sample-level striding
    cfg = DataConfig(str(write_shards(tmp_path, sizes)), num_workers=workers, shuffle_buffer=3)
    per_rank = [[k for b in one_epoch(cfg, 2, r, 2) for k in b] for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == sum(sizes) // 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"v{i:04d}" for i in range(sum(sizes))]


@pytest.mark.parametrize("workers", [0, 2])
def test_equal_batch_counts_with_uneven_shards(tmp_path, workers):
    sizes = [1, 9, 2, 5, 3, 7]  # 27 samples
    cfg = DataConfig(str(write_shards(tmp_path, sizes)), num_workers=workers, shuffle_buffer=4)
    assert steps_per_epoch(cfg, micro_batch=2, world_size=3) == 27 // 6
    seen = []
    for rank in range(3):
        batches = one_epoch(cfg, 2, rank, 3)
        assert len(batches) == 4 and all(len(b) == 2 for b in batches)
        seen += sum(batches, [])
    assert len(set(seen)) == len(seen) == 24  # exact shares: no sample twice, only 27 % 6 left out


def test_epoch_reshuffle_differs_and_is_reproducible(tmp_path):
    cfg = DataConfig(str(write_shards(tmp_path, [5] * 6)), shuffle_buffer=8, seed=3)
    n = steps_per_epoch(cfg, 3, 1)
    a = take(build_loader(cfg, keys_of, 3), 2 * n)
    b = take(build_loader(cfg, keys_of, 3), 2 * n)
    assert a == b
    assert a[:n] != a[n:] and sorted(sum(a[:n], [])) == sorted(sum(a[n:], []))
    other = take(build_loader(DataConfig(cfg.shards, shuffle_buffer=8, seed=4), keys_of, 3), n)
    assert other != a[:n]
    # without the sample buffer, the shard order alone still changes per epoch
    plain = sum(take(build_loader(DataConfig(cfg.shards, shuffle_buffer=0, seed=3), keys_of, 3), 2 * n), [])
    first, second = plain[:len(plain) // 2], plain[len(plain) // 2:]
    assert first != second and sorted(first) == sorted(second)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_remaining_batches(tmp_path, workers):
    # a corrupt sample shifts the stream: the position must count raw samples, not batches
    folder = write_shards(tmp_path, [6, 4, 7, 5, 3], damage={"v0003": "jpeg", "v0012": "json"})
    cfg = DataConfig(str(folder), num_workers=workers, shuffle_buffer=5, seed=1)
    micro, world, rank, total = 2, 2, 1, 14  # 6 batches per epoch: crosses an epoch boundary
    full = take(build_loader(cfg, keys_of, micro, rank, world), total)
    for k in (3, 6, 11):
        loader = build_loader(cfg, keys_of, micro, rank, world)
        assert take(loader, k) == full[:k]
        state = json.loads(json.dumps(loader.state()))
        resumed = build_loader(cfg, keys_of, micro, rank, world, start=state)
        assert take(resumed, total - k) == full[k:], f"resume after {k} batches"
    assert StreamPosition.from_dict(state).epoch == 1
    assert sum(state["corrupt"].values()) >= 1  # the last resume point lies past a corrupt sample


def test_resume_skips_without_decoding(tmp_path, monkeypatch):
    import vtt.trainer.data.read as data
    cfg = DataConfig(str(write_shards(tmp_path, [8, 8])), shuffle_buffer=4)
    loader = build_loader(cfg, keys_of, 2)
    take(loader, 5)
    calls = []
    real = data.decode_sample
    monkeypatch.setattr(data, "decode_sample",
                        lambda raw, *rest: calls.append(raw["__key__"]) or real(raw, *rest))
    resumed = build_loader(cfg, keys_of, 2, start=loader.state())
    got = take(resumed, 1)[0]
    assert got == calls  # only the 2 samples of the next batch were decoded
    assert got == take(loader, 1)[0]


def test_resume_with_other_workers_is_refused(tmp_path):
    cfg = DataConfig(str(write_shards(tmp_path, [4, 4])), num_workers=0)
    loader = build_loader(cfg, keys_of, 2)
    take(loader, 1)
    with pytest.raises(ValueError, match="num_workers was 0, now 2"):
        build_loader(DataConfig(cfg.shards, num_workers=2), keys_of, 2, start=loader.state())


def test_decoded_sample_fields_png_and_jpeg(tmp_path):
    for ext in ("png", "jpg"):
        folder = write_shards(tmp_path / ext, [2], frames=3, ext=ext)
        samples = take(build_loader(DataConfig(str(folder), shuffle_buffer=0), list, 2), 1)[0]
        s = samples[0]
        assert s["key"] == "v0000" and s["text"] == "text v0000" and s["meta"]["n"] == 0
        assert s["frames"].dtype == np.uint8 and s["frames"].shape == (3, 6, 8, 3)
        if ext == "png":  # lossless: exact values, frames in time order
            assert s["frames"][:, 0, 0, 0].tolist() == [0, 1, 2]
    text_only = build_loader(DataConfig(str(folder), decode_frames=False), list, 2)
    assert take(text_only, 1)[0][0]["frames"] is None


def test_corrupt_members_skip_counts_and_stop_names_shard_and_key(tmp_path):
    folder = write_shards(tmp_path, [4, 4], damage={"v0001": "jpeg", "v0005": "json", "v0006": "frames"})
    loader = build_loader(DataConfig(str(folder), shuffle_buffer=0), keys_of, 1)
    got = sum(take(loader, 5), [])
    assert not {"v0001", "v0005", "v0006"} & set(got) and len(got) == 5
    assert loader.corrupt == {"bad_image": 1, "bad_json": 1, "missing_frames": 1}
    assert {e["key"] for e in loader.corrupt_events} == {"v0001", "v0005", "v0006"}
    assert loader.state()["corrupt"] == loader.corrupt
    for workers in (0, 2):
        cfg = DataConfig(str(folder), shuffle_buffer=0, on_corrupt="stop", num_workers=workers)
        with pytest.raises(CorruptSampleError, match=r"shard-00000\d\.tar: sample v000[156]"):
            take(build_loader(cfg, keys_of, 1), 8)


def test_truncated_tar_is_reported(tmp_path):
    folder = write_shards(tmp_path, [3, 3])
    tar = folder / shard_name(1)
    data = tar.read_bytes()
    tar.write_bytes(data[:1500])  # cut inside the first sample's members
    write_index_for(folder)
    loader = build_loader(DataConfig(str(folder), shuffle_buffer=0), keys_of, 1)
    got = sum(take(loader, 6), [])  # the whole epoch: the broken tar's samples are replaced
    assert loader.corrupt.get("bad_shard", 0) >= 1 and len(got) == 6
    assert {"v0000", "v0001", "v0002"} <= set(got) and not {"v0004", "v0005"} & set(got)
    with pytest.raises(CorruptSampleError, match="shard-000001.tar"):
        take(build_loader(DataConfig(str(folder), shuffle_buffer=0, on_corrupt="stop"), keys_of, 1), 6)


def write_index_for(folder):
    entries = [ShardEntry(p.name, 3, p.stat().st_size, sha256_file(p)) for p in sorted(folder.glob("*.tar"))]
    write_index(folder, ShardIndex(tuple(entries), {}))


def test_bad_folders_and_index_mismatch_are_clear_errors(tmp_path):
    with pytest.raises(ShardFormatError, match="does not exist"):
        build_loader(DataConfig(str(tmp_path / "nope")), keys_of, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardFormatError, match="no index"):
        steps_per_epoch(DataConfig(str(tmp_path / "empty")), 1, 1)
    folder = write_shards(tmp_path / "s", [3, 3])
    with open(folder / shard_name(1), "ab") as f:
        f.write(b"\0" * 512)
    (folder / shard_name(2)).write_bytes(b"")
    with pytest.raises(ShardFormatError, match="disagrees") as e:
        build_loader(DataConfig(str(folder)), keys_of, 1)
    assert "shard-000001.tar" in str(e.value) and "shard-000002.tar" not in str(e.value)  # unlisted: not ours
    write_shards(tmp_path / "c", [3, 3])
    tar = tmp_path / "c" / shard_name(0)
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes: only the checksum sees it
    tar.write_bytes(bytes(data))
    build_loader(DataConfig(str(tmp_path / "c")), keys_of, 1)
    with pytest.raises(ShardFormatError, match="sha256 differs"):
        build_loader(DataConfig(str(tmp_path / "c"), verify_checksums=True), keys_of, 1)
    write_index(tmp_path / "c", ShardIndex((), {}))
    for p in (tmp_path / "c").glob("*.tar"):
        p.unlink()
    with pytest.raises(ShardFormatError, match="lists no samples"):
        build_loader(DataConfig(str(tmp_path / "c")), keys_of, 1)
    with pytest.raises(ShardFormatError, match="fewer than one global micro batch"):
        build_loader(DataConfig(str(write_shards(tmp_path / "t", [3]))), keys_of, 2, 0, 2)


def test_eval_fraction_slice_is_disjoint_and_even(tmp_path):
    folder = write_shards(tmp_path, [10, 10, 10, 10])
    cfg = DataConfig(str(folder), eval_fraction=0.25, shuffle_buffer=4)
    held = {f"v{i:04d}" for i in range(40) if in_eval_slice(f"v{i:04d}", 0.25)}
    assert 0 < len(held) < 40
    train = {k for r in (0, 1) for b in one_epoch(cfg, 2, r, 2) for k in b}
    assert not train & held and len(train) >= 40 - len(held) - 3
    n_eval = eval_batches(cfg, 2, 2)
    per_rank = []
    for rank in (0, 1):
        loader = build_loader(cfg, keys_of, 2, rank, 2, split="eval")
        first, again = list(loader), list(loader)
        assert first == again and len(first) == n_eval  # deterministic, same count on every rank
        per_rank.append(sum(first, []))
    assert set(per_rank[0] + per_rank[1]) == held  # complete (the tail wraps around to pad)


def test_eval_shards_folder_with_workers(tmp_path):
    write_shards(tmp_path / "train", [4, 4])
    write_shards(tmp_path / "heldout", [3, 2], prefix="h")
    cfg = DataConfig(str(tmp_path / "train"), eval_shards=str(tmp_path / "heldout"), num_workers=2)
    seen = []
    for rank in (0, 1):
        batches = list(build_loader(cfg, keys_of, 2, rank, 2, split="eval"))
        assert len(batches) == eval_batches(cfg, 2, 2) == 2
        seen += sum(batches, [])
    assert set(seen) == {f"h{i:04d}" for i in range(5)} and len(seen) == 8
    with pytest.raises(ValueError, match="no eval set"):
        build_loader(DataConfig(cfg.shards), keys_of, 2, split="eval")


def test_config_validation():
    with pytest.raises(ValueError, match="on_corrupt"):
        DataConfig("x", on_corrupt="ignore")
    with pytest.raises(ValueError, match="eval_fraction"):
        DataConfig("x", eval_fraction=1.0)
    with pytest.raises(ValueError, match="not both"):
        DataConfig("x", eval_shards="y", eval_fraction=0.1)
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_fewer_samples_than_streams_does_not_starve(tmp_path):
    # 3 samples, 2 ranks x 2 workers = 4 streams: each rank still gets its one batch
    cfg = DataConfig(str(write_shards(tmp_path, [3])), num_workers=2, shuffle_buffer=0)
    got = [one_epoch(cfg, 1, r, 2) for r in (0, 1)]
    assert [len(b) for b in got] == [1, 1] and got[0] != got[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_errors_keep_their_type_and_worker_traceback(tmp_path, workers):
    # the adapter's collate may reject samples (model does not match the data): that error must surface
    def collate(samples):
        raise KeyError("sample has no field 'title'")

    cfg = DataConfig(str(write_shards(tmp_path, [4])), num_workers=workers)
    with pytest.raises(KeyError, match="title") as e:
        take(build_loader(cfg, collate, 2), 1)
    if workers:
        assert "in DataLoader worker" in "".join(e.value.__notes__)
