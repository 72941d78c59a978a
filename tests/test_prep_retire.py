"""Shards replaced by a rewrite/compact/rebuild are retired, not deleted: a trainer that read the older
index.json can still read them; a run after --retention-hours deletes them; status/verify list them."""
import json
import subprocess

import pytest
from prep_helpers import add_video, age_retired, cfg, env, live_shards, make_corpus, prep_cmd, read_back

from vtt.pipeline.compact import compact_shards
from vtt.pipeline.config import CompactConfig, ConfigError
from vtt.pipeline.run import run_extract
from vtt.pipeline.verify import status_text, verify_shards
from vtt.shards.format import shard_number
from vtt.shards.ledger import read_ledger


def _age(out, hours_ago_stamp="2000-01-01T00:00:00Z"):
    """Pretend every retired shard was retired long ago."""
    age_retired(out, hours_ago_stamp)


def _read_snapshot(out, urls):
    """What a running trainer does with its older index: open every url it listed."""
    import webdataset as wds
    return {s["__key__"] for s in wds.WebDataset([str(out / u) for u in urls], shardshuffle=False,
                                                  empty_check=False)}


@pytest.fixture()
def folder(tmp_path):
    data, out = make_corpus(tmp_path / "data", n=4), tmp_path / "out"
    run_extract(cfg(data, out, shard_max_samples=2))
    return data, out


def test_rewrite_retires_old_shards_until_retention_passes(folder):
    data, out = folder
    snapshot = live_shards(out)  # a trainer started now keeps these urls
    keys = _read_snapshot(out, snapshot)
    (data / "v00.mp4").unlink()
    (data / "v00.json").unlink()
    r = run_extract(cfg(data, out, shard_max_samples=2))
    (old,) = r.shards_retired
    assert r.shards_removed == [old] and old not in live_shards(out)
    ledger = read_ledger(out)
    assert list(ledger.retired) == [old] and ledger.retired[old].retired_at.endswith("Z")
    assert json.loads((out / "index.json").read_text())["vtt"]["retired"] == [old]
    assert _read_snapshot(out, snapshot) == keys  # the old snapshot still reads, nothing skipped
    assert "v00" not in read_back(out)
    # status and verify: retired listed apart, no mismatch
    res = verify_shards(out)
    assert res.ok and len(res.retired) == 1 and res.retired[0].startswith(old)
    text, ok = status_text(out)
    assert ok and "retired: 1 shards" in text and f"RETIRED {old}" in text
    cli = subprocess.run(prep_cmd("verify", str(out)), env=env(), capture_output=True, text=True)
    assert cli.returncode == 0 and f"RETIRED: {old}" in cli.stdout and "1 retired shards" in cli.stdout
    # a rerun within retention keeps it (reconcile does not take it for a leftover)
    r = run_extract(cfg(data, out, shard_max_samples=2))
    assert (out / old).is_file() and not r.shards_purged and not r.warnings
    # past retention: the next run deletes it, and its number is never handed out again
    _age(out)
    top = max(shard_number(u) for u in [*live_shards(out), old])
    r = run_extract(cfg(data, out, shard_max_samples=2))
    assert r.shards_purged == [old] and not (out / old).exists() and not read_ledger(out).retired
    assert "retired" not in json.loads((out / "index.json").read_text())["vtt"] and verify_shards(out).ok
    add_video(data, "v09.mp4")
    r = run_extract(cfg(data, out, shard_max_samples=2))
    assert shard_number(r.shards_written[0]) > top


def test_retention_zero_deletes_replaced_shards_at_once(folder):
    data, out = folder
    where = read_ledger(out).records["v03.mp4"].shard
    (data / "v03.mp4").unlink()
    r = run_extract(cfg(data, out, shard_max_samples=2, retention_hours=0, allow_missing_sidecar=True))
    assert r.shards_removed == [where] and not r.shards_retired
    assert not (out / where).exists() and not read_ledger(out).retired and verify_shards(out).ok


def test_compact_retires_and_purges_with_its_own_retention(folder, tmp_path):
    data, out = folder
    add_video(data, "late.mp4")
    run_extract(cfg(data, out, shard_max_samples=2))
    res = compact_shards(CompactConfig(out))
    assert res.retired == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert all((out / u).is_file() for u in res.retired) and verify_shards(out).ok
    cli = subprocess.run(prep_cmd("compact", str(out), "--retention-hours", "1"), env=env(),
                         capture_output=True, text=True)
    assert cli.returncode == 0 and all((out / u).is_file() for u in res.retired)  # 1 h has not passed
    _age(out)
    cli = subprocess.run(prep_cmd("compact", str(out), "--retention-hours", "1"), env=env(),
                         capture_output=True, text=True)
    assert "deleted 3 retired shards" in cli.stdout and not any((out / u).exists() for u in res.retired)
    with pytest.raises(ConfigError, match="retention_hours"):
        CompactConfig(out, retention_hours=-1)


def test_retired_shard_deleted_by_hand_is_dropped_not_an_error(folder):
    data, out = folder
    (data / "v00.json").write_text('{"video_id": "v00", "description": "new words"}')
    (old,) = run_extract(cfg(data, out, shard_max_samples=2)).shards_retired
    (out / old).unlink()
    assert verify_shards(out).ok  # listed with "file already gone", not a problem
    r = run_extract(cfg(data, out, shard_max_samples=2))
    assert any("already gone" in w for w in r.warnings) and not read_ledger(out).retired


def test_flags_are_in_help_and_validated(tmp_path):
    out = subprocess.run(prep_cmd("extract", "--help"), env=env(), capture_output=True, text=True).stdout
    for flag in ("--video-timeout", "--retry-failed", "--retention-hours"):
        assert flag in out
    assert "--retention-hours" in subprocess.run(prep_cmd("compact", "--help"), env=env(), capture_output=True,
                                                 text=True).stdout
    for bad in (dict(retention_hours=-1), dict(video_timeout=0)):
        with pytest.raises(ConfigError):
            cfg(tmp_path, tmp_path / "out", **bad)
