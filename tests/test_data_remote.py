"""Shards on object storage: a real S3-compatible server on localhost (moto's standalone server, its own
process) reached through s3fs with AWS_ENDPOINT_URL and dummy keys, exactly as a user's S3 would be."""
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3_helpers import CuttableProxy, MotoServer, restore_env, s3, set_env, upload  # noqa: E402
from train_helpers import PY, REPO, make_train_shards, metrics, train_env  # noqa: E402

from vtt.shards import storage  # noqa: E402
from vtt.shards.format import ShardFormatError  # noqa: E402
from vtt.trainer.data import source as data_source  # noqa: E402
from vtt.trainer.data.source import read_snapshot  # noqa: E402
from vtt.trainer.data.loader import (DataConfig, SnapshotError, StorageError, build_loader, pin_data,  # noqa: E402
                                     unpin)


@pytest.fixture(scope="module")
def server():
    srv = MotoServer().start()
    old = set_env(srv)
    yield srv
    restore_env(old)
    srv.stop()


@pytest.fixture(scope="module")
def shards(server, tmp_path_factory):
    """(local folder, the same files at s3://vtt-test/shards): 24 samples in 4 shards."""
    local = make_train_shards(tmp_path_factory.mktemp("remote") / "shards", n=24, per_shard=6)
    return local, upload(local, "s3://vtt-test/shards")


@pytest.fixture(autouse=True)
def _unpin():
    unpin()
    yield
    unpin()


def keys(loader, n=None):
    it = iter(loader)
    n = len(loader) if n is None else n
    return [[s["key"] for s in next(it)] for _ in range(n)]


def test_remote_loader_matches_local_with_workers_and_resumes_exactly(shards):
    local, url = shards
    kw = dict(num_workers=2, shuffle_buffer=8, interleave_shards=2, seed=3)
    want = keys(build_loader(DataConfig(str(local), **kw), list, micro_batch=2), 24)  # two epochs
    remote = build_loader(DataConfig(url, **kw), list, micro_batch=2)
    assert remote.src.path(0) == f"{url}/shard-000000.tar"
    it = iter(remote)
    first = [[s["key"] for s in next(it)] for _ in range(5)]
    assert first == want[:5]
    state = remote.state()
    assert "secret" not in str(state) and state["snapshot"]["folder"] == url
    del it
    resumed = build_loader(DataConfig(url, **kw), list, micro_batch=2, start=state)
    assert keys(resumed, 19) == want[5:]  # mid-epoch, on into the next epoch: none repeated, none skipped
    # the position is the stream's, not the storage's: a local run continues a remote one exactly
    assert keys(build_loader(DataConfig(str(local), **kw), list, micro_batch=2, start=state), 7) == want[5:12]


def test_remote_eval_fraction_split_matches_local(shards):
    local, url = shards
    a = keys(build_loader(DataConfig(str(local), eval_fraction=0.3), list, micro_batch=2, split="eval"))
    b = keys(build_loader(DataConfig(url, eval_fraction=0.3), list, micro_batch=2, split="eval"))
    assert a == b and 0 < len(a) < 12


def test_pinned_remote_snapshot_notices_a_gone_or_replaced_shard(shards):
    local, _ = shards
    url = upload(local, "s3://vtt-test/pinned")
    cfg = DataConfig(url)
    pin_data(cfg)
    fs = s3()
    fs.rm_file(f"{url}/shard-000001.tar")
    with pytest.raises(SnapshotError, match=r"s3://vtt-test/pinned/shard-000001.tar: gone"):
        build_loader(cfg, list, micro_batch=2)
    fs.pipe_file(f"{url}/shard-000001.tar", b"not the pinned tar")
    with pytest.raises(SnapshotError, match=r"shard-000001.tar: 18 bytes on disk, \d+ when pinned"):
        build_loader(cfg, list, micro_batch=2)


def test_remote_checksums_are_verified(shards):
    local, _ = shards
    url = upload(local, "s3://vtt-test/checksums")
    assert read_snapshot(url, verify_checksums=True).num_samples == 24
    tar = (local / "shard-000002.tar").read_bytes()
    s3().pipe_file(f"{url}/shard-000002.tar", tar[:-1] + bytes([tar[-1] ^ 1]))  # same size, one bit off
    data_source._VERIFIED.clear()  # verified once per process and snapshot: this is a new process's view
    with pytest.raises(ShardFormatError, match=r"s3://vtt-test/checksums/shard-000002.tar: sha256 differs"):
        read_snapshot(url, verify_checksums=True)


def test_a_network_cut_mid_read_is_retried_then_bounded(shards, server, monkeypatch, caplog):
    """A TCP proxy resets every connection and refuses new ones for a while: the reader reopens the object at
    the same offset with backoff and yields exactly the local batches; a longer outage than the retries
    allow stops the run with a StorageError (never a skipped 'corrupt' shard)."""
    local, url = shards
    proxy = CuttableProxy(server.port)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: ours must do the work
    monkeypatch.setattr(storage, "READ_BLOCK", 2048)  # a few requests per sample: the cut lands mid-sample
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.2)
    try:
        cfg = DataConfig(url, shuffle_buffer=0, storage_options={"endpoint_url": proxy.url})
        want = keys(build_loader(DataConfig(str(local), shuffle_buffer=0), list, micro_batch=2))
        it = iter(build_loader(cfg, list, micro_batch=2))
        got = [[s["key"] for s in next(it)] for _ in range(2)]
        caplog.set_level(logging.WARNING, "vtt.shards.storage")
        proxy.cut(1.5)
        got += [[s["key"] for s in next(it)] for _ in range(len(want) - 2)]
        assert got == want
        assert any("retry 1/5" in r.getMessage() for r in caplog.records)
        monkeypatch.setattr(storage, "READ_RETRIES", 2)
        it = iter(build_loader(cfg, list, micro_batch=2))
        next(it)
        proxy.cut(60)
        with pytest.raises(StorageError, match=r"s3://vtt-test/shards/shard-0000\d\d.tar: .*gave up after 2 retries"):
            for _ in it:
                pass
    finally:
        proxy.close()


def test_storage_options_parse_nested_typed_values():
    assert storage.parse_options(["endpoint_url=http://h:9000", "anon=true", "client_kwargs.region_name=eu-1",
                                  "max_concurrency=4"]) == {
        "endpoint_url": "http://h:9000", "anon": True, "client_kwargs": {"region_name": "eu-1"}, "max_concurrency": 4}
    with pytest.raises(ValueError, match="expected key=value"):
        storage.parse_options(["endpoint_url"])


# ---------------------------------------------------------------- the CLIs, as a user runs them

S2S = ["--model", "seq2seq", "--preset", "tiny", "--micro-batch", "2", "--log-every", "1", "--lr", "3e-3",
       "--warmup-steps", "1", "--keep-last", "0", "--set", "model.tgt_lang=fra_Latn"]


def cli(module: str, *args, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", module, *map(str, args)], cwd=REPO, env={**train_env(), **env},
                          capture_output=True, text=True, timeout=timeout)


def test_vtt_train_and_caption_read_s3_shards(shards, server, tmp_path):
    """Endpoint and keys from --storage-option alone (no AWS_* variables): they reach the DataLoader workers,
    and config.yaml keeps the endpoint but not the keys."""
    _, url = shards
    run = tmp_path / "run"
    opts = ["--storage-option", f"endpoint_url={server.url}", "--storage-option", "key=test",
            "--storage-option", "secret=test"]
    no_aws = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": "",
              "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    p = cli("vtt.trainer.cli", "--shards", url, "--eval-shards", url, "--output-dir", run, "--max-steps", 3,
            "--num-workers", 1, "--save-every", 2, *opts, *S2S, env=no_aws)
    assert p.returncode == 0, p.stderr[-3000:]
    train, evals = metrics(run)
    assert [x["step"] for x in train] == [1, 2, 3] and evals
    saved = (run / "config.yaml").read_text()
    assert f"endpoint_url: {server.url}" in saved and "secret: <redacted>" in saved and "key: <redacted>" in saved
    p = cli("vtt.trainer.tools.caption", run, url, "--limit", 2, "--json", "--max-new-tokens", 4, env=server.env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert [line.startswith('{"key": "clip-000') for line in p.stdout.splitlines()] == [True, True]


BAD = [("s3://no-such-bucket/shards", {}, r"bucket 'no-such-bucket' does not exist"),
       ("nosuch://host/shards", {}, r"no filesystem for nosuch://"),
       ("s3://vtt-test/shards", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, r"no credentials")]


@pytest.mark.parametrize("url,env,problem", BAD, ids=["missing-bucket", "unknown-scheme", "no-credentials"])
def test_unreachable_shards_url_fails_in_one_line_exit_2(shards, server, tmp_path, url, env, problem):
    env = {**server.env(), "HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true", **env}
    p = subprocess.run([PY, "-m", "vtt.trainer.cli", "--shards", url, "--output-dir", tmp_path / "run", *S2S],
                       cwd=REPO, env={k: v for k, v in {**train_env(), **env}.items() if v is not None},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vtt-train: error: {url}: "), p.stderr
    assert re.search(problem, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()  # before any work


def test_vtt_caption_unreachable_url_fails_in_one_line_exit_2(server, tmp_path):
    p = cli("vtt.trainer.tools.caption", tmp_path, "s3://no-such-bucket/shards", env=server.env(), timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip() == ("vtt-caption: error: s3://no-such-bucket/shards: bucket 'no-such-bucket' does not "
                                "exist (or is not visible to these credentials)")


def test_wrong_credentials_and_dead_endpoint_name_the_url(tmp_path, monkeypatch):
    """A server that checks keys (moto with authentication on) and a port nobody listens on."""
    auth = MotoServer()
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # inherited by the server process
    auth.start()
    monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    try:
        with pytest.raises(StorageError, match=r"^s3://vtt-test/shards: permission denied or wrong credentials"):
            build_loader(DataConfig("s3://vtt-test/shards", storage_options={"endpoint_url": auth.url}), list, 2)
    finally:
        auth.stop()
    with pytest.raises(StorageError, match=r"^s3://vtt-test/shards: endpoint unreachable"):
        build_loader(DataConfig("s3://vtt-test/shards", storage_options={"endpoint_url": auth.url}), list, 2)
