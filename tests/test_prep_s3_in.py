"""vtt-prep extract with a URL data folder: videos and sidecars in a real S3-compatible server on localhost
(moto's standalone server, its own process), reached through s3fs with AWS_ENDPOINT_URL and dummy keys as a
user's S3 would be. The server's request recorder counts the GETs a rerun makes."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from prep_helpers import add_video, calls, cfg, logging_ffmpeg, make_corpus, prep_cmd, snapshot  # noqa: E402
from s3_helpers import MotoServer, restore_env, s3, set_env  # noqa: E402

from vtt.pipeline.config import ConfigError  # noqa: E402
from vtt.pipeline.run import run_extract  # noqa: E402
from vtt.shards.ledger import read_ledger  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ["MOTO_RECORDER_FILEPATH"] = str(tmp_path_factory.mktemp("moto") / "recording.jsonl")
    srv = MotoServer().start()
    old = set_env(srv)
    s3().mkdir("vtt-in")
    yield srv
    restore_env(old)
    srv.stop()
    os.environ.pop("MOTO_RECORDER_FILEPATH", None)


def _recorder(server, action: str) -> str:
    req = urllib.request.Request(f"{server.url}/moto-api/recorder/{action}", method="POST", data=b"")
    return urllib.request.urlopen(req, timeout=10).read().decode()


def object_gets(server, run) -> list[str]:
    """The object GETs (not listings) the server saw while `run()` ran."""
    _recorder(server, "reset-recording")
    _recorder(server, "start-recording")
    try:
        run()
    finally:
        _recorder(server, "stop-recording")
    log = [json.loads(line) for line in _recorder(server, "download-recording").splitlines() if line.strip()]
    return [e["url"] for e in log if e["method"] == "GET" and "list-type" not in e["url"]
            and "prefix=" not in e["url"]]


def put_folder(local: Path, url: str) -> None:
    fs = s3()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{url}/{p.relative_to(local).as_posix()}")


@pytest.fixture
def corpus(tmp_path):
    data = make_corpus(tmp_path / "data", n=3)
    (data / "sub").mkdir()
    add_video(data, "sub/w00.mp4")
    (data / ".hidden.mp4").write_bytes(b"not a video, and skipped")
    return data


def test_a_bucket_copy_gives_the_same_shards_and_a_rerun_reads_no_video(server, corpus, tmp_path, real_videos):
    url = "s3://vtt-in/same/videos"
    # a real damaged clip: ffmpeg's complaints about it (recorded in the sample) name no temp copy or address
    shutil.copy2(real_videos / "decord__corrupted.mp4", corpus / "sub" / "damaged.mp4")
    (corpus / "sub" / "damaged.json").write_text(json.dumps({"video_id": "damaged", "description": "damaged"}))
    put_folder(corpus, url)
    local = run_extract(cfg(corpus, tmp_path / "local"))
    remote = run_extract(cfg(url + "/", tmp_path / "remote"))
    assert local.exit_code == remote.exit_code == 0 and remote.videos_ok == 5
    a, b = snapshot(tmp_path / "local"), snapshot(tmp_path / "remote")
    tars = sorted(n for n in a if n.endswith(".tar"))
    assert tars and sorted(n for n in b if n.endswith(".tar")) == tars
    assert [n for n in tars + ["index.json"] if a[n][1] != b[n][1]] == []
    rec = read_ledger(tmp_path / "remote").records["sub/w00.mp4"]
    assert rec.video.etag and rec.video.mtime_ns == 0 and rec.sidecar.etag

    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path)
    reports = []
    gets = object_gets(server, lambda: reports.append(
        run_extract(cfg(url, tmp_path / "remote", ffmpeg=str(ffmpeg), ffprobe=str(ffprobe)))))
    assert reports[0].videos_unchanged == 5 and not calls(log)
    # unchanged size + ETag: neither a video nor a sidecar is read (the ledger has what the plan needs)
    assert [g for g in gets if ".mp4" in g or ".json" in g and "/vtt-in/" in g] == [], gets


def test_changed_video_sidecar_only_and_deleted_object(server, corpus, tmp_path):
    url = "s3://vtt-in/edits"
    put_folder(corpus, url)
    out = tmp_path / "shards"
    assert run_extract(cfg(url, out)).exit_code == 0
    fs = s3()
    (tmp_path / "other").mkdir()
    other = add_video(tmp_path / "other", "v01.mp4", seconds=1.5)
    fs.put_file(str(other), f"{url}/v01.mp4")                             # new content, new size and ETag
    fs.pipe_file(f"{url}/v02.json", json.dumps({"video_id": "v02", "description": "edited"}).encode())
    fs.rm_file(f"{url}/sub/w00.mp4")
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path)
    report = run_extract(cfg(url, out, ffmpeg=str(ffmpeg), ffprobe=str(ffprobe)))
    assert report.exit_code == 0
    assert sorted(report.plan["changed"]) == ["v01.mp4", "v02.mp4"] and report.plan["deleted"] == ["sub/w00.mp4"]
    assert report.plan["unchanged"] == ["v00.mp4"]
    assert [c for c in calls(log) if "v01" in c] and not [c for c in calls(log) if "v02" in c]  # sidecar: no ffmpeg
    ledger = read_ledger(out)
    assert sorted(ledger.records) == ["v00.mp4", "v01.mp4", "v02.mp4"]
    assert ledger.records["v01.mp4"].video.size == other.stat().st_size


def test_a_changed_video_with_an_unchanged_sidecar_reads_that_sidecar_only(server, corpus, tmp_path):
    """Discovery skips the unchanged sidecars; the one video that is extracted again gets its sidecar read
    (one GET) so that its new sample carries the sidecar's fields, as a first run's does."""
    url = "s3://vtt-in/lazy"
    put_folder(corpus, url)
    out, fresh = tmp_path / "shards", tmp_path / "fresh"
    assert run_extract(cfg(url, out)).exit_code == 0
    (tmp_path / "other").mkdir()
    other = add_video(tmp_path / "other", "v01.mp4", seconds=1.5)
    s3().put_file(str(other), f"{url}/v01.mp4")
    reports = []
    gets = object_gets(server, lambda: reports.append(run_extract(cfg(url, out))))
    assert reports[0].plan["changed"] == ["v01.mp4"] and reports[0].videos_ok == 1
    assert sorted(g.split("?")[0].rsplit("/", 1)[-1] for g in gets if ".json" in g and "/vtt-in/" in g) == ["v01.json"]
    assert run_extract(cfg(url, fresh)).exit_code == 0   # a first run over the same objects
    from prep_helpers import read_back
    assert read_back(out)["v01"]["json"] == read_back(fresh)["v01"]["json"]
    assert read_back(out)["v01"]["json"]["description"] == "a clip called v01"


def test_same_size_new_etag_is_hashed_and_kept_when_the_bytes_are_the_same(server, corpus, tmp_path):
    """Same size, other ETag (a multipart re-upload of the same bytes): the object is read and hashed, found
    unchanged (no ffmpeg), and its new ETag recorded. The record's ETag is made stale to get there."""
    url = "s3://vtt-in/touch"
    put_folder(corpus, url)
    out = tmp_path / "shards"
    assert run_extract(cfg(url, out)).exit_code == 0
    from dataclasses import replace
    from prep_helpers import edit_ledger
    edit_ledger(out, lambda led: led.records.update(
        {"v00.mp4": replace(led.records["v00.mp4"], video=replace(led.records["v00.mp4"].video, etag='"stale"'))}))
    reports = []
    gets = object_gets(server, lambda: reports.append(run_extract(cfg(url, out))))
    assert reports[0].videos_unchanged == 4 and reports[0].videos_ok == 0
    assert [g for g in gets if g.endswith("v00.mp4") or "v00.mp4?" in g]      # read to hash it
    assert not [g for g in gets if "v01.mp4" in g]
    assert read_ledger(out).records["v00.mp4"].video.etag != '"stale"'     # refreshed: no hash next time


def test_a_download_that_fails_is_a_failed_video(server, corpus, tmp_path):
    from vtt.pipeline.discover import discover
    from vtt.pipeline.task import Task, process_video
    url = "s3://vtt-in/gone"
    put_folder(corpus, url)
    c = cfg(url, tmp_path / "shards")
    v = next(v for v in discover(url) if v.source == "v00.mp4")
    s3().rm_file(f"{url}/v00.mp4")
    out = process_video(Task(v.path, v.source, v.key, v.meta, c.frame_spec(), c.output_settings(), "x"))
    assert out.error["class"] == "download_error" and f"{url}/v00.mp4" in out.error["reason"]


@pytest.mark.parametrize("url, env, words", [
    ("s3://no-such-bucket-vtt/videos", {}, "bucket 'no-such-bucket-vtt' does not exist"),
    ("s3://vtt-in/nothing-here", {}, "no such folder"),
    ("s3://vtt-in/x", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "endpoint unreachable"),
    ("nosuchscheme://b/videos", {}, "no filesystem for nosuchscheme://"),
    ("s3://vtt-in/x", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
     "no credentials"),
])
def test_bad_data_url_is_one_line_and_exit_2(server, tmp_path, url, env, words):
    run_env = {k: v for k, v in {**os.environ, **server.env(), **env, "AWS_MAX_ATTEMPTS": "1"}.items()
               if v is not None}
    p = subprocess.run(prep_cmd("extract", url, str(tmp_path / "out")), capture_output=True, text=True,
                       env=run_env, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and url.rstrip("/") in lines[0] and words in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_storage_options_reach_discovery_and_workers(server, corpus, tmp_path):
    """The endpoint only in --storage-option (AWS_ENDPOINT_URL pointing nowhere): listing, sidecars and the
    worker's download all use it."""
    url = "s3://vtt-in/opts"
    put_folder(corpus, url)
    with pytest.raises(ConfigError, match="expected key=value"):
        cfg(url, tmp_path / "o", storage_options=("oops",))
    old = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    try:
        report = run_extract(cfg(url, tmp_path / "o", workers=2, storage_options=(f"endpoint_url={server.url}",)))
    finally:
        os.environ["AWS_ENDPOINT_URL"] = old
    assert report.exit_code == 0 and report.videos_ok == 4


def test_fingerprint_etag_round_trips_and_local_records_keep_their_bytes():
    from vtt.shards.ledger import Fingerprint
    local, remote = Fingerprint(3, 17, "a" * 64), Fingerprint(3, 0, "a" * 64, '"e1"')
    assert local.to_json() == {"size": 3, "mtime_ns": 17, "sha256": "a" * 64}   # the old format, unchanged
    assert Fingerprint.from_json(local.to_json()) == local
    assert Fingerprint.from_json(json.loads(json.dumps(remote.to_json()))) == remote


def test_the_cli_takes_a_url_and_storage_options(server, corpus, tmp_path):
    from click.testing import CliRunner

    from vtt.pipeline.cli import main
    url = "s3://vtt-in/cli/videos/"
    put_folder(corpus, url.rstrip("/"))
    res = CliRunner().invoke(main, ["extract", url, str(tmp_path / "out"), "--workers", "1", "-q", "--size", "96x32",
                                    "--num-frames", "2", "--storage-option", f"endpoint_url={server.url}"])
    assert res.exit_code == 0, res.output
    assert sorted(read_ledger(tmp_path / "out").records) == ["sub/w00.mp4", "v00.mp4", "v01.mp4", "v02.mp4"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["data_dir"] == url.rstrip("/")
    ann = _annotated(corpus, tmp_path)
    s3().put_file(str(ann), "s3://vtt-in/cli/train.jsonl")
    res = CliRunner().invoke(main, ["extract", url, str(tmp_path / "ann-out"), "--workers", "1", "-q", "--size",
                                    "96x32", "--num-frames", "2", "--annotations", "s3://vtt-in/cli/train.jsonl"])
    assert res.exit_code == 3 and "FAILED gone.mp4#a3: [video_missing]" in res.output, res.output  # 3: some failed
    assert sorted(read_ledger(tmp_path / "ann-out").records) == ["gone.mp4#a3", "sub/w00.mp4#a2", "v00.mp4#a0",
                                                                     "v00.mp4#a1"]


def _annotated(corpus: Path, tmp_path: Path) -> Path:
    """A JSONL annotation file over the corpus: two conversations on v00 (one ffmpeg run, two samples),
    one caption on sub/w00, one entry naming a video that is not there."""
    def turn(q, a):
        return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
    entries = [{"id": "a0", "video": "v00.mp4", "conversations": turn("What moves?", "a square")},
               {"id": "a1", "video": "v00.mp4", "conversations": turn("Which colour?", "red")},
               {"id": "a2", "video": "sub/w00.mp4", "caption": "x", "description": "a clip in a folder"},
               {"id": "a3", "video": "gone.mp4", "description": "missing"}]
    ann = tmp_path / "ann" / "train.jsonl"
    ann.parent.mkdir()
    ann.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return ann


def test_annotations_with_a_url_data_folder_and_file_equal_the_local_run(server, corpus, tmp_path):
    """LLaVA-style annotation entries over videos in a bucket, the annotation file in the bucket too: the
    shards equal a local run's; a rerun reads the annotation file and no video; a missing entry video
    fails as data naming it; a missing annotation URL stops before any work."""
    url, ann = "s3://vtt-in/annotated/videos", _annotated(corpus, tmp_path)
    put_folder(corpus, url)
    s3().put_file(str(ann), "s3://vtt-in/annotated/train.jsonl")
    local = run_extract(cfg(corpus, tmp_path / "local", annotations=(ann,)))
    remote_cfg = cfg(url, tmp_path / "remote", annotations=("s3://vtt-in/annotated/train.jsonl",))
    remote = run_extract(remote_cfg)
    assert local.videos_ok == remote.videos_ok == 3 and len(remote.failed) == 1
    assert remote.failed[0]["class"] == "video_missing" and f"{url}/gone.mp4" in remote.failed[0]["reason"]
    a, b = snapshot(tmp_path / "local"), snapshot(tmp_path / "remote")
    tars = sorted(n for n in a if n.endswith(".tar"))
    assert tars and [n for n in tars + ["index.json"] if a.get(n, (0, 0))[1] != b.get(n, (0, 1))[1]] == []
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path)
    reports = []
    gets = object_gets(server, lambda: reports.append(
        run_extract(dataclasses.replace(remote_cfg, ffmpeg=str(ffmpeg), ffprobe=str(ffprobe)))))
    assert reports[0].videos_unchanged == 3 and not calls(log)
    assert [g.split("?")[0].rsplit("/", 1)[-1] for g in gets if "/vtt-in/" in g] == ["train.jsonl"], gets
    with pytest.raises(ConfigError, match="annotation file s3://vtt-in/annotated/nope.jsonl does not exist"):
        run_extract(cfg(url, tmp_path / "never", annotations=("s3://vtt-in/annotated/nope.jsonl",)))
    assert not (tmp_path / "never").exists()
