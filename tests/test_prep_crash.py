"""kill -9 a real `vtt-prep extract` part way; the rerun must equal an uninterrupted run.

Two kinds of kill: from outside while the run is busy (ffmpeg/ffprobe go through a wrapper that
sleeps a little, so "temp shard open" and "after n commits" are reliably reached; pool workers must
not outlive the main process), and the process SIGKILLing itself at exact steps of the commit
protocol (pipeline/faults.py), which an outside kill hits only by luck.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import time

import pytest
from prep_helpers import (add_video, age_retired, cfg, copy_corpus, edit_ledger, env, log_files, make_corpus, prep_cmd,
                          state_files)

from vtt.pipeline.faults import ENV
from vtt.pipeline.run import run_extract
from vtt.pipeline.verify import verify_shards
from vtt.pipeline.writer import ShardWriter
from vtt.shards.format import shard_name
from vtt.shards.ledger import read_ledger
from vtt.shards.store import LEDGER_DIR, LocalStore

FLAGS = ["--num-frames", "4", "--size", "96x32", "--resize", "stretch", "--shard-max-samples", "1", "-q"]


def slow_ffmpeg(folder, delay=0.15):
    paths = []
    for name in ("ffmpeg", "ffprobe"):
        w = folder / f"slow-{name}"
        w.write_text(f"#!/bin/sh\nsleep {delay}\nexec '{shutil.which(name)}' \"$@\"\n")
        w.chmod(w.stat().st_mode | stat.S_IXUSR)
        paths.append(str(w))
    return ["--ffmpeg", paths[0], "--ffprobe", paths[1]]


def _ledger_id(out):
    """The newest commit number in the ledger's log (a commit creates the next numbered file)."""
    names = [n for n in LocalStore(out).names() if n[:20].isdigit()]
    return max((int(n[:20]) for n in names), default=None)


class Commits:
    """Counts the ledger commits made since it was created: commit files are numbered consecutively, so the
    count is the newest number less the first one (two commits between two polls count as two)."""

    def __init__(self, out):
        self.out, self.first = out, _ledger_id(out)

    def __call__(self):
        now = _ledger_id(self.out)
        if now is None:
            return 0
        return now - self.first if self.first is not None else now + 1


KILL_POINTS = {
    "temp-shard-open": lambda out, commits: any(out.glob(".tmp-shard-*")),
    "after-2-commits": lambda out, commits: commits() >= 2,
}


def run_and_kill(data, out, point, workers, wrap, extra=()):
    """Start vtt-prep in its own process group, SIGKILL the main process at `point`."""
    commits = Commits(out)
    proc = subprocess.Popen(prep_cmd("extract", str(data), str(out), *FLAGS, "--workers", str(workers), *wrap,
                                     *extra),
                            env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hit, deadline = False, time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if out.is_dir() and KILL_POINTS[point](out, commits):
            os.kill(proc.pid, signal.SIGKILL)
            hit = True
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    _no_orphans(proc.pid)
    assert hit, f"{point} never reached; vtt-prep exited {proc.returncode}: {proc.stderr.read()[-2000:]}"


def _no_orphans(pgid):
    """Pool workers notice their parent's death and exit (they must not linger or hold anything)."""
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    pytest.fail("vtt-prep worker processes outlived the killed main process")


def finish(data, out, wrap, extra=()):
    res = subprocess.run(prep_cmd("extract", str(data), str(out), *FLAGS, "--workers", "2", *wrap, *extra),
                         env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


def assert_same(out, reference, same_log=True):
    """Same shards, index and ledger state; and (unless the test edited the ledger) the same commits."""
    assert not list(out.glob(".tmp-*")) and not list((out / LEDGER_DIR).glob(".tmp-*")), "temp files left behind"
    assert state_files(out) == state_files(reference)
    if same_log:
        assert log_files(out) == log_files(reference)
    assert verify_shards(out).ok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("crash") / "data", n=6)


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    run_extract(cfg(corpus, out, shard_max_samples=1))
    return out


@pytest.fixture(scope="module")
def incremental(corpus, clean, tmp_path_factory):
    """(data, reference): the corpus with 2 videos deleted, a caption changed, 2 videos added, and the
    shards an uninterrupted incremental run over `clean` gives. Deletions force shard rewrites."""
    root = tmp_path_factory.mktemp("incremental")
    data = copy_corpus(corpus, root / "data")
    for v in ("v01", "v04"):
        (data / f"{v}.mp4").unlink()
        (data / f"{v}.json").unlink()
    side = json.loads((data / "v02.json").read_text())
    (data / "v02.json").write_text(json.dumps({**side, "description": "changed"}))
    add_video(data, "v07.mp4")
    add_video(data, "v08.mp4")
    reference = root / "reference"
    shutil.copytree(clean, reference)
    r = run_extract(cfg(data, reference, shard_max_samples=1))
    assert r.shards_removed and r.videos_ok == 3
    return data, reference


@pytest.mark.parametrize("point, workers", [("temp-shard-open", 2), ("after-2-commits", 1)])
def test_kill9_during_fresh_run_then_rerun_equals_clean_run(corpus, clean, tmp_path, point, workers):
    wrap = slow_ffmpeg(tmp_path)
    out = tmp_path / "out"
    run_and_kill(corpus, out, point, workers, wrap)
    finish(corpus, out, wrap)
    assert_same(out, clean)


def test_kill9_twice_during_incremental_run_then_rerun(incremental, clean, tmp_path):
    """Kill the incremental run twice (at its first temp shard: a rewrite or the first new shard; then
    after two commits), then finish: the result equals the uninterrupted incremental run."""
    data, reference = incremental
    wrap = slow_ffmpeg(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    run_and_kill(data, out, "temp-shard-open", 2, wrap)
    run_and_kill(data, out, "after-2-commits", 2, wrap)
    finish(data, out, wrap)
    assert_same(out, reference)


def crash_at(data, out, point, extra=()):
    """Run vtt-prep so that it SIGKILLs itself at `point` (pipeline/faults.py); it must die there."""
    res = subprocess.run(prep_cmd("extract", str(data), str(out), *FLAGS, "--workers", "1", *extra),
                         env={**env(), ENV: point}, capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, f"{point} not reached: rc={res.returncode} {res.stderr[-2000:]}"


@pytest.mark.parametrize("point", ["sample-written:3", "shard-renamed:2", "ledger-written:2"])
def test_sigkill_at_each_commit_step_of_a_fresh_run(corpus, clean, tmp_path, point):
    out = tmp_path / "out"
    crash_at(corpus, out, point)
    finish(corpus, out, [])
    assert_same(out, clean)


@pytest.mark.parametrize("point", ["shard-renamed:1", "ledger-written:1", "rewrite-committed",
                                   "shard-renamed:2"])
def test_sigkill_at_each_step_of_a_rewrite(incremental, clean, tmp_path, point):
    """shard-renamed:1 = rewritten shard in place, not committed; ledger-written:1 = rewrite committed,
    index not yet; rewrite-committed = old shards not yet deleted; shard-renamed:2 = first new shard."""
    data, reference = incremental
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    crash_at(data, out, point)
    finish(data, out, [])
    assert_same(out, reference)


def test_crash_between_rename_and_commit_is_undone(corpus, clean, tmp_path):
    """The instant after a shard is renamed into place but before the ledger lists it (too short to hit
    with a real kill reliably): the unlisted shard, a half-written temp shard and a stale temp ledger
    are what such a crash leaves. The next run must remove them and complete the work."""
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    last = max(read_ledger(out).shards)

    def roll_back(ledger):  # to "last shard renamed, not committed": the ledger does not list it
        del ledger.shards[last]
        for s in [s for s, r in ledger.records.items() if r.shard == last]:
            del ledger.records[s]
    edit_ledger(out, roll_back)
    (out / LEDGER_DIR / ".tmp-commit-xyz").write_text("{half")
    (out / f".tmp-{shard_name(99)}").write_bytes(b"\0" * 700)
    writer = ShardWriter(out, 98, 10**9, 10)
    writer.add("zzz", [("zzz.txt", b"stray")])
    writer.close()  # a complete, renamed shard-000098.tar the ledger never heard of
    r = run_extract(cfg(corpus, out, shard_max_samples=1))
    assert r.videos_ok == 1 and any("shard-000098.tar" in w for w in r.warnings)
    assert_same(out, clean, same_log=False)  # the roll-back was one more commit


REBUILD = ("--rebuild", "--num-frames", "2")


@pytest.fixture(scope="module")
def rebuilt(corpus, clean, tmp_path_factory):
    """An uninterrupted --rebuild of `clean` with other settings."""
    out = tmp_path_factory.mktemp("rebuilt") / "out"
    shutil.copytree(clean, out)
    r = run_extract(cfg(corpus, out, shard_max_samples=1, num_frames=2, rebuild=True))
    assert r.videos_ok == 6 and len(r.shards_retired) == 6
    return out


def assert_old_state(out, clean):
    """The folder still serves the old set: ledger, index and every listed shard as they were."""
    old = state_files(clean)
    now = state_files(out)
    assert now["ledger"] == old["ledger"] and now["index.json"] == old["index.json"]
    assert all(now[u] == old[u] for u in old if u.startswith("shard-"))
    assert verify_shards(clean).ok


@pytest.mark.parametrize("point, switched", [("shard-renamed:2", False), ("ledger-written:1", True),
                                             ("rewrite-committed", True)])
def test_sigkill_during_rebuild_leaves_the_old_or_the_new_set(corpus, clean, rebuilt, tmp_path, point, switched):
    """shard-renamed:2 = two new shards on disk, none listed; ledger-written:1 = the switch committed,
    index.json not yet; rewrite-committed = switched, old shards just retired. Until the switch the
    old shards serve readers unchanged; after it the new set does, and the old files remain."""
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    crash_at(corpus, out, point, REBUILD)
    assert (read_ledger(out).settings["num_frames"] == 2) == switched
    if switched:  # a plain rerun with the new settings completes it; no second rebuild needed
        assert all((out / u).is_file() for u in state_files(clean) if u.startswith("shard-"))
        finish(corpus, out, [], ("--num-frames", "2"))
    else:
        assert_old_state(out, clean)
        finish(corpus, out, [], REBUILD)
    assert_same(out, rebuilt)


def test_kill9_during_rebuild_keeps_old_shards_serving(corpus, clean, rebuilt, tmp_path):
    wrap = slow_ffmpeg(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    run_and_kill(corpus, out, "temp-shard-open", 2, wrap, REBUILD)
    assert_old_state(out, clean)
    finish(corpus, out, wrap, REBUILD)
    assert_same(out, rebuilt)


def test_sigkill_while_deleting_retired_shards(incremental, clean, tmp_path):
    """Retired shards past retention: the ledger drops them first, then the files go; killed in
    between, the next run removes the files as leftovers."""
    data, reference = incremental
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    retired = age_retired(out)
    assert retired
    crash_at(data, out, "purge-committed")
    assert not read_ledger(out).retired
    finish(data, out, [])
    assert not any((out / u).exists() for u in retired)
    expected = {k: v for k, v in state_files(reference).items() if k not in retired}
    got = state_files(out)
    assert got.keys() == expected.keys() and got["index.json"] != expected["index.json"]  # no retired list
    assert {k: v for k, v in got.items() if k.startswith("shard-")} == \
        {k: v for k, v in expected.items() if k.startswith("shard-")}
    assert verify_shards(out).ok
