"""Discovery and sidecar validation (no ffmpeg: files only need the right names)."""
import json

import pytest

from vtt.pipeline.config import ConfigError, PrepConfig, parse_bytes, parse_size, preflight
from vtt.pipeline.discover import discover, find_videos
from vtt.pipeline.sidecar import validate_sidecar


def _put(root, rel, sidecar=None, raw=None):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"not really a video")
    if raw is not None:
        p.with_suffix(".json").write_text(raw)
    elif sidecar is not None:
        p.with_suffix(".json").write_text(json.dumps(sidecar))
    return p


def test_recursive_any_case_sorted_and_skips(tmp_path):
    for rel in ["b.MP4", "a/z.mkv", "a/y.WebM", "c.avi", "d.Mov", "e.m4v", "f.txt", "g.json",
                ".hidden.mp4", ".cache/x.mp4", "shards/s.mp4"]:
        _put(tmp_path, rel)
    found = [p.relative_to(tmp_path).as_posix() for p in find_videos(tmp_path, exclude=tmp_path / "shards")]
    assert found == ["a/y.WebM", "a/z.mkv", "b.MP4", "c.avi", "d.Mov", "e.m4v"]


@pytest.mark.parametrize("raw, cls, words", [
    (None, "sidecar_missing", ["v.json", "no sidecar"]),
    ("{not json", "sidecar_invalid", ["v.json", "invalid JSON"]),
    ('["a"]', "sidecar_invalid", ["JSON object"]),
    ('{"description": "x"}', "sidecar_invalid", ["'video_id' is missing"]),
    ('{"video_id": 7, "description": "x"}', "sidecar_invalid", ["'video_id'", "int"]),
    ('{"video_id": "v", "description": "  "}', "sidecar_invalid", ["'description' is empty"]),
    ('{"video_id": "v", "description": ["x"]}', "sidecar_invalid", ["'description'", "list"]),
    ('{"video_id": "v", "description": "x", "duration": "2s"}', "sidecar_invalid", ["'duration'"]),
    ('{"video_id": "v", "description": "x", "frames": 2.5}', "sidecar_invalid", ["'frames'"]),
    ('{"video_id": "v", "description": "x", "frames": true}', "sidecar_invalid", ["'frames'"]),
    ('{"video_id": "v", "description": "x", "vtt": {}}', "sidecar_invalid", ["'vtt' is reserved"]),
])
def test_bad_sidecars_name_file_and_field(tmp_path, raw, cls, words):
    _put(tmp_path, "sub/v.mp4", raw=raw)
    (video,) = discover(tmp_path)
    assert not video.ok and video.error["class"] == cls
    assert str(tmp_path / "sub" / "v.json") in video.error["reason"]
    for w in words:
        assert w in video.error["reason"], video.error["reason"]


def test_extra_fields_kept_and_keys_safe(tmp_path):
    _put(tmp_path, "x.mp4", {"video_id": "clip.01/a", "description": "hi", "duration": 2, "frames": 50,
                             "license": "CC-BY"})
    (v,) = discover(tmp_path)
    assert v.ok and v.meta["license"] == "CC-BY" and v.video_id == "clip.01/a"
    assert "." not in v.key and "/" not in v.key
    assert validate_sidecar({"video_id": "a", "description": "b"}) == []


def test_duplicate_video_id_first_in_sorted_order_wins(tmp_path):
    _put(tmp_path, "b/second.mp4", {"video_id": "same", "description": "x"})
    _put(tmp_path, "a/first.mp4", {"video_id": "same", "description": "y"})
    _put(tmp_path, "c/other.mp4", {"video_id": "other", "description": "z"})
    a, b, c = discover(tmp_path)
    assert a.ok and a.source == "a/first.mp4" and c.ok
    assert b.error["class"] == "duplicate_video_id"
    assert "'video_id' 'same'" in b.error["reason"] and "a/first.mp4" in b.error["reason"]


def test_missing_sidecar_allowed_takes_id_from_path(tmp_path):
    _put(tmp_path, "a/x.mp4")
    _put(tmp_path, "b/x.mp4")
    a, b = discover(tmp_path, allow_missing_sidecar=True)
    assert a.ok and b.ok and a.video_id == "a/x" and a.key != b.key
    assert a.meta["description"] == "" and a.sidecar_path is None


def test_config_parsing_and_validation(tmp_path):
    assert parse_bytes("1GB") == 10**9 and parse_bytes("500MB") == 5 * 10**8
    assert parse_bytes("64MiB") == 64 * 2**20 and parse_bytes("4096") == 4096
    assert parse_size("336") == (336, 336) and parse_size("640x360") == (640, 360)
    cfg = PrepConfig(tmp_path, tmp_path / "out", size="64x48", shard_size="10MB")
    assert cfg.size == (64, 48) and cfg.shard_size == 10**7 and cfg.workers >= 1
    assert cfg.frame_spec().size == (64, 48)
    same = PrepConfig(tmp_path, tmp_path / "out", size="64x48", timeout=5, workers=1, ffmpeg="/x/ffmpeg")
    assert same.settings_hash() == cfg.settings_hash()  # binaries/timeouts don't change samples
    assert PrepConfig(tmp_path, tmp_path / "o", num_frames=4).settings_hash() != cfg.settings_hash()
    for bad in [dict(size="abc"), dict(shard_size="1 parsec"), dict(workers=0), dict(resize="zoom"),
                dict(num_frames=0), dict(shard_max_samples=0)]:
        with pytest.raises(ConfigError):
            PrepConfig(tmp_path, tmp_path / "out", **bad)
    with pytest.raises(ConfigError, match="does not exist"):
        preflight(PrepConfig(tmp_path / "nope", tmp_path / "out"))


def test_env_names_the_binaries(tmp_path, monkeypatch):
    monkeypatch.setenv("VTT_FFMPEG", "/opt/ff/ffmpeg")
    monkeypatch.setenv("VTT_FFPROBE", "/opt/ff/ffprobe")
    cfg = PrepConfig(tmp_path, tmp_path / "out")
    assert cfg.frame_spec().ffmpeg == "/opt/ff/ffmpeg" and cfg.frame_spec().ffprobe == "/opt/ff/ffprobe"
