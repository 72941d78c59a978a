"""`vtt-prep compact`: small shards from incremental runs merge into full ones, byte for byte, crash-safe."""
import subprocess

import pytest
from prep_helpers import (add_video, calls, cfg, content, env, live_shards, logging_ffmpeg, make_corpus, prep_cmd,
                          snapshot)

from vtt.pipeline.compact import compact_shards
from vtt.pipeline.config import CompactConfig, ConfigError
from vtt.pipeline.faults import ENV
from vtt.pipeline.run import run_extract
from vtt.pipeline.verify import verify_shards
from vtt.shards.format import read_samples
from vtt.shards.ledger import read_ledger


def _raw(out):
    """key -> members exactly as stored, whatever live shard holds them."""
    return {k: m for u in live_shards(out) for k, m in read_samples(out / u)}


def _shards(out):
    """Live shards (merged ones stay on disk as retired until --retention-hours passed)."""
    return live_shards(out)


@pytest.fixture()
def grown(tmp_path):
    """Two full shards of 2 samples from a first run, then two reruns adding one video each."""
    data, out = make_corpus(tmp_path / "data", n=4), tmp_path / "shards"
    for extra in (None, "late1.mp4", "late2.mp4"):
        if extra:
            add_video(data, extra)
        run_extract(cfg(data, out, shard_max_samples=2))
    assert _shards(out) == [f"shard-00000{i}.tar" for i in range(4)]
    return data, out


def test_compact_merges_only_small_shards(grown):
    data, out = grown
    before, raw = content(out), _raw(out)
    small = CompactConfig(out, shard_max_samples=2, min_fill=0.75)  # 1 sample < 1.5 <= 2 samples
    dry = compact_shards(CompactConfig(out, shard_max_samples=2, min_fill=0.75, dry_run=True))
    assert dry.merged == ["shard-000002.tar", "shard-000003.tar"] and dry.samples == 2
    assert "would merge 2 shards" in dry.text()
    res = compact_shards(small)
    assert res.merged == ["shard-000002.tar", "shard-000003.tar"] and res.written == ["shard-000004.tar"]
    assert _shards(out) == ["shard-000000.tar", "shard-000001.tar", "shard-000004.tar"]
    assert sorted(read_ledger(out).retired) == res.retired == ["shard-000002.tar", "shard-000003.tar"]
    assert all((out / u).is_file() for u in res.retired)  # a running trainer may still read them
    assert _raw(out) == raw and content(out) == before  # same member bytes, read back by WebDataset
    assert verify_shards(out).ok
    moved = {r.key for r in read_ledger(out).ok_records() if r.shard == "shard-000004.tar"}
    assert moved == {"late1", "late2"}
    again = compact_shards(small)  # the merged shard is full by samples: nothing left to do
    assert again.merged == [] and "nothing to compact" in again.text()
    assert _shards(out) == ["shard-000000.tar", "shard-000001.tar", "shard-000004.tar"]


def test_rerun_after_compact_is_a_no_op(grown, tmp_path):
    data, out = grown
    compact_shards(CompactConfig(out))  # default limits: all four are small, one shard results
    assert _shards(out) == ["shard-000004.tar"]
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path)
    before = snapshot(out)
    rep = run_extract(cfg(data, out, shard_max_samples=2, ffmpeg=str(ffmpeg), ffprobe=str(ffprobe)))
    assert rep.videos_unchanged == 6 and rep.videos_ok == 0 and calls(log) == []
    assert {k: v for k, v in snapshot(out).items() if k.startswith("shard-")} == \
        {k: v for k, v in before.items() if k.startswith("shard-")}


@pytest.mark.parametrize("point", ["shard-renamed", "ledger-written", "rewrite-committed"])
def test_compact_killed_then_rerun_loses_nothing(grown, point):
    data, out = grown
    before = content(out)
    killed = subprocess.run(prep_cmd("compact", str(out)), env={**env(), ENV: point}, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    again = subprocess.run(prep_cmd("compact", str(out)), env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert len(_shards(out)) == 1 and content(out) == before
    assert verify_shards(out).ok and not list(out.glob(".tmp-*"))


def test_compact_refuses_a_folder_without_ledger(tmp_path):
    with pytest.raises(ConfigError, match="no ledger"):
        compact_shards(CompactConfig(tmp_path))
    with pytest.raises(ConfigError, match="min_fill"):
        (tmp_path / "ledger.json").write_text("{}")
        CompactConfig(tmp_path, min_fill=0)


def test_compact_waits_for_no_one(grown):
    import filelock
    data, out = grown
    with filelock.FileLock(str(out / ".vtt-prep.lock"), timeout=0):
        res = subprocess.run(prep_cmd("compact", str(out)), env=env(), capture_output=True, text=True)
    assert res.returncode == 4 and "another vtt-prep run holds" in res.stderr
    assert len(_shards(out)) == 4
