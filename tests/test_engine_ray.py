"""`vtt-prep extract --engine ray` on a real Ray: the same bytes, failures and faults as the local engine.

One local Ray cluster (2 CPUs) serves the module; each run is a real `vtt-prep` process that joins it with
--ray-address, as a driver on a cluster would. Faults are real: a worker process SIGKILLed by the ffprobe
it started, a node removed from a two-node cluster (slow), the driver SIGKILLed at a commit step.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from prep_helpers import (SIZE, calls, cfg, env, log_files, logging_ffmpeg, make_corpus, prep_cmd, read_back,
                          state_files)

from vtt.pipeline.config import ConfigError
from vtt.pipeline.faults import ENV as CRASH_ENV
from vtt.pipeline.run import run_extract
from vtt.pipeline.verify import verify_shards

ray = pytest.importorskip("ray")  # the test extra installs it; a bare install skips, not fails
cluster_utils = pytest.importorskip("ray.cluster_utils")

FLAGS = ["--num-frames", "4", "--size", f"{SIZE[0]}x{SIZE[1]}", "--resize", "stretch", "--shard-max-samples", "2",
         "-q"]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
N_VIDEOS = 7


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module: a head with 2 CPUs and a small object store."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 10**8})
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_videos):
    """N_VIDEOS clips, one of them a real damaged one (its decode makes ffmpeg print "[h264 @ 0x..] ..."
    complaints, recorded in the sample), and one corrupt file with a valid sidecar (fails in ffprobe:
    failure as data)."""
    data = make_corpus(tmp_path_factory.mktemp("ray") / "data", n=N_VIDEOS - 1)
    shutil.copy2(real_videos / "decord__corrupted.mp4", data / "corrupted.mp4")
    (data / "corrupted.json").write_text(json.dumps({"video_id": "corrupted", "description": "damaged"}))
    (data / "broken.mp4").write_bytes(b"not a video at all" * 50)
    (data / "broken.json").write_text(json.dumps({"video_id": "broken", "description": "corrupt"}))
    return data


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The local engine's shards for the corpus."""
    out = tmp_path_factory.mktemp("local") / "out"
    r = run_extract(cfg(corpus, out, shard_max_samples=2))
    assert r.videos_ok == N_VIDEOS and r.videos_failed == 1
    return out


def prep(data, out, *extra, address=None, env_extra=None, timeout=120):
    args = ["extract", str(data), str(out), *FLAGS, "--engine", "ray", *extra]
    if address:
        args += ["--ray-address", address]
    return subprocess.run(prep_cmd(*args), env={**env(), **RAY_ENV, **(env_extra or {})}, capture_output=True,
                          text=True, timeout=timeout)


def states(out) -> dict[str, bytes]:
    """state_files: shards and index byte for byte, the ledger rendered (ffmpeg's stderr in the damaged
    clip's sample and the broken file's failure record included: vtt normalises what it records)."""
    return state_files(out)


def logs(out) -> bytes:
    """log_files: the ledger's commits."""
    return json.dumps(log_files(out), sort_keys=True).encode()


def report_facts(out) -> dict:
    """report.json less what differs by nature between two runs (where they wrote, how long they took)."""
    r = json.loads((out / "report.json").read_bytes())
    return {k: v for k, v in r.items() if k not in ("out_dir", "seconds", "videos_per_s", "frames_per_s")}


@pytest.fixture(scope="module")
def ray_out(cluster, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-run") / "out"
    res = prep(corpus, out, address=cluster.address)
    assert res.returncode == 3, res.stderr[-3000:]  # one failed video
    return out


def test_ray_shards_index_and_report_equal_local(ray_out, reference):
    samples = read_back(reference)
    assert any("[h264]" in w for w in samples["corrupted"]["json"]["vtt"]["warnings"])  # ffmpeg's words recorded
    assert states(ray_out) == states(reference)
    assert logs(ray_out) == logs(reference)
    assert report_facts(ray_out) == report_facts(reference)
    assert verify_shards(ray_out).ok


def test_corrupt_video_fails_as_data_like_local(ray_out, reference):
    failed = report_facts(ray_out)["failed"]
    assert [f["source"] for f in failed] == ["broken.mp4"]
    assert failed == report_facts(reference)["failed"]
    assert failed[0]["class"] != "worker_lost" and "broken.mp4" in failed[0]["reason"]


def test_without_address_a_local_ray_is_started_and_stopped(corpus, reference, tmp_path):
    """No --ray-address: the driver starts a local Ray of --workers CPUs and stops it again on exit (no
    process of its group outlives it); the shards are the local engine's."""
    out = tmp_path / "out"
    proc = subprocess.Popen(prep_cmd("extract", str(corpus), str(out), *FLAGS, "--engine", "ray", "--workers", "2"),
                            env={**env(), **RAY_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert states(out) == states(reference)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("processes of the local Ray outlived vtt-prep")
        time.sleep(0.1)


def test_killed_worker_is_retried_and_nothing_is_duplicated(cluster, corpus, reference, tmp_path):
    """The third ffprobe call SIGKILLs the Ray worker process that started it (its parent): Ray runs the
    task again on a new worker; the shards equal the local run's, no sample twice, none missing."""
    marker = tmp_path / "killed"
    kill = (f'if [ "$TOOL" = ffprobe ] && [ "$(grep -c ^ffprobe "$LOG")" -ge 3 ] && mkdir "{marker}" 2>/dev/null; '
            f'then kill -9 $PPID; exit 1; fi')
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path, before=kill)
    out = tmp_path / "out"
    res = prep(corpus, out, "--ffmpeg", str(ffmpeg), "--ffprobe", str(ffprobe), address=cluster.address)
    assert res.returncode == 3, res.stderr[-3000:]
    assert marker.is_dir(), "the worker was never killed"
    probes = [c for c in calls(log) if c.startswith("ffprobe") and "-version" not in c]
    assert len(probes) > N_VIDEOS + 1, "the killed task was not run again"
    assert states(out) == states(reference)
    assert report_facts(out) == report_facts(reference)


def test_hung_ffmpeg_on_a_worker_is_killed_at_timeout(cluster, corpus, tmp_path):
    """One video's ffmpeg hangs (sleeps past --timeout): the worker kills it, the video fails with class
    timeout as data, the others are written."""
    hang = 'case "$*" in *v03.mp4*) [ "$TOOL" = ffmpeg ] && sleep 60 ;; esac'
    ffmpeg, ffprobe, _ = logging_ffmpeg(tmp_path, before=hang)
    t0 = time.monotonic()
    res = prep(corpus, tmp_path / "out", "--ffmpeg", str(ffmpeg), "--ffprobe", str(ffprobe), "--timeout", "2",
               address=cluster.address)
    assert res.returncode == 3, res.stderr[-3000:]
    assert time.monotonic() - t0 < 40
    failed = {f["source"]: f["class"] for f in report_facts(tmp_path / "out")["failed"]}
    assert failed == {"broken.mp4": "probe_failed", "v03.mp4": "timeout"}


def test_videos_and_shards_on_s3(cluster, corpus, tmp_path):
    """DATA and OUT on a real S3 server: the Ray workers download their videos themselves (the endpoint and
    keys travel in the tasks' storage options; the cluster's processes were started without them), the
    driver writes the shards into the bucket; the same bytes as the local engine from the same bucket. Then
    the same with the endpoint and keys in the driver's AWS_* variables only (forwarded to the workers)."""
    from s3_helpers import MotoServer, restore_env, s3, set_env, upload
    server = MotoServer().start()
    old = set_env(server)
    try:
        url = upload(corpus, "s3://vtt-in/data")
        s3().mkdir("vtt-out")
        opts = (f"endpoint_url={server.url}", "key=test", "secret=test")
        local = tmp_path / "local"
        run_extract(cfg(url, local, shard_max_samples=2, storage_options=opts))
        res = prep(url, "s3://vtt-out/shards", *[a for o in opts for a in ("--storage-option", o)],
                   address=cluster.address, env_extra=server.env())
        assert res.returncode == 3, res.stderr[-3000:]
        mirror = tmp_path / "from-s3"
        mirror.mkdir()
        for name in s3().ls("vtt-out/shards"):
            if not name.endswith(("/_ledger", ".lock")):
                s3().get(name, str(mirror / name.rpartition("/")[2]), recursive=True)
        got = {k: v for k, v in states(mirror).items() if k.startswith("shard-") or k == "index.json"}
        want = {k: v for k, v in states(local).items() if k.startswith("shard-") or k == "index.json"}
        assert got == want and len(got) == 1 + (N_VIDEOS + 1) // 2
        # endpoint and keys in the driver's AWS_* variables only: they reach the workers (runtime_env)
        res = prep(url, tmp_path / "env-only", address=cluster.address, env_extra=server.env())
        assert res.returncode == 3, res.stderr[-3000:]
        got = {k: v for k, v in states(tmp_path / "env-only").items() if k.startswith("shard-") or k == "index.json"}
        assert got == want
    finally:
        restore_env(old)
        server.stop()


def test_driver_kill9_mid_run_then_local_rerun_finishes_identically(cluster, corpus, reference, tmp_path):
    """The --engine ray driver SIGKILLs itself right after its second ledger commit (pipeline/faults.py);
    the local engine finishes the job: the same shards, index, ledger and commit log as one clean run."""
    out = tmp_path / "out"
    res = prep(corpus, out, address=cluster.address, env_extra={CRASH_ENV: "ledger-written:2"})
    assert res.returncode == -signal.SIGKILL, f"not killed: rc={res.returncode} {res.stderr[-2000:]}"
    assert len(log_files(out)) == 2
    r = run_extract(cfg(corpus, out, shard_max_samples=2))
    assert r.videos_unchanged == 4 and r.videos_ok == N_VIDEOS - 4
    assert states(out) == states(reference)
    assert logs(out) == logs(reference)


def _one_error_line(res):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("vtt-prep: error: "), res.stderr[-3000:]
    return lines[0]


def test_unreachable_cluster_is_one_line_exit_2(corpus, tmp_path):
    t0 = time.monotonic()
    line = _one_error_line(prep(corpus, tmp_path / "out", address="127.0.0.1:9"))
    assert "Ray cluster 127.0.0.1:9: cannot connect" in line
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "out").exists(), "work began before the check"


def test_bad_engine_flags_are_exit_2(corpus, tmp_path):
    res = subprocess.run(prep_cmd("extract", str(corpus), str(tmp_path / "o"), "--ray-address", "auto"),
                         env=env(), capture_output=True, text=True, timeout=60)
    assert "needs --engine ray" in _one_error_line(res)
    res = prep(corpus, tmp_path / "o", address="not an address")
    assert "expected auto, HOST:PORT" in _one_error_line(res)


def test_nodes_without_ffmpeg_are_one_line_exit_2(cluster, corpus, tmp_path):
    res = prep(corpus, tmp_path / "out", "--ffmpeg", str(tmp_path / "no-ffmpeg"), address=cluster.address)
    line = _one_error_line(res)
    assert "Ray node" in line and "no-ffmpeg" in line
    assert not (tmp_path / "out").exists()


def test_node_check_names_an_unreadable_data_folder(cluster, tmp_path):
    """What a node reports when it cannot see a local folder or read a URL (run as a Ray task; the URL's
    bucket is missing on a real S3 server)."""
    from s3_helpers import MotoServer

    from vtt.pipeline.engine_ray import node_report
    spec = cfg(tmp_path, tmp_path / "o").frame_spec()
    server = MotoServer().start()
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        probe = ray.remote(node_report).options(num_cpus=0)
        local, url = ray.get([probe.remote(spec, str(tmp_path / "absent"), {}),
                              probe.remote(spec, "s3://no-bucket/videos", {"endpoint_url": server.url,
                                                                           "key": "k", "secret": "s"})])
    finally:
        ray.shutdown()
        server.stop()
    assert "absent is not there" in local["problem"] and local["ffmpeg"].startswith("ffmpeg version")
    assert url["problem"].startswith("cannot read the data folder: s3://no-bucket/videos"), url


def test_missing_ray_is_config_error_naming_the_extra(corpus, tmp_path, monkeypatch):
    """`import ray` failing (sys.modules[name] = None makes the import system raise ImportError)."""
    from vtt.pipeline.engine_ray import missing_ray_message
    assert "pip install -e .[ray]" in missing_ray_message(ImportError("No module named 'ray'"))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install -e \.\[ray\]"):
        run_extract(cfg(corpus, tmp_path / "out", engine="ray"))
    assert not (tmp_path / "out").exists()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: parent of each)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rpartition(")")[2].split()[1])
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        top = todo.pop()
        kids = [p for p, pp in parent.items() if pp == top]
        out += kids
        todo += kids
    return out


@pytest.mark.slow
def test_node_removed_mid_run_output_is_identical(corpus, reference, tmp_path):
    """Two one-CPU nodes (the head has none); once 3 videos were probed one node dies with all its processes:
    its tasks run again on the other node (Ray notices a dead node after 2.5-14 s) and the shards equal
    the local run's."""
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 10**8})
    try:
        nodes = [c.add_node(num_cpus=1, object_store_memory=10**8) for _ in range(2)]
        c.wait_for_nodes()
        slow = ('case "$*" in *-version*) ;; *) sleep 0.4 ;; esac')
        ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path, before=slow)
        out = tmp_path / "out"
        args = ["extract", str(corpus), str(out), *FLAGS, "--engine", "ray", "--ray-address", c.address,
                "--ffmpeg", str(ffmpeg), "--ffprobe", str(ffprobe)]
        proc = subprocess.Popen(prep_cmd(*args), env={**env(), **RAY_ENV}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while len([x for x in calls(log) if x.startswith("ffprobe") and "-version" not in x]) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        doomed = _descendants(nodes[0].all_processes["raylet"][0].process.pid)
        c.remove_node(nodes[0], allow_graceful=False)
        for pid in doomed:  # the machine is gone: its workers (and their ffmpeg) too, not only the raylet
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 3, err[-3000:]
    finally:
        c.shutdown()
    probes = [x for x in calls(log) if x.startswith("ffprobe") and "-version" not in x]
    assert len(probes) > N_VIDEOS + 1, "no task of the removed node was run again"
    assert states(out) == states(reference)
    assert report_facts(out) == report_facts(reference)
