"""vtt-prep extract end to end: real ffmpeg on tiny lavfi clips, real tars read back through WebDataset."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clips import read_counter
from prep_helpers import (FPS, add_video, calls, cfg, content, copy_corpus, live_shards, logging_ffmpeg,
                          make_corpus, read_back, snapshot, state_files)

from vtt.pipeline.rerun_plan import SettingsChanged
from vtt.pipeline.report import EXIT_FAILED_VIDEOS
from vtt.pipeline.run import LockBusy, run_extract
from vtt.pipeline.verify import verify_shards
from vtt.pipeline.writer import TAR_TRAILER_MAX, ShardWriter, sample_bytes
from vtt.shards.format import read_samples
from vtt.shards.index import check_index, read_index
from vtt.shards.ledger import read_ledger


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "data", n=4)


@pytest.fixture
def data(corpus, tmp_path):
    return copy_corpus(corpus, tmp_path / "data")


def test_extract_end_to_end_reads_back_through_webdataset(data, tmp_path):
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path)
    out = tmp_path / "shards"
    report = run_extract(cfg(data, out, ffmpeg=str(ffmpeg), ffprobe=str(ffprobe)))
    assert report.exit_code == 0 and report.videos_ok == 4 and report.frames == 16
    samples = read_back(out)
    assert sorted(samples) == ["v00", "v01", "v02", "v03"]
    s = samples["v02"]
    assert s["txt"] == "a clip called v02" and s["json"]["video_id"] == "v02"
    vtt = s["json"]["vtt"]
    assert vtt["source"] == "v02.mp4" and len(vtt["sha256"]) == 64 and vtt["settings"]["num_frames"] == 4
    assert vtt["sidecar_vs_probe"]["duration"]["agree"] and vtt["probe"]["width"] == 96
    assert "tags" not in vtt["probe"]
    frames = [s[f"{i:04d}.jpg"] for i in range(4)]
    # the frame counter burned into each frame is the frame shown at the recorded timestamp
    assert [read_counter(f) for f in frames] == [round(t * FPS) for t in vtt["timestamps"]]
    assert vtt["timestamps"] == sorted(vtt["timestamps"]) and len(set(vtt["timestamps"])) == 4
    assert check_index(out, checksums=True) == [] and read_index(out).num_samples == 4
    assert verify_shards(out).ok
    rep = json.loads((out / "report.json").read_text())
    assert rep["videos_ok"] == 4 and rep["frames_per_s"] > 0 and "extract" in rep["seconds"]
    assert not list(out.glob(".tmp-*"))
    # a no-op rerun starts no ffmpeg/ffprobe, rewrites nothing and costs a sliver of the full run
    before, n_calls = snapshot(out), len(calls(log))
    assert n_calls > 0
    again = run_extract(cfg(data, out, ffmpeg=str(ffmpeg), ffprobe=str(ffprobe)))
    assert again.videos_unchanged == 4 and again.videos_ok == 0 and again.exit_code == 0
    assert len(calls(log)) == n_calls
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "report.json"} == \
           {k: v for k, v in before.items() if k != "report.json"}
    assert again.seconds["total"] < 0.1 * report.seconds["total"]


def test_same_inputs_give_byte_identical_shards(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_extract(cfg(data, a, workers=2, shard_max_samples=3))
    run_extract(cfg(data, b, workers=1, shard_max_samples=3))
    assert state_files(a).keys() == {"shard-000000.tar", "shard-000001.tar", "index.json", "ledger"}
    assert state_files(a) == state_files(b)


def test_shards_cut_by_size_and_count(data, tmp_path):
    run_extract(cfg(data, tmp_path / "o1", shard_max_samples=3))
    assert [s.nsamples for s in read_index(tmp_path / "o1").shards] == [3, 1]
    sizes = [sample_bytes(m) for sh in sorted((tmp_path / "o1").glob("shard-*.tar")) for _, m in read_samples(sh)]
    limit = 2 * min(sizes) + TAR_TRAILER_MAX - 1  # one sample always fits, two never do
    assert max(sizes) + TAR_TRAILER_MAX <= limit
    run_extract(cfg(data, tmp_path / "o2", shard_size=limit))
    idx = read_index(tmp_path / "o2")
    assert [s.nsamples for s in idx.shards] == [1, 1, 1, 1]
    assert all(s.filesize <= limit for s in idx.shards)


def test_incremental_add_change_delete_touch(data, tmp_path):
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path)
    out = tmp_path / "out"
    mk = lambda d, o, **kw: cfg(d, o, ffmpeg=str(ffmpeg), ffprobe=str(ffprobe), shard_max_samples=2, **kw)  # noqa
    run_extract(mk(data, out))
    shards0 = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert sorted(shards0) == ["shard-000000.tar", "shard-000001.tar"]  # v00 v01 | v02 v03

    add_video(data, "v04.mp4")
    r = run_extract(mk(data, out))
    assert r.plan["new"] == ["v04.mp4"] and r.shards_written == ["shard-000002.tar"] and not r.shards_removed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[01].tar")} == shards0

    # touched but unchanged: costs a hash, not ffmpeg
    n = len(calls(log))
    os.utime(data / "v00.mp4")
    r = run_extract(mk(data, out))
    assert r.plan["unchanged"] and r.videos_ok == 0 and len(calls(log)) == n
    rec = read_ledger(out).records["v00.mp4"]
    assert rec.video.mtime_ns == (data / "v00.mp4").stat().st_mtime_ns

    # sidecars changed (caption; id + a duration that disagrees with the probe), a video's content
    # replaced, another deleted: only shards 0 and 1 are rewritten, ffmpeg runs for v02 alone
    side = json.loads((data / "v01.json").read_text())
    (data / "v01.json").write_text(json.dumps({**side, "description": "a new caption"}))
    side = json.loads((data / "v00.json").read_text())
    (data / "v00.json").write_text(json.dumps({**side, "video_id": "v00.renamed", "duration": 9.0}))
    add_video(data, "v02.mp4", seconds=1.5)
    (data / "v03.mp4").unlink()
    (data / "v03.json").unlink()
    n = len(calls(log))
    r = run_extract(mk(data, out))
    assert sorted(r.plan["changed"]) == ["v00.mp4", "v01.mp4", "v02.mp4"] and r.plan["deleted"] == ["v03.mp4"]
    assert sorted(r.shards_removed) == ["shard-000000.tar", "shard-000001.tar"]
    assert "shard-000002.tar" not in r.shards_removed
    assert calls(log)[n:] and all("v02.mp4" in c for c in calls(log)[n:] if ".mp4" in c)
    got = read_back(out)
    renamed = [k for k in got if k.startswith("v00_renamed_")]
    assert sorted(got) == sorted(renamed + ["v01", "v02", "v04"]) and got["v01"]["txt"] == "a new caption"
    assert got["v02"]["json"]["duration"] == 1.5
    assert not got[renamed[0]]["json"]["vtt"]["sidecar_vs_probe"]["duration"]["agree"]
    assert verify_shards(out).ok
    # the incremental result holds exactly what a clean run over the same folder holds
    run_extract(mk(data, tmp_path / "clean"))
    assert content(out) == content(tmp_path / "clean")


def test_settings_change_refused_then_rebuild(data, tmp_path):
    out = tmp_path / "out"
    run_extract(cfg(data, out))
    before = snapshot(out)
    with pytest.raises(SettingsChanged, match="made with --num-frames 4; this run asks for --num-frames 2: .*--rebuild"):
        run_extract(cfg(data, out, num_frames=2))
    assert {k: v for k, v in snapshot(out).items() if k != ".vtt-prep.lock"} == \
           {k: v for k, v in before.items() if k != ".vtt-prep.lock"}
    old = (out / "shard-000000.tar").read_bytes()
    r = run_extract(cfg(data, out, num_frames=2, rebuild=True))
    assert r.videos_ok == 4 and r.samples_removed == 4
    assert all(len([k for k in s if k.endswith(".jpg")]) == 2 for s in read_back(out).values())
    # the new set has new numbers; the old shard is retired, still readable by a running trainer
    assert live_shards(out) == ["shard-000001.tar"] and r.shards_retired == ["shard-000000.tar"]
    assert (out / "shard-000000.tar").read_bytes() == old and verify_shards(out).ok
    run_extract(cfg(data, tmp_path / "clean", num_frames=2))
    assert (out / "shard-000001.tar").read_bytes() == (tmp_path / "clean" / "shard-000000.tar").read_bytes()


def test_dry_run_prints_plan_and_touches_nothing(data, tmp_path):
    out = tmp_path / "out"
    r = run_extract(cfg(data, out, dry_run=True))
    assert r.plan["new"] == ["v00.mp4", "v01.mp4", "v02.mp4", "v03.mp4"] and not out.exists()
    run_extract(cfg(data, out))
    (data / "v00.json").write_text('{"video_id": "v00", "description": "changed"}')
    (data / "v01.mp4").unlink()
    add_video(data, "v09.mp4")
    before = snapshot(out)
    r = run_extract(cfg(data, out, dry_run=True))
    assert (r.plan["new"], r.plan["changed"], r.plan["deleted"]) == (["v09.mp4"], ["v00.mp4"], ["v01.mp4"])
    assert r.plan["unchanged"] == ["v02.mp4", "v03.mp4"]
    assert snapshot(out) == before


def test_failures_are_recorded_run_continues_and_retried(data, tmp_path):
    (data / "zz").mkdir()
    (data / "zz" / "junk.mp4").write_bytes(os.urandom(3000))
    (data / "zz" / "junk.json").write_text('{"video_id": "junk", "description": "random bytes"}')
    (data / "zz" / "nosidecar.webm").write_bytes(b"x")
    (data / "zz" / "dup.mkv").write_bytes(b"x")
    (data / "zz" / "dup.json").write_text('{"video_id": "v01", "description": "same id as v01"}')
    out = tmp_path / "out"
    r = run_extract(cfg(data, out, workers=2))
    assert r.exit_code == EXIT_FAILED_VIDEOS and r.videos_ok == 4 and r.videos_failed == 3
    classes = {f["source"]: f["class"] for f in r.failed}
    assert classes == {"zz/junk.mp4": "probe_failed", "zz/nosidecar.webm": "sidecar_missing",
                       "zz/dup.mkv": "duplicate_video_id"}
    assert next(f for f in r.failed if f["source"] == "zz/junk.mp4")["stderr_tail"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["error_classes"] == {"duplicate_video_id": 1, "probe_failed": 1, "sidecar_missing": 1}
    assert sorted(read_back(out)) == ["v00", "v01", "v02", "v03"]
    # a fixed video is retried and goes in; the unchanged junk file is not tried again, but still
    # counts as failed (exit 3, listed as unchanged); the duplicate is re-checked (no ffmpeg needed)
    (data / "zz" / "nosidecar.webm").unlink()
    add_video(data, "zz/nosidecar.webm", codec="libvpx-vp9", description="now with sidecar")
    r = run_extract(cfg(data, out))
    assert r.plan["failed"] == ["zz/nosidecar.webm"] and r.plan["invalid"] == ["zz/dup.mkv"]
    assert r.plan["failed_unchanged"] == ["zz/junk.mp4"]
    assert r.videos_ok == 1 and r.videos_failed == 1 and r.videos_failed_unchanged == 1
    assert r.exit_code == EXIT_FAILED_VIDEOS
    assert {f["source"]: f.get("unchanged", False) for f in r.failed} == {"zz/dup.mkv": False, "zz/junk.mp4": True}
    assert read_back(out)["nosidecar"]["txt"] == "now with sidecar"


def test_all_failed_leaves_no_empty_tar(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.mp4").write_bytes(b"nope")
    (data / "a.json").write_text('{"video_id": "a", "description": "x"}')
    r = run_extract(cfg(data, tmp_path / "out"))
    assert r.exit_code == EXIT_FAILED_VIDEOS and not list((tmp_path / "out").glob("*.tar"))
    assert read_index(tmp_path / "out").shards == ()


def test_second_run_is_refused_while_one_holds_the_lock(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
        "print('held', flush=True); time.sleep(60)"), str(out / ".vtt-prep.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy, match="another vtt-prep run holds .*vtt-prep.lock"):
            run_extract(cfg(data, out))
        assert not list(out.glob("shard-*"))
    finally:
        holder.kill()
        holder.wait()
    t0 = time.time()
    assert run_extract(cfg(data, out)).videos_ok == 4  # the lock died with its holder
    assert time.time() - t0 < 30


def test_damaged_or_missing_shard_is_repaired_by_the_next_run(data, tmp_path):
    out = tmp_path / "out"
    run_extract(cfg(data, out, shard_max_samples=2))
    clean = content(out)
    (out / "shard-000000.tar").write_bytes((out / "shard-000000.tar").read_bytes()[:3000])
    r = run_extract(cfg(data, out, shard_max_samples=2))
    assert r.videos_ok == 2 and any("wrong size" in w for w in r.warnings)
    (out / "shard-000001.tar").unlink()
    r = run_extract(cfg(data, out, shard_max_samples=2))
    assert r.videos_ok == 2 and any("missing" in w for w in r.warnings)
    assert content(out) == clean and verify_shards(out).ok


def test_writer_hands_back_each_shard_it_finishes_before_the_next_sample(tmp_path):
    """The run loop commits a shard between close_if_full and the next add: the finished shard is already
    published (complete on disk) and the next sample opens the next number."""
    w = ShardWriter(tmp_path, 7, 10**9, 2)
    done = []
    for k in ("a", "b", "c"):
        m = [(f"{k}.txt", k.encode())]
        entry = w.close_if_full(m)
        if entry is not None:
            done.append(entry)
            assert [key for key, _ in read_samples(tmp_path / entry.url)] == ["a", "b"]
            assert not list(tmp_path.glob(".tmp-*"))  # nothing open while the caller commits
        assert w.add(k, m) == ("shard-000007.tar" if k != "c" else "shard-000008.tar")
    done.append(w.close())
    assert [(e.url, e.nsamples) for e in done] == [("shard-000007.tar", 2), ("shard-000008.tar", 1)]
    assert w.close() is None


def test_writer_accounts_bytes_exactly_and_is_deterministic(tmp_path):
    samples = [(k, [(f"{k}.json", b"{}"), (f"{k}.txt", "é".encode() * n), (f"{k}.0000.jpg", b"\xff" * 700 * n)])
               for n, k in enumerate(["a", "b" * 120, "c_d", "ü" * 60], start=1)]
    urls = []
    for folder in (tmp_path / "x", tmp_path / "y"):
        folder.mkdir()
        w = ShardWriter(folder, 7, 10**9, 100)
        urls = []
        for k, m in samples:
            assert w.close_if_full(m) is None  # all four fit in one shard
            urls.append(w.add(k, m))
        entry = w.close()
        total = sum(sample_bytes(m) for _, m in samples) + 1024
        assert entry.filesize == -(-total // 10240) * 10240 and entry.nsamples == len(samples)
        assert [(k, m) for k, m in read_samples(folder / entry.url)] == samples
    assert urls == ["shard-000007.tar"] * 4 and not list((tmp_path / "x").glob(".tmp-*"))
    assert (tmp_path / "x" / urls[0]).read_bytes() == (tmp_path / "y" / urls[0]).read_bytes()


def test_real_clips_all_in_shards_or_failed_with_a_class_and_no_gps(real_videos, tmp_path):
    from vtt.pipeline.frames import ERROR_CLASSES
    out = tmp_path / "out"
    r = run_extract(cfg(real_videos, out, allow_missing_sidecar=True, num_frames=2, size="32", resize="pad",
                        workers=2))
    n_videos = len([p for p in real_videos.iterdir() if p.suffix != ".md"])
    assert r.videos_ok + r.videos_failed == n_videos
    assert all(f["class"] in ERROR_CLASSES for f in r.failed), r.failed
    got = read_back(out)
    assert len(got) == r.videos_ok and verify_shards(out).ok
    fire = next(s for s in got.values() if s["json"]["vtt"]["source"] == "moviepy__fire2.mp4")
    assert fire["json"]["vtt"]["probe"]["rotation"] in (180, -180)
    for p in out.glob("shard-*.tar"):  # the GPS tag of fire2.mp4 (+54.1843-002.7189) never lands in a shard
        assert b"54.1843" not in p.read_bytes() and b"location" not in p.read_bytes()


def damaged_corpus(real_videos, data):
    """Real damaged clips whose decode makes ffmpeg print context-prefixed complaints ("[h264 @ 0x..] ..."),
    a text file named .mp4, and a sidecar whose duration disagrees with the probe."""
    data.mkdir(parents=True)
    for name, seconds in (("decord__corrupted.mp4", 5.0), ("DERIVED_truncated_smpte-2997_half.mp4", 10.0)):
        shutil.copy2(real_videos / name, data / name)
        (data / name).with_suffix(".json").write_text(json.dumps(
            {"video_id": Path(name).stem.replace("-", "_").replace(".", "_"), "description": name,
             "duration": seconds}))
    (data / "notes.mp4").write_text("this is a text file, not a video\n")
    (data / "notes.json").write_text(json.dumps({"video_id": "notes", "description": "text"}))
    return data


def test_damaged_real_clips_give_byte_identical_shards_ledger_and_index(real_videos, tmp_path):
    """ffmpeg's stderr carries per-process addresses ("[h264 @ 0x55eb..]") and temp folder names; what vtt
    records of it (sample warnings, failure records, report) is normalised, so two runs give the same bytes."""
    data = damaged_corpus(real_videos, tmp_path / "data")
    a, b = tmp_path / "a", tmp_path / "b"
    ra = run_extract(cfg(data, a, size="64", workers=2))
    rb = run_extract(cfg(data, b, size="64", workers=1))
    assert (rb.videos_ok, rb.videos_failed) == (ra.videos_ok, ra.videos_failed)
    assert ra.videos_ok == 2 and ra.videos_failed == 1
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in ("report.json",))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "report.json")
    assert any(f.name.startswith("shard-") for f in files) and Path("index.json") in files
    assert any(f.parts[0] == "_ledger" for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # the sample really records ffmpeg's complaint, the failure its stderr: the comparison is not vacuous
    warnings = read_back(a)["decord__corrupted"]["json"]["vtt"]["warnings"]
    assert any("decode problem" in w and "[h264]" in w for w in warnings), warnings
    failed = json.loads((a / "report.json").read_text())["failed"]
    assert failed[0]["stderr_tail"] and not re.search(r"0x[0-9a-f]{6}|vtt-frames-", failed[0]["stderr_tail"])
    nature = ("out_dir", "seconds", "videos_per_s", "frames_per_s")
    ja, jb = (json.loads((x / "report.json").read_text()) for x in (a, b))
    assert {k: v for k, v in ja.items() if k not in nature} == {k: v for k, v in jb.items() if k not in nature}
