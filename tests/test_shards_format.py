import json

import pytest

from vtt.shards.format import ShardFormatError, atomic_write_bytes, frame_field, frame_fields, make_key, shard_name
from vtt.shards.index import ShardEntry, ShardIndex, check_index, read_index, write_index


def test_keys_are_webdataset_safe_and_unique():
    assert make_key("video_001") == "video_001"
    k1, k2 = make_key("a.b"), make_key("a_b")
    assert "." not in k1 and "/" not in make_key("x/y.mp4")
    assert k1 != k2
    assert make_key("a.b") == k1  # deterministic
    with pytest.raises(ShardFormatError):
        make_key("")


def test_frame_fields_sorted():
    sample = {"__key__": "k", "0010.jpg": b"", "0002.jpg": b"", "json": b"", "txt": b""}
    assert frame_fields(sample) == ["0002.jpg", "0010.jpg"]
    assert frame_field(3, "png") == "0003.png"


def test_index_roundtrip_and_checks(tmp_path):
    atomic_write_bytes(tmp_path / shard_name(0), b"x" * 10)
    idx = ShardIndex((ShardEntry(shard_name(0), 2, 10, "0" * 64),), {"num_frames": 8})
    write_index(tmp_path, idx)
    raw = json.loads((tmp_path / "index.json").read_text())
    assert raw["__kind__"] == "wids-shard-index-v1" and raw["shardlist"][0]["nsamples"] == 2
    assert read_index(tmp_path) == idx
    assert check_index(tmp_path) == []
    assert any("sha256" in p for p in check_index(tmp_path, checksums=True))
    (tmp_path / shard_name(1)).write_bytes(b"")
    assert any("not in index.json" in p for p in check_index(tmp_path))
    assert not list(tmp_path.glob(".tmp-*"))


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(ShardFormatError, match="no index"):
        read_index(tmp_path)
    with pytest.raises(ShardFormatError, match="does not exist"):
        read_index(tmp_path / "nope")


def test_member_names_parse_like_webdataset():
    from webdataset.tariterators import base_plus_ext

    from vtt.shards.format import frame_index, key_of, split_member
    names = ["v1.json", "v1.0003.jpg", "clip-0001.0000.PNG", "a_b1234.txt", "dir.x/k.0001.jpg", "dir/k.json",
             "noext", ".hidden.jpg", "k.", "sub/dir/"]
    for name in names:
        key, field = base_plus_ext(name)
        assert split_member(name) == (None if key is None else (key, field)), name
    assert key_of("v1.0003.jpg") == "v1" and key_of("noext") == "noext"
    assert [frame_index(f) for f in ("0003.jpg", "0010.PNG", "json", "003.jpg", "0003.jpeg")] == [3, 10, None, None, None]


def test_retired_shards_round_trip_and_are_no_unlisted_leftover(tmp_path):
    """vtt-prep keeps retired shards on disk for a while: the index names them, and check_index (vtt-prep
    verify) counts them neither as samples nor as a stray tar; a tar named nowhere still is one."""
    live = tmp_path / shard_name(1)
    live.write_bytes(b"x" * 10)
    (tmp_path / shard_name(0)).write_bytes(b"old")
    (tmp_path / shard_name(7)).write_bytes(b"stray")
    index = ShardIndex((ShardEntry(live.name, 1, 10, "0" * 64),), {}, retired=(shard_name(0),))
    write_index(tmp_path, index)
    back = read_index(tmp_path)
    assert back == index and back.num_samples == 1
    assert json.loads((tmp_path / "index.json").read_text())["vtt"]["retired"] == [shard_name(0)]
    assert check_index(tmp_path, back) == [f"{tmp_path / shard_name(7)}: shard on disk but not in index.json"]
    assert "retired" not in ShardIndex().to_json()["vtt"]  # unchanged bytes for folders without any
