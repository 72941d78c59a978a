"""The shards folder as vtt-prep writes it: a local path or a URL (s3://bucket/prefix, any fsspec scheme).

Every write vtt-prep makes goes through the few calls here, and each is atomic on both kinds of folder, so
the commit protocol (shards/ledger.py: the ledger's create-if-absent is the only commit point) needs no
rename and holds on object storage:
- `publish(tmp, name)`: a finished tar. Local: fsync'd temp file renamed into place. URL: one upload of
  the local temp file (a PUT, or a multipart upload for large tars; either appears whole or not at all),
  then the temp file goes. Until the ledger commit lists it, the object is a leftover for reconcile.
- `put_bytes(name, data)`: index.json and report.json. Local: atomic_write_bytes. URL: one PUT.
- `delete(name)`: after the commit that stopped listing it.
Temp tars of a remote folder are written in a local scratch folder named after the URL
($TMPDIR/vtt-prep-scratch/<hash>), so the next run for that URL finds and removes a crashed run's.

Costs: `listing` = one listing request per ~1000 objects (local: one scandir); the others one request each.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import filelock

from .format import LOCK_FILE, TMP_PREFIX, atomic_write_bytes, fsync_dir
from .storage import StorageError, Store, _problem, is_url, op_timeout, retry
from .store import LocalStore, LockHeld, ObjectStore, RemoteLock


class OutFolder:
    """One shards folder for writing (and the reads vtt-prep makes of it)."""

    def __init__(self, location: str | os.PathLike, options: dict | None = None):
        self.store = Store.of(location, options)
        self.remote = self.store.remote
        self.root = self.store.root
        self.path = None if self.remote else Path(self.root)   # the local folder, None for a URL

    def __str__(self) -> str:
        return self.root

    def join(self, name: str) -> str:
        return self.store.join(name)

    def ledger_store(self):
        return ObjectStore(self.store) if self.remote else LocalStore(self.root)

    # ---------------------------------------------------------------- before any work

    def prepare(self) -> None:
        """Create the folder (local, with its parents; on object storage the first upload makes the prefix)
        and make sure files can be written in it. A folder that cannot be made or written (a read-only
        or pseudo filesystem, no permission) is a StorageError naming it, and the folders made for it are
        removed again. Cost: one empty file created and deleted."""
        if self.remote:
            return
        made = [p for p in (self.path, *self.path.parents) if not os.path.lexists(p)]  # deepest first
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "write-check-", dir=self.path)
            os.close(fd)
            Path(probe).unlink(missing_ok=True)  # a running run's reconcile may have taken it
        except OSError as e:
            for p in made:
                try:
                    p.rmdir()
                except OSError:
                    pass
            what = "cannot write in it" if self.path not in made else "cannot create it"
            raise StorageError(f"shards folder {self.path}: {what} ({e.strerror or e})") from None

    def check(self) -> None:
        """A URL folder can be reached (scheme installed, endpoint up, the bucket exists, credentials work),
        else StorageError naming the URL and the problem. Local: nothing to check. Cost: two requests."""
        if not self.remote:
            return
        fs = self.store.fs()
        try:
            fs.ls(self.root, refresh=True)  # exists() would answer False for a dead endpoint; ls says why
        except FileNotFoundError:
            pass  # an empty prefix is fine (the first upload creates it); a missing bucket is not:
        except Exception as e:
            raise StorageError(f"{self.root}: {_problem(e)}") from e
        self.store._check_bucket(fs)

    @contextmanager
    def lock(self, break_lock: bool = False):
        """The single-writer lock: a file lock locally (released when the process dies), a lock object with
        a heartbeat on a URL (shards/store.py RemoteLock; a dead run's is broken only with `break_lock`)."""
        if self.remote:
            with RemoteLock(self.store, break_lock=break_lock):
                yield
            return
        path = self.path / LOCK_FILE
        lock = filelock.FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise LockHeld(f"another vtt-prep run holds {path}; wait for it to finish "
                           f"(the lock goes away with its process)") from None
        try:
            yield
        finally:
            lock.release()

    # ---------------------------------------------------------------- reads

    def listing(self, pattern: str = "*") -> dict[str, int]:
        """name -> size of the files (objects) directly in the folder matching `pattern`. One listing."""
        if not self.remote:
            if not self.path.is_dir():
                return {}
            return {p.name: p.stat().st_size for p in self.path.glob(pattern) if p.is_file()}
        return {Path(p).name: int(i["size"]) for p, i in self.store._listing().items()
                if fnmatch.fnmatch(Path(p).name, pattern)}

    def read_bytes(self, name: str) -> bytes:
        """FileNotFoundError when absent."""
        if not self.remote:
            return (self.path / name).read_bytes()
        fs, path = self.store.fs(), self.join(name)
        return retry(lambda: fs.cat_file(path, timeout=op_timeout()), path)

    def open(self, name: str, size: int | None = None) -> BinaryIO:
        return self.store.open(name, size)

    # ---------------------------------------------------------------- writes (each atomic)

    def scratch(self) -> Path:
        """Where temp tars are written: the folder itself (local), else a local folder named after the URL."""
        if not self.remote:
            return self.path
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        d = Path(tempfile.gettempdir()) / "vtt-prep-scratch" / digest
        d.mkdir(parents=True, exist_ok=True)
        return d

    def clean_scratch(self) -> list[str]:
        """Remove temp files a crashed run left (the caller holds the lock). Returns their names."""
        gone = sorted(p.name for p in self.scratch().glob(TMP_PREFIX + "*"))
        for n in gone:
            (self.scratch() / n).unlink(missing_ok=True)
        return gone

    def publish(self, tmp: Path, name: str) -> None:
        """Move the finished local temp file `tmp` to `name` in one atomic step."""
        if not self.remote:
            os.replace(tmp, self.path / name)
            fsync_dir(self.path)
            return
        fs, path = self.store.fs(), self.join(name)
        try:
            # retried: a repeated upload of the same bytes to an unlisted name is harmless
            size = Path(tmp).stat().st_size
            retry(lambda: fs.put_file(str(tmp), path, timeout=op_timeout(size)), path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_bytes(self, name: str, data: bytes) -> None:
        if not self.remote:
            atomic_write_bytes(self.path / name, data)
            return
        fs, path = self.store.fs(), self.join(name)
        retry(lambda: fs.pipe_file(path, data, timeout=op_timeout(len(data))), path)

    def delete(self, name: str) -> None:
        """Remove `name`; no error when it is already gone."""
        if not self.remote:
            (self.path / name).unlink(missing_ok=True)
            return
        fs, path = self.store.fs(), self.join(name)
        try:
            retry(lambda: fs.rm_file(path, timeout=op_timeout()), path)
        except FileNotFoundError:
            pass


def out_folder(location, options: dict | None = None) -> OutFolder:
    return location if isinstance(location, OutFolder) else OutFolder(location, options)


__all__ = ["OutFolder", "out_folder", "is_url"]
