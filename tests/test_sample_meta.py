"""The sample metadata schema (shards/sample_meta.py): the accessors both halves read {key}.json through, on a
sample vtt-prep writes and on older or hand-made samples that lack parts of the reserved block."""
import json

from vtt.shards import sample_meta as sm
from vtt.shards.format import SAMPLE_META_KEYS


def test_a_written_sample_reads_back_through_the_accessors(tmp_path):
    from vtt.pipeline.frames import ExtractResult
    from vtt.pipeline.task import Task, build_members
    task = Task(path=tmp_path / "a.mp4", source="a.mp4", key="k1", meta={"video_id": "a", "description": "d"},
                spec=None, settings={"image_format": "jpg", "size": [8, 8]}, ffmpeg_version="x")
    res = ExtractResult(frames=[b"x", b"y"], timestamps=[0.0, 0.5], probe={"fps": 2}, method="seek:2",
                        warnings=["w"])
    meta = json.loads(dict(build_members(task, "0" * 64, res))["k1.json"])
    assert sm.RESERVED in SAMPLE_META_KEYS and set(meta) == {"video_id", "description", sm.RESERVED}
    assert sm.timestamps(meta) == [0.0, 0.5] and sm.timestamps(meta, 3) is None
    assert sm.warnings(meta)[0] == "w" and sm.probe(meta)["fps"] == 2 and sm.settings(meta)["size"] == [8, 8]


def test_older_samples_fall_back_as_documented():
    for meta in ({}, {"vtt": None}, {"vtt": {"timestamps": "bad"}}, {"vtt": {"timestamps": [0, "x"]}}):
        assert sm.timestamps(meta) is None and sm.warnings(meta) == [] and sm.probe(meta) == {}
        assert sm.frame_times(meta, 3) == [0.0, 1 / sm.FALLBACK_FPS, 2 / sm.FALLBACK_FPS]
    assert sm.mean_interval([1.0]) == 1 / sm.FALLBACK_FPS and sm.mean_interval([0.0, 1.0, 3.0]) == 1.5


def test_keeping_frames_cuts_the_timestamps_and_leaves_the_sidecar_fields():
    meta = sm.with_provenance({"video_id": "a", "description": "d"}, {"timestamps": [0.0, 0.1, 0.2, 0.3]})
    kept = sm.with_frames_kept(meta, [0, 3], 4)
    assert sm.timestamps(kept) == [0.0, 0.3] and kept["description"] == "d"
    assert sm.timestamps(meta) == [0.0, 0.1, 0.2, 0.3]  # the original is not changed
    assert sm.with_frames_kept(meta, [0], 5) == meta  # timestamps of another frame count: left as they are
