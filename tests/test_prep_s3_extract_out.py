"""vtt-prep extract / compact / verify / status with the shards folder on object storage: a real S3-compatible
server on localhost (moto's standalone server, its own process), reached through s3fs with AWS_ENDPOINT_URL
and dummy keys, as a user's S3 would be. Object stores have no rename: a shard is one upload, and the ledger's
conditional create (If-None-Match: *) is the commit point. The same runs into a local folder are the
reference: shards, index and the ledger's commits must be byte-identical, also after a kill -9 anywhere."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from prep_helpers import add_video, cfg, env, log_files, prep_cmd, state_files  # noqa: E402
from s3_helpers import MotoServer, restore_env, s3, set_env, upload  # noqa: E402
from test_prep_crash import FLAGS, clean, corpus, crash_at, finish, incremental, slow_ffmpeg  # noqa: E402,F401

from vtt.pipeline.run import run_extract  # noqa: E402
from vtt.pipeline.verify import status_text, verify_shards  # noqa: E402
from vtt.shards.folder import OutFolder  # noqa: E402
from vtt.shards.store import LEDGER_DIR, RemoteLock  # noqa: E402

BUCKET = "vtt-out"


@pytest.fixture(scope="module")
def server():
    srv = MotoServer().start()
    old = set_env(srv)
    s3().mkdir(BUCKET)
    yield srv
    restore_env(old)
    srv.stop()


_n = [0]


@pytest.fixture
def url(server):
    _n[0] += 1
    return f"s3://{BUCKET}/t{_n[0]}/shards"


def download(url: str, local: Path) -> Path:
    """The bucket folder as a local one (shards, index, report, the ledger's log), to compare files."""
    fs = s3()
    prefix = fs._strip_protocol(url).rstrip("/") + "/"
    for path in fs.find(url):
        target = local / path[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(path))
    (local / LEDGER_DIR).mkdir(parents=True, exist_ok=True)
    return local


def upload_tree(local: Path, url: str) -> None:
    upload(local, url)
    upload(local / LEDGER_DIR, f"{url}/{LEDGER_DIR}")


def objects(url: str) -> dict[str, str]:
    """name -> ETag of every object under the folder (a write of any of them changes this)."""
    fs = s3()
    fs.invalidate_cache()
    return {p: i["ETag"] for p, i in fs.find(url, detail=True).items()}


def assert_same(url: str, reference: Path, local: Path, same_log: bool = True) -> None:
    """Same shards (live and retired), index, ledger state and commits as the local reference; no lock
    and no temp files left (neither in the bucket nor in the local scratch folder); verify passes."""
    got = download(url, local)
    assert state_files(got) == state_files(reference)
    if same_log:
        assert log_files(got) == log_files(reference)
    names = set(objects(url))
    assert not [n for n in names if ".tmp-" in n or n.endswith(RemoteLock.LOCK_NAME)], names
    assert not list(OutFolder(url).scratch().glob(".tmp-*"))
    result = verify_shards(url)
    assert result.ok, result.problems


def test_extract_into_a_bucket_equals_a_local_run_and_a_rerun_writes_nothing(clean, corpus, url, tmp_path):
    report = run_extract(cfg(corpus, url, shard_max_samples=1))
    assert report.exit_code == 0 and report.videos_ok == 6 and len(report.shards_written) == 6
    assert_same(url, clean, tmp_path / "got")
    text, ok = status_text(url)
    assert ok and f"shards folder {url}: 6 shards, 6 samples" in text and "last run: 6 written" in text, text
    before = {n: e for n, e in objects(url).items() if not n.endswith("report.json")}
    again = run_extract(cfg(corpus, url, shard_max_samples=1))
    assert again.exit_code == 0 and again.videos_unchanged == 6 and again.videos_ok == 0
    after = {n: e for n, e in objects(url).items() if not n.endswith("report.json")}
    assert after == before  # no shard, index or ledger object was written again


def test_an_incremental_run_on_a_bucket_equals_the_local_one(clean, incremental, url, tmp_path):
    """Deleted videos and a changed caption rewrite their shards (retired, kept), new videos add shards."""
    data, reference = incremental
    upload_tree(clean, url)
    report = run_extract(cfg(data, url, shard_max_samples=1))
    assert report.exit_code == 0 and report.shards_removed and report.videos_ok == 3
    assert_same(url, reference, tmp_path / "got")


def test_retention_0_deletes_replaced_shards_from_the_bucket(clean, incremental, url, tmp_path):
    data, _ = incremental
    local = tmp_path / "local"
    shutil.copytree(clean, local)
    upload_tree(clean, url)
    a = run_extract(cfg(data, local, shard_max_samples=1, retention_hours=0))
    b = run_extract(cfg(data, url, shard_max_samples=1, retention_hours=0))
    assert a.shards_removed == b.shards_removed and b.shards_removed
    gone = {f"{url}/{u}".split("://", 1)[1] for u in b.shards_removed}
    assert not gone & set(objects(url))
    assert state_files(download(url, tmp_path / "got")) == state_files(local)


@pytest.mark.parametrize("point", ["shard-renamed:2", "ledger-written:2",
                                   pytest.param("sample-written:3", marks=pytest.mark.slow)])
def test_sigkill_at_each_commit_step_of_a_fresh_run_into_a_bucket(clean, corpus, url, tmp_path, point):
    """shard-renamed = the tar is uploaded but no commit lists it; ledger-written = committed, index.json not
    yet rewritten. The kill leaves the lock object behind with a dead owner on this machine: the next run
    takes it without --break-lock."""
    crash_at(corpus, url, point)
    assert RemoteLock.LOCK_NAME in {n.rsplit("/", 1)[-1] for n in objects(url)}
    finish(corpus, url, [])
    assert_same(url, clean, tmp_path / "got")


@pytest.mark.parametrize("point", ["shard-renamed:1", "rewrite-committed",
                                   pytest.param("ledger-written:1", marks=pytest.mark.slow),
                                   pytest.param("shard-renamed:2", marks=pytest.mark.slow)])
def test_sigkill_at_each_step_of_a_rewrite_in_a_bucket(clean, incremental, url, tmp_path, point):
    data, reference = incremental
    upload_tree(clean, url)
    crash_at(data, url, point)
    finish(data, url, [])
    assert_same(url, reference, tmp_path / "got")


def test_kill9_from_outside_while_a_shard_is_being_written_then_rerun(clean, corpus, url, tmp_path):
    """A real kill while a temp tar is open (in the URL's local scratch folder): the rerun removes it and
    finishes; the bucket equals an uninterrupted run."""
    wrap = slow_ffmpeg(tmp_path)
    scratch = OutFolder(url).scratch()
    proc = subprocess.Popen(prep_cmd("extract", str(corpus), url, *FLAGS, "--workers", "2", *wrap),
                            env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hit, deadline = False, time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if list(scratch.glob(".tmp-shard-*")):
            os.killpg(proc.pid, signal.SIGKILL)
            hit = True
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert hit, f"no temp shard seen; vtt-prep exited {proc.returncode}: {proc.stderr.read()[-2000:]}"
    assert list(scratch.glob(".tmp-shard-*"))  # what the kill left
    finish(corpus, url, wrap)
    assert_same(url, clean, tmp_path / "got")


def test_a_second_run_on_the_same_bucket_folder_is_refused_with_exit_4(corpus, url, tmp_path):
    from vtt.shards.storage import Store
    with RemoteLock(Store.of(url)):
        for extra in ([], ["--break-lock"]):  # a live run's lock is never broken
            p = subprocess.run(prep_cmd("extract", str(corpus), url, *FLAGS, *extra), env=env(),
                               capture_output=True, text=True, timeout=120)
            assert p.returncode == 4, p.stderr
            assert f"another vtt-prep run holds {url}/.vtt-prep.lock" in p.stderr and "wait for it" in p.stderr
    assert not [n for n in objects(url) if n.endswith(".tar")]  # nothing was written


def test_compact_verify_and_status_on_a_bucket(clean, url, tmp_path):
    from vtt.pipeline.compact import compact_shards
    from vtt.pipeline.config import CompactConfig
    local = tmp_path / "local"
    shutil.copytree(clean, local)
    upload_tree(clean, url)
    a = compact_shards(CompactConfig(local, shard_max_samples=4, retention_hours=0))
    b = compact_shards(CompactConfig(url, shard_max_samples=4, retention_hours=0))
    assert a.text() == b.text() and len(b.written) == 2, b.text()
    assert state_files(download(url, tmp_path / "got")) == state_files(local)
    p = subprocess.run(prep_cmd("verify", url), env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "OK: 2 shards, 6 samples, 24 frames decoded, 0 problems" in p.stdout, p.stdout
    p = subprocess.run(prep_cmd("status", url), env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "2 shards, 6 samples" in p.stdout, p.stdout + p.stderr


def test_verify_on_a_bucket_finds_a_damaged_shard(clean, url):
    upload_tree(clean, url)
    fs = s3()
    name = f"{url}/shard-000002.tar"
    data = bytearray(fs.cat_file(name))
    data[-2000] ^= 0xFF  # same size, other bytes: only the checksum can tell
    fs.pipe_file(name, bytes(data))
    result = verify_shards(url)
    assert not result.ok and any("shard-000002.tar: sha256 differs" in p for p in result.problems), result.problems


@pytest.mark.parametrize("target, extra, words", [
    ("s3://no-such-bucket-vtt/shards", [], "bucket 'no-such-bucket-vtt' does not exist"),
    (f"s3://{BUCKET}/x", ["--storage-option", "endpoint_url=http://127.0.0.1:9"], "endpoint unreachable"),
])
def test_an_unreachable_shards_url_is_one_line_and_exit_2_before_any_work(server, corpus, tmp_path, target,
                                                                          extra, words):
    log = tmp_path / "ffmpeg.log"
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(f"#!/bin/sh\necho called >> {log}\nexec ffmpeg \"$@\"\n")
    wrapper.chmod(0o755)
    p = subprocess.run(prep_cmd("extract", str(corpus), target, "--ffmpeg", str(wrapper), *extra),
                       env={**env(), "AWS_MAX_ATTEMPTS": "1"}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and target in lines[0] and words in lines[0], p.stderr
    assert not log.exists()  # no ffmpeg ran


def test_a_new_video_adds_one_shard_to_the_bucket(corpus, url, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    assert run_extract(cfg(data, url)).videos_ok == 6
    add_video(data, "v99.mp4")
    report = run_extract(cfg(data, url))
    assert report.videos_ok == 1 and report.videos_unchanged == 6 and len(report.shards_written) == 1
    index = json.loads(s3().cat_file(f"{url}/index.json"))
    assert [e["nsamples"] for e in index["shardlist"]] == [6, 1]



def test_network_cuts_during_a_run_into_a_bucket_are_retried_and_lose_nothing(clean, corpus, url, tmp_path,
                                                                              server, monkeypatch, caplog):
    """The endpoint goes through a proxy that resets every connection and refuses new ones for 1.2 s, each
    time a new shard has just been uploaded: the moment of the commit's conditional PUT. The run retries with
    backoff, finishes with exit 0, and the bucket equals an uninterrupted run."""
    import logging
    import threading

    from s3_helpers import CuttableProxy
    from vtt.shards import storage
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: ours must do the work
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.2)
    monkeypatch.setattr(storage, "OP_TIMEOUT_S", 5.0)  # a request a cut left hanging is cancelled, retried
    caplog.set_level(logging.WARNING, "vtt.shards")
    proxy = CuttableProxy(server.port)
    wrap = slow_ffmpeg(tmp_path, delay=0.3)
    done, cuts = threading.Event(), []

    scratch = OutFolder(url).scratch()

    def cutter():  # a temp tar that goes away has just been uploaded: the commit's PUT comes next
        was_open = False
        while not done.is_set() and len(cuts) < 2:
            now_open = bool(list(scratch.glob(".tmp-shard-*")))
            if was_open and not now_open:
                proxy.cut(1.2)
                cuts.append(time.monotonic())
            was_open = now_open
            time.sleep(0.002)
    watcher = threading.Thread(target=cutter, daemon=True)
    watcher.start()
    try:
        report = run_extract(cfg(corpus, url, shard_max_samples=1, ffmpeg=wrap[1], ffprobe=wrap[3],
                                 storage_options=(f"endpoint_url={proxy.url}",)))
    finally:
        done.set()
        watcher.join()
        proxy.close()
    assert report.exit_code == 0 and report.videos_ok == 6, report.failed
    assert len(cuts) >= 2, cuts
    assert any("retry 1/" in r.getMessage() for r in caplog.records)
    assert_same(url, clean, tmp_path / "got")
