"""Where the ledger log lives: a five-method storage interface whose create-if-absent is the commit point.

Object stores have no atomic rename, but they have conditional writes: S3's PutObject with
`If-None-Match: *` creates a key only if it does not exist yet (412 otherwise; moto's server does the
same). So a ledger commit is "create the next numbered commit file"; the moment it exists, complete,
the commit happened, and a second writer that raced for the same number fails instead of overwriting.
LocalStore gives the same semantics on a filesystem: the bytes go to a temp file (fsynced), then
os.link(temp, name), which fails when `name` exists and makes it appear complete in one step.
ObjectStore implements the same methods on any fsspec URL (built from shards/storage.py's Store):
`names` = ListObjectsV2 under the prefix, `open` = GetObject, `put_if_absent` = PutObject(IfNoneMatch="*")
mapping 412 to CommitConflict, `delete` = DeleteObject, `remove_temp` = nothing (a PUT is atomic).
"""
from __future__ import annotations

import io
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Protocol

from . import storage
from .format import TMP_PREFIX, ShardFormatError, fsync_dir
from .storage import PERMANENT, StorageError, Store, _problem, is_url, retry

LEDGER_DIR = "_ledger"   # inside the shards folder


class CommitConflict(ShardFormatError):
    """The name already exists: another writer committed first (or the log is ahead of this state)."""


class LedgerStore(Protocol):
    def names(self) -> list[str]:
        """Every complete file of the log, sorted (temp files excluded). Cost: one listing."""

    def open(self, name: str) -> BinaryIO:
        """A binary reader of `name`; FileNotFoundError when it is gone (pruned meanwhile)."""

    def put_if_absent(self, name: str, data: bytes) -> None:
        """Create `name` with `data` in one step, or raise CommitConflict if it exists."""

    def delete(self, name: str) -> None:
        """Remove `name` (no error when it is already gone)."""

    def remove_temp(self) -> list[str]:
        """Delete what interrupted writes left behind; returns their names."""


class LocalStore:
    """The log as files in `folder/_ledger/`."""

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder) / LEDGER_DIR

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(n for n in os.listdir(self.root) if not n.startswith(TMP_PREFIX))

    def open(self, name: str) -> BinaryIO:
        return open(self.root / name, "rb")

    def put_if_absent(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, self.root / name)   # the commit point: fails if `name` exists
            except FileExistsError:
                raise CommitConflict(f"{self.root / name} already exists: another vtt-prep run committed "
                                     f"to this ledger meanwhile") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        fsync_dir(self.root)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def remove_temp(self) -> list[str]:
        if not self.root.is_dir():
            return []
        gone = sorted(n for n in os.listdir(self.root) if n.startswith(TMP_PREFIX))
        for n in gone:
            (self.root / n).unlink(missing_ok=True)
        return gone


class MemoryStore:
    """A store in a dict, with the same create-if-absent rule (benchmarks and unit tests of the log)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def names(self) -> list[str]:
        return sorted(self.files)

    def open(self, name: str) -> BinaryIO:
        if name not in self.files:
            raise FileNotFoundError(name)
        return io.BytesIO(self.files[name])

    def put_if_absent(self, name: str, data: bytes) -> None:
        if name in self.files:
            raise CommitConflict(f"{name} already exists")
        self.files[name] = bytes(data)

    def delete(self, name: str) -> None:
        self.files.pop(name, None)

    def remove_temp(self) -> list[str]:
        return []


class ObjectStore:
    """The log as objects under `URL/_ledger/`, through the same fsspec `Store` the readers use (so the
    same storage options and the same StorageError for an unreachable folder). The commit point is
    fsspec's exclusive write, `pipe_file(mode="create")`: on S3 a PutObject with If-None-Match: *, whose
    412 s3fs raises as FileExistsError. A PUT is atomic, so no temp object exists and remove_temp has
    nothing to do. Cost: names = one listing request per ~1000 objects; the others one request each."""

    def __init__(self, folder: Store):
        self.folder = folder
        self.root = folder.join(LEDGER_DIR)

    def _fs(self):
        return self.folder.fs()

    def names(self) -> list[str]:
        fs = self._fs()
        fs.invalidate_cache(self.root)
        try:
            entries = retry(lambda: fs.ls(self.root, detail=False, timeout=storage.op_timeout()), self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in (str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
                      if n and not n.startswith(TMP_PREFIX))

    def open(self, name: str) -> BinaryIO:
        fs, path = self._fs(), f"{self.root}/{name}"
        return io.BytesIO(retry(lambda: fs.cat_file(path, timeout=storage.op_timeout()), path))  # commit files are small; checkpoints read once

    def put_if_absent(self, name: str, data: bytes) -> None:
        """The conditional PUT, retried with backoff on network errors (storage.retry). A name found taken
        is read back: the same bytes mean an earlier try of ours landed and only its reply was lost (ours,
        or one of s3fs's own retries; commit files are deterministic and the writer holds the lock),
        anything else is a CommitConflict."""
        fs, path, data = self._fs(), f"{self.root}/{name}", bytes(data)

        def once():
            try:
                fs.pipe_file(path, data, mode="create", timeout=storage.op_timeout(len(data)))
            except FileExistsError:
                if fs.cat_file(path, timeout=storage.op_timeout()) != data:
                    raise CommitConflict(f"{path} already exists: another vtt-prep run committed to this "
                                         f"ledger meanwhile") from None
            except NotImplementedError as e:  # a StorageError is permanent: retry raises it at once
                raise StorageError(f"{self.folder.root}: this filesystem has no exclusive create, which the "
                                   f"ledger's commit needs ({e})") from e
        try:
            retry(once, path)
        except FileNotFoundError:
            self.folder._check_bucket(fs)  # StorageError naming a missing bucket
            raise

    def delete(self, name: str) -> None:
        fs, path = self._fs(), f"{self.root}/{name}"
        try:
            retry(lambda: fs.rm_file(path, timeout=storage.op_timeout()), path)
        except FileNotFoundError:
            pass

    def remove_temp(self) -> list[str]:
        return []


def store_for(folder: str | os.PathLike, options: dict | None = None) -> LedgerStore:
    """The store of a shards folder: LocalStore for a path, ObjectStore for a URL (s3://..., with the
    fsspec storage `options`)."""
    if is_url(folder):
        return ObjectStore(Store.of(folder, options))
    return LocalStore(folder)


def process_namespace() -> str | None:
    """This machine's boot and pid namespace: two processes with the same value see the same pids (a
    container on the same machine has another pid namespace, another machine another boot id)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux: no proof of death is possible, only a stale heartbeat
        return None


def owner_dead(owner: dict) -> bool:
    """True only when the lock's owner ran in our pid namespace and its pid no longer runs."""
    ns = process_namespace()
    if ns is None or owner.get("ns") != ns or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class LockHeld(ShardFormatError):
    """Another vtt-prep run holds the remote shards folder (or its lock is stale and --break-lock was not given)."""


class RemoteLock:
    """The writer's lock on a URL folder: one object `LOCK_NAME` created with If-None-Match: * (so two runs
    cannot both take it), holding the owner (host, pid, start) and a heartbeat time a background thread
    rewrites every `heartbeat_s` with If-Match on the last ETag (a broken-and-taken lock is noticed: `lost`).
    A lock whose heartbeat is older than `stale_s` belongs to a dead run; it is replaced only with
    `break_lock` (a conditional overwrite of exactly that object). A lock whose owner is provably dead,
    because it ran in this machine's process namespace and its pid is gone (the rerun after a kill -9 or
    a crash on the same machine), is replaced at once. Released (deleted) on exit.
    Cost: one PUT to take it, one per heartbeat, one GET + DELETE to release."""
    LOCK_NAME = ".vtt-prep.lock"

    def __init__(self, folder: Store, break_lock: bool = False, heartbeat_s: float = 10.0, stale_s: float = 120.0):
        self.folder, self.path = folder, folder.join(self.LOCK_NAME)
        self.break_lock, self.heartbeat_s, self.stale_s = break_lock, heartbeat_s, stale_s
        self.etag, self.lost, self.owner = None, False, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat": time.time()}, sort_keys=True).encode()

    def _put(self, **match) -> None:
        out = self.folder.fs().pipe_file(self.path, self._body(), timeout=storage.op_timeout(), **match)
        self.etag = (out or {}).get("ETag") or self.folder.fs().info(self.path).get("ETag")

    def __enter__(self) -> "RemoteLock":
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(), "ns": process_namespace()}
        try:
            self._put(mode="create")
        except FileExistsError:
            self._take_stale()
        except FileNotFoundError:
            self.folder._check_bucket(self.folder.fs())
            raise
        except PERMANENT:
            raise
        except Exception as e:
            raise StorageError(f"{self.path}: {_problem(e)}") from e
        self._thread.start()
        return self

    def _take_stale(self) -> None:
        fs = self.folder.fs()
        etag = fs.info(self.path, refresh=True).get("ETag")
        body = fs.cat_file(self.path)
        # empty: a local folder's lock file (filelock's, never JSON) copied up by a sync, held by no run
        held = json.loads(body) if body.strip() else {}
        o, age = held.get("owner") or {}, time.time() - float(held.get("heartbeat", 0))
        who = f"{o.get('host')} pid {o.get('pid')}, heartbeat {age:.0f} s ago"
        if body.strip() and not (owner_dead(o) or (age > self.stale_s and self.break_lock)):
            hint = (f"the heartbeat is older than {self.stale_s:.0f} s: if that run is dead, rerun with --break-lock"
                    if age > self.stale_s else "wait for it to finish")
            raise LockHeld(f"another vtt-prep run holds {self.path} ({who}); {hint}")
        try:
            self._put(IfMatch=etag)  # replaces exactly the stale lock; a run that took it meanwhile wins
        except OSError as e:
            raise LockHeld(f"{self.path}: another run took the stale lock meanwhile ({e})") from None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._put(IfMatch=self.etag)
            except OSError:  # 412: someone broke the lock; the ledger's create-if-absent still guards commits
                self.lost = True
                return
            except Exception:  # a network blip: the next beat tries again
                continue

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if not self.lost:
            try:
                self.folder.fs().rm_file(self.path)
            except FileNotFoundError:
                pass
