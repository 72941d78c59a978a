"""The ledger's commit log on object storage: ObjectStore (shards/store.py) against a real S3-compatible
server on localhost (moto's standalone server, its own process), reached through s3fs with AWS_ENDPOINT_URL
and dummy keys, as a user's S3 would be. The commit point is PutObject(If-None-Match: *)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3_helpers import MotoServer, restore_env, s3, set_env  # noqa: E402
from test_prep_ledger_log import _add_shard, check_store_contract  # noqa: E402

from vtt.shards import storage  # noqa: E402
from vtt.shards.ledger import Ledger, commit_name, ledger_bytes, read_ledger, write_ledger  # noqa: E402
from vtt.shards.storage import StorageError  # noqa: E402
from vtt.shards.store import CommitConflict, LocalStore, ObjectStore, store_for  # noqa: E402


@pytest.fixture(scope="module")
def server():
    srv = MotoServer().start()
    old = set_env(srv)
    fs = s3()
    fs.mkdir("vtt-out")
    yield srv
    restore_env(old)
    srv.stop()


def test_object_store_keeps_the_ledger_store_contract(server):
    store = store_for("s3://vtt-out/contract")
    assert isinstance(store, ObjectStore)
    check_store_contract(store)


def test_a_second_writer_racing_for_the_same_commit_loses_and_overwrites_nothing(server):
    a, b = store_for("s3://vtt-out/race"), store_for("s3://vtt-out/race")
    la, lb = Ledger(settings={"w": "a"}, settings_hash="a"), Ledger(settings={"w": "b"}, settings_hash="b")
    _add_shard(la, 0, 0, 2)
    _add_shard(lb, 0, 0, 3)
    assert write_ledger("s3://vtt-out/race", la, a)
    with pytest.raises(CommitConflict, match=r"s3://vtt-out/race/_ledger/0+\.json already exists"):
        write_ledger("s3://vtt-out/race", lb, b)
    assert ledger_bytes(read_ledger("s3://vtt-out/race")) == ledger_bytes(la)  # store_for from the URL alone


def test_the_log_on_s3_is_byte_identical_to_the_local_one(server, tmp_path):
    """The same commits through LocalStore and ObjectStore give the same files, names and bytes."""
    def build(store):
        ledger = Ledger(settings={"n": 1}, settings_hash="h")
        for i in range(3):
            _add_shard(ledger, i, 3 * i, 3)
            assert write_ledger("unused", ledger, store)
        return ledger
    local, remote = LocalStore(tmp_path), store_for("s3://vtt-out/same")
    build(local)
    build(remote)
    assert remote.names() == local.names() == [commit_name(i) for i in range(3)]
    for n in local.names():
        with local.open(n) as f, remote.open(n) as g:
            assert f.read() == g.read()


def test_unreachable_endpoint_or_missing_bucket_is_one_storage_error(server, monkeypatch):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        store_for("s3://no-such-bucket/x").put_if_absent(commit_name(0), b"{}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.01)
    dead = store_for("s3://vtt-out/x", {"endpoint_url": "http://127.0.0.1:9"})  # nothing listens on port 9
    with pytest.raises(StorageError, match=r"s3://vtt-out/x/_ledger: endpoint unreachable .*gave up"):
        dead.names()
    with pytest.raises(StorageError, match=r"s3://vtt-out/x/_ledger/0+\.json: endpoint unreachable"):
        dead.put_if_absent(commit_name(0), b"{}")


def test_remote_lock_refuses_a_second_run_and_breaks_a_stale_one_only_with_the_flag(server):
    import json
    import time

    from vtt.shards.storage import Store
    from vtt.shards.store import LockHeld, RemoteLock
    folder = Store.of("s3://vtt-out/locked")
    fs = s3()
    with RemoteLock(folder, heartbeat_s=0.2) as lock:
        first = json.loads(fs.cat_file(lock.path))
        with pytest.raises(LockHeld, match=r"another vtt-prep run holds s3://vtt-out/locked/.vtt-prep.lock "
                                           r"\(.+ pid \d+, heartbeat \d+ s ago\); wait for it to finish"):
            RemoteLock(folder, break_lock=True).__enter__()  # a fresh lock is never broken
        time.sleep(0.7)
        assert json.loads(fs.cat_file(lock.path))["heartbeat"] > first["heartbeat"]  # the heartbeat moves
    assert not fs.exists(lock.path)  # released
    dead = {"owner": {"host": "gone", "pid": 1, "start": 0}, "heartbeat": time.time() - 600}
    fs.pipe_file(lock.path, json.dumps(dead).encode())
    with pytest.raises(LockHeld, match=r"gone pid 1, heartbeat 600 s ago\); the heartbeat is older than 120 s: "
                                       r"if that run is dead, rerun with --break-lock"):
        RemoteLock(folder).__enter__()
    with RemoteLock(folder, break_lock=True) as lock:
        assert json.loads(fs.cat_file(lock.path))["owner"]["host"] != "gone"
    assert not fs.exists(lock.path)
