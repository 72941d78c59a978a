"""Deterministic, atomic tar shards.

Every member gets fixed mtime/uid/gid/mode/owner names, so the same samples give the same bytes. A shard
is written to a local `.tmp-` file (in the folder, or a URL folder's local scratch folder), fsynced and
published in one atomic step (a rename, or one upload: shards/folder.py); the writer returns each shard it
finishes, and the shard becomes live only when the caller commits it to the ledger (run.py's commit stage).
Shards are never modified: removing samples means copying the survivors into new shard numbers
(`copy_to_new_shards`).
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vtt.shards.folder import OutFolder, out_folder
from vtt.shards.format import TMP_PREFIX, Members, read_samples, sha256_file, shard_name
from vtt.shards.index import ShardEntry

from .faults import crash_point

TAR_FORMAT = tarfile.PAX_FORMAT
BLOCK = tarfile.BLOCKSIZE
# A closed tar ends with two zero blocks, padded up to a whole record; budget it when cutting.
TAR_TRAILER_MAX = tarfile.RECORDSIZE + 2 * BLOCK

def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def member_bytes(name: str, size: int) -> int:
    """Bytes a member takes in the tar: its header(s) (PAX adds one for long names) plus padded data."""
    if len(name.encode()) <= 100 and name.isascii():  # fits a plain ustar header: no PAX record
        header = BLOCK
    else:
        header = len(_tarinfo(name, size).tobuf(TAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    return header + -(-size // BLOCK) * BLOCK


def sample_bytes(members: Members) -> int:
    return sum(member_bytes(n, len(d)) for n, d in members)


@dataclass
class _OpenShard:
    number: int
    tmp: Path
    file: object
    tar: tarfile.TarFile
    nbytes: int = 0
    keys: list[str] = field(default_factory=list)


class ShardWriter:
    """Appends samples to shards numbered from `first_number`, cutting by bytes and sample count.

    The caller drives the cut: `close_if_full(members)` before each `add`, `close()` at the end; both
    return the shard they finished (published, not yet committed), so the caller commits it before the
    next sample is written. Nothing is opened until the first sample, so a run that writes nothing leaves
    no tar. `folder` is a path or an OutFolder (a URL's).
    """

    def __init__(self, folder: Path | OutFolder, first_number: int, max_bytes: int, max_samples: int):
        self.out, self.next_number = out_folder(folder), first_number
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self._open: _OpenShard | None = None

    def close_if_full(self, members: Members) -> ShardEntry | None:
        """The open shard, finished (as `close`) if `members` would take it past the byte or sample limit."""
        cur = self._open
        if cur and (len(cur.keys) >= self.max_samples
                    or cur.nbytes + sample_bytes(members) + TAR_TRAILER_MAX > self.max_bytes):
            return self.close()
        return None

    def add(self, key: str, members: Members) -> str:
        """Write one sample into the open shard (one is started if none); returns that shard's url. The
        limits are `close_if_full`'s to keep: call it first."""
        size = sample_bytes(members)
        cur = self._open or self._start()
        for name, data in members:
            cur.tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        cur.nbytes += size
        cur.keys.append(key)
        crash_point("sample-written")
        return shard_name(cur.number)

    @property
    def current_url(self) -> str | None:
        return shard_name(self._open.number) if self._open else None

    def _start(self) -> _OpenShard:
        number, self.next_number = self.next_number, self.next_number + 1
        tmp = self.out.scratch() / f"{TMP_PREFIX}{shard_name(number)}"
        f = open(tmp, "wb")
        self._open = _OpenShard(number, tmp, f, tarfile.open(fileobj=f, mode="w", format=TAR_FORMAT))
        return self._open

    def close(self) -> ShardEntry | None:
        """Finish the open shard (if any): fsync, publish (rename or upload); returns its entry for the
        caller to commit (None when no shard was open)."""
        cur, self._open = self._open, None
        if cur is None:
            return None
        cur.tar.close()
        cur.file.flush()
        os.fsync(cur.file.fileno())
        cur.file.close()
        name = shard_name(cur.number)
        entry = ShardEntry(name, len(cur.keys), cur.tmp.stat().st_size, sha256_file(cur.tmp))
        self.out.publish(cur.tmp, name)
        crash_point("shard-renamed")
        return entry

    def abort(self) -> None:
        """Drop the open shard's temp file (error path; a crash leaves it for the next run's cleanup)."""
        cur, self._open = self._open, None
        if cur is not None:
            cur.file.close()
            cur.tmp.unlink(missing_ok=True)


def copy_to_new_shards(folder: Path | OutFolder, urls: list[str], change: Callable[[str, Members], tuple[str, Members] | None],
                       first_number: int, shard_size: int, max_samples: int) -> tuple[list[tuple[str, str]], list]:
    """Copy the samples of the shards `urls` into new shards numbered from `first_number`, as `change(key,
    members)` says: None drops a sample, else (key, members) is written. Returns (moved: (old key, new url)
    per written sample, new entries).

    Nothing is committed here: the new shards stay unlisted (a crash leaves them to the next run's
    cleanup) until the caller switches the ledger to them."""
    out, written, moved = out_folder(folder), [], []
    writer = ShardWriter(out, first_number, shard_size, max_samples)
    try:
        for url in urls:
            with out.open(url) as f:
                for key, members in read_samples(f):  # one sample in memory at a time
                    new = change(key, members)
                    if new is None:
                        continue
                    done = writer.close_if_full(new[1])
                    if done is not None:
                        written.append(done)
                    moved.append((key, writer.add(*new)))
        last = writer.close()
        if last is not None:
            written.append(last)
    except BaseException:
        writer.abort()
        raise
    return moved, written
