"""The ledger as a commit log (_ledger/): a commit holds what it changed, checkpoints, upgrade of ledger.json."""
import json
import shutil

import pytest
from prep_helpers import (add_video, calls, cfg, copy_corpus, logging_ffmpeg, make_corpus, snapshot,
                          state_files)

import vtt.shards.ledger as L
from vtt.pipeline.run import run_extract
from vtt.pipeline.verify import status_text, verify_shards
from vtt.shards.format import LEDGER_FILE, ShardFormatError
from vtt.shards.index import ShardEntry
from vtt.shards.ledger import (Fingerprint, Ledger, VideoRecord, checkpoint_name, commit_name, ledger_bytes,
                               read_ledger, write_ledger)
from vtt.shards.store import LEDGER_DIR, CommitConflict, LocalStore, MemoryStore


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("log")
    data = make_corpus(root / "data", n=4)
    out = root / "out"
    run_extract(cfg(data, out, shard_max_samples=1))
    return data, out


def _log(out):
    return LocalStore(out).names()


def _commit(out, n):
    return json.loads((out / LEDGER_DIR / commit_name(n)).read_text())


def test_each_commit_holds_only_what_it_changed(built, tmp_path):
    data, out = built
    assert not (out / LEDGER_FILE).exists()
    assert _log(out) == [commit_name(n) for n in range(4)]  # one commit per shard of one sample
    assert [len(_commit(out, n)["records_put"]) for n in range(4)] == [1, 1, 1, 1]
    data2, out2 = copy_corpus(data, tmp_path / "data"), tmp_path / "out"
    shutil.copytree(out, out2)
    add_video(data2, "v99.mp4")
    run_extract(cfg(data2, out2, shard_max_samples=1))
    new = _commit(out2, 4)
    assert _log(out2)[-1] == commit_name(4)
    assert [r["source"] for r in new["records_put"]] == ["v99.mp4"] and new["records_drop"] == []
    assert [s["url"] for s in new["shards_put"]] == ["shard-000004.tar"] and new["shards_drop"] == []
    assert len(read_ledger(out2).records) == 5 and verify_shards(out2).ok


def test_a_no_op_rerun_writes_no_commit(built, tmp_path):
    data, out = built
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    before = snapshot(out2)
    run_extract(cfg(data, out2, shard_max_samples=1))
    assert {k: v for k, v in snapshot(out2).items() if k != "report.json"} == \
        {k: v for k, v in before.items() if k != "report.json"}


def test_two_clean_runs_write_byte_identical_logs(built, tmp_path):
    data, out = built
    run_extract(cfg(data, tmp_path / "b", shard_max_samples=1, workers=2))
    for n in _log(out):
        assert (out / LEDGER_DIR / n).read_bytes() == (tmp_path / "b" / LEDGER_DIR / n).read_bytes()
    assert _log(out) == _log(tmp_path / "b")


def _as_legacy(out):
    """Turn a folder into what vtt before the log wrote: one ledger.json, no _ledger/."""
    data = ledger_bytes(read_ledger(out))
    assert json.loads(data)["ledger_version"] == 1 and "videos" in json.loads(data)
    shutil.rmtree(out / LEDGER_DIR)
    (out / LEDGER_FILE).write_bytes(data)
    return data


def test_a_legacy_ledger_json_folder_is_read_then_upgraded(built, tmp_path):
    data, out = built
    old = tmp_path / "old"
    shutil.copytree(out, old)
    _as_legacy(old)
    text, ok = status_text(old)
    assert ok and "ledger.json (the old single file" in text and verify_shards(old).ok   # read as is
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path)
    r = run_extract(cfg(data, old, shard_max_samples=1, ffmpeg=str(ffmpeg), ffprobe=str(ffprobe)))
    assert r.videos_unchanged == 4 and calls(log) == [] and any("upgraded" in w for w in r.warnings)
    assert not (old / LEDGER_FILE).exists() and _log(old) == [checkpoint_name(0)]
    assert state_files(old) == state_files(out)
    assert "ledger: _ledger/ at commit 0 (checkpoint 0 + 0 commits to replay)" in status_text(old)[0]
    add_video(copy_corpus(data, tmp_path / "data"), "v99.mp4")
    run_extract(cfg(tmp_path / "data", old, shard_max_samples=1))
    assert _log(old) == [checkpoint_name(0), commit_name(1)] and len(read_ledger(old).records) == 5


def test_upgrade_killed_before_ledger_json_was_removed(built, tmp_path):
    """Checkpoint 0 written (the upgrade's commit point), ledger.json still there: the log wins and
    the next run removes ledger.json; the state is the same."""
    data, out = built
    old = tmp_path / "old"
    shutil.copytree(out, old)
    legacy = _as_legacy(old)
    run_extract(cfg(data, old, shard_max_samples=1))
    (old / LEDGER_FILE).write_bytes(legacy)
    assert read_ledger(old).legacy is False
    r = run_extract(cfg(data, old, shard_max_samples=1))
    assert not (old / LEDGER_FILE).exists() and any(LEDGER_FILE in w for w in r.warnings)
    assert state_files(old) == state_files(out)


def _record(i, shard):
    return VideoRecord(source=f"v{i:07d}.mp4", status="ok", video_id=f"v{i}", key=f"k{i:07d}",
                       video=Fingerprint(100 + i, 1, "ab" * 32), settings_hash="s", ffmpeg_version="ff",
                       shard=shard, nframes=4, nbytes=1000)


def _add_shard(ledger, number, first, n):
    url = f"shard-{number:06d}.tar"
    for i in range(first, first + n):
        ledger.records[f"v{i:07d}.mp4"] = _record(i, url)
    ledger.shards[url] = ShardEntry(url, n, 1000 * n, "cd" * 32)


def test_commit_size_does_not_grow_with_the_ledger():
    sizes = []
    for total in (10, 5000):
        store = MemoryStore()
        ledger = Ledger(settings={"a": 1}, settings_hash="s")
        _add_shard(ledger, 0, 0, total)
        write_ledger("unused", ledger, store)
        L.write_checkpoint(ledger, store)
        _add_shard(ledger, 1, total, 10)
        assert write_ledger("unused", ledger, store)
        sizes.append(len(store.files[commit_name(1)]))
        assert ledger_bytes(read_ledger("unused", store)) == ledger_bytes(ledger)
    assert sizes[1] < 1.02 * sizes[0]  # (wider numbers only), while the state grew 500x


def test_checkpoints_and_pruning(monkeypatch, tmp_path):
    """Once the commits after a checkpoint hold half the state's records, a new checkpoint is written
    and older files are pruned; leftovers of a crash in between are ignored and cleaned."""
    monkeypatch.setattr(L, "CHECKPOINT_MIN_RECORDS", 0)
    store = LocalStore(tmp_path)
    ledger = Ledger(settings={"a": 1}, settings_hash="s")
    for n in range(6):
        _add_shard(ledger, n, 10 * n, 10)
        write_ledger(tmp_path, ledger)
    names = store.names()
    assert any(n.endswith(L.CHECKPOINT_SUFFIX) for n in names)
    newest = max(int(n[:20]) for n in names if n.endswith(L.CHECKPOINT_SUFFIX))
    assert all(int(n[:20]) >= newest for n in names)              # older files pruned
    assert ledger_bytes(read_ledger(tmp_path)) == ledger_bytes(ledger)
    store.put_if_absent(commit_name(0), b"stale")                  # a prune that was interrupted
    (tmp_path / LEDGER_DIR / ".tmp-xyz").write_bytes(b"half")
    back = read_ledger(tmp_path)
    assert ledger_bytes(back) == ledger_bytes(ledger)
    notes = L.clean_log(tmp_path, back)
    assert commit_name(0) not in store.names() and not list((tmp_path / LEDGER_DIR).glob(".tmp-*"))
    assert len(notes) == 2


def test_a_second_writer_of_the_same_commit_fails(tmp_path):
    ledger = Ledger(settings={}, settings_hash="s")
    _add_shard(ledger, 0, 0, 2)
    write_ledger(tmp_path, ledger)
    a, b = read_ledger(tmp_path), read_ledger(tmp_path)
    _add_shard(a, 1, 2, 1)
    _add_shard(b, 1, 5, 1)
    assert write_ledger(tmp_path, a)
    with pytest.raises(CommitConflict, match="another vtt-prep run"):
        write_ledger(tmp_path, b)
    assert ledger_bytes(read_ledger(tmp_path)) == ledger_bytes(a)


def test_a_missing_commit_is_a_clear_error(tmp_path):
    ledger = Ledger(settings={}, settings_hash="s")
    for n in range(3):
        _add_shard(ledger, n, n, 1)
        write_ledger(tmp_path, ledger)
    (tmp_path / LEDGER_DIR / commit_name(1)).unlink()
    with pytest.raises(ShardFormatError, match=f"{commit_name(1)} is missing"):
        read_ledger(tmp_path)


def test_an_inconsistent_commit_is_refused_before_it_is_written(tmp_path):
    ledger = Ledger(settings={}, settings_hash="s")
    _add_shard(ledger, 0, 0, 2)
    write_ledger(tmp_path, ledger)
    ledger.records["extra.mp4"] = _record(99, "shard-000000.tar")   # the shard still says 2 samples
    with pytest.raises(ShardFormatError, match="lists 2 samples, 3 videos"):
        write_ledger(tmp_path, ledger)
    assert LocalStore(tmp_path).names() == [commit_name(0)]


def test_verify_reports_a_stray_temp_file_of_the_log(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built[1], out)
    (out / LEDGER_DIR / ".tmp-abc").write_bytes(b"x")
    assert any("stray temp file" in p for p in verify_shards(out).problems)


def test_a_damaged_commit_file_is_a_clear_error(tmp_path):
    ledger = Ledger(settings={}, settings_hash="s")
    _add_shard(ledger, 0, 0, 1)
    write_ledger(tmp_path, ledger)
    (tmp_path / LEDGER_DIR / commit_name(0)).write_text('{"log_version": 2, "commit"')
    with pytest.raises(ShardFormatError, match=f"{LEDGER_DIR}: unreadable ledger"):
        read_ledger(tmp_path)


def test_compact_upgrades_a_legacy_folder(built, tmp_path):
    from vtt.pipeline.compact import compact_shards
    from vtt.pipeline.config import CompactConfig
    data, out = built
    old = tmp_path / "old"
    shutil.copytree(out, old)
    _as_legacy(old)
    before = {k for k in read_ledger(old).records}
    res = compact_shards(CompactConfig(old, retention_hours=0))
    assert len(res.merged) == 4 and not (old / LEDGER_FILE).exists()
    assert _log(old) == [checkpoint_name(0), commit_name(1)]
    assert set(read_ledger(old).records) == before and verify_shards(old).ok


def check_store_contract(store) -> None:
    """What the ledger needs from any LedgerStore (an S3 store must pass this too, against moto's server):
    create-if-absent is exclusive, names are sorted and exclude temp files, reads see whole files, delete
    is idempotent, and the ledger round-trips through it."""
    assert store.names() == []
    store.put_if_absent(commit_name(1), b"one")
    store.put_if_absent(commit_name(0), b"zero")
    with pytest.raises(CommitConflict):
        store.put_if_absent(commit_name(1), b"other")
    assert store.names() == [commit_name(0), commit_name(1)]
    with store.open(commit_name(1)) as f:
        assert f.read() == b"one"                  # the loser did not overwrite
    store.delete(commit_name(0))
    store.delete(commit_name(0))
    assert store.names() == [commit_name(1)]
    with pytest.raises(FileNotFoundError):
        store.open(commit_name(0))
    store.delete(commit_name(1))
    assert store.remove_temp() == []               # a completed put leaves no temp file
    ledger = Ledger(settings={"a": 1}, settings_hash="s")
    _add_shard(ledger, 0, 0, 3)
    assert write_ledger("unused", ledger, store)
    L.write_checkpoint(ledger, store)
    _add_shard(ledger, 1, 3, 2)
    assert write_ledger("unused", ledger, store)
    assert store.names() == [checkpoint_name(0), commit_name(1)]
    assert ledger_bytes(read_ledger("unused", store)) == ledger_bytes(ledger)


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_store_contract(kind, tmp_path):
    check_store_contract(MemoryStore() if kind == "memory" else LocalStore(tmp_path))
