"""Where a shards folder lives: a local path, or a URL (s3://bucket/prefix, gs://..., any fsspec scheme whose
filesystem is installed), and the few reads the trainer makes there.

A Store is one folder plus the fsspec storage options that reach it. Credentials and the endpoint come from
the standard places of each filesystem (for S3: AWS_* variables including AWS_ENDPOINT_URL, profiles,
instance roles) and from `options` (`--storage-option key=value`). Local folders keep plain `open`/`stat`.

Errors: a folder that cannot be reached at all (unknown scheme or filesystem not installed, unreachable
endpoint, missing bucket, no or wrong credentials, permission denied) is a StorageError: one line naming the
URL and the problem (the CLIs exit 2 on it). A network error while reading a shard is retried: the object
is reopened at the same offset with exponential backoff, at most READ_RETRIES times, then raised.

Costs: `sizes` lists the folder once (local: one stat per name; object stores: one listing request per
~1000 objects); `open` reads objects in READ_BLOCK ranged GETs, the next block fetched in the background
while this one is used (2 blocks of memory per open object), so seeking past a tar member costs a request
only when it leaves the cached blocks.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .format import ShardFormatError

log = logging.getLogger(__name__)

READ_BLOCK = 4 << 20  # bytes per ranged GET: a 512-byte tar header seek stays inside the cached block
# fsspec's "background" cache fetches the next block in a thread while this one is decoded (2 blocks of
# memory per open shard); "readahead" would wait for every GET
READ_CACHE = "background"
READ_RETRIES = 5  # a failed read is retried this often (backoff RETRY_BASE_S x 2^n, capped at RETRY_MAX_S)
RETRY_BASE_S = 0.5
RETRY_MAX_S = 8.0
# A deadline for each whole request vtt-prep makes (fsspec's `timeout=`: the call is cancelled and retried
# like a network error). A connection that a network cut left half-open can otherwise wait without end:
# aiohttp's read timeout only runs once the request is sent. Uploads get time for their size on top.
OP_TIMEOUT_S = 120.0
MIN_UPLOAD_BYTES_PER_S = 1e6


def op_timeout(nbytes: int = 0) -> float:
    """Seconds allowed for one request moving `nbytes` (read at call time: tests shorten OP_TIMEOUT_S)."""
    return OP_TIMEOUT_S + nbytes / MIN_UPLOAD_BYTES_PER_S


# not network trouble: retrying cannot help
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


class StorageError(ShardFormatError):
    """A folder URL that cannot be reached: scheme, endpoint, bucket, credentials or permissions."""


def is_url(folder: str | os.PathLike) -> bool:
    """True for `scheme://...` other than file:// (those are local paths)."""
    s = str(folder)
    return "://" in s and not s.startswith("file://")


def _local(folder: str | os.PathLike) -> str:
    s = str(folder)
    return str(Path(s[len("file://"):] if s.startswith("file://") else s).resolve())


def _problem(e: BaseException) -> str:
    """The user's problem in a few words, from what the filesystem raised."""
    name = type(e).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return (f"no credentials ({e}): set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance "
                "role, or --storage-option key=... --storage-option secret=...")
    if isinstance(e, PermissionError):
        return f"permission denied or wrong credentials ({e})"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(
            e, (ConnectionError, TimeoutError)):
        return f"endpoint unreachable ({e})"
    return f"{name}: {e}"


def parse_options(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` strings (`--storage-option`) -> fsspec storage options. `a.b=v` nests ({'a': {'b': v}},
    e.g. client_kwargs.region_name=eu-west-1); true/false become booleans and plain integers ints."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--storage-option {pair!r}: expected key=value, e.g. endpoint_url=http://host:9000")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        *parents, last = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


@dataclass(frozen=True)
class Store:
    """One shards folder. `root` is the resolved local path or the URL without a trailing slash; the
    options (credentials maybe) stay out of equality, hashing and repr."""
    root: str
    options: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, folder: str | os.PathLike, options: dict | None = None) -> Store:
        return cls(str(folder).rstrip("/") if is_url(folder) else _local(folder), dict(options or {}))

    @property
    def remote(self) -> bool:
        return is_url(self.root)

    def join(self, name: str) -> str:
        return f"{self.root}/{name}" if self.remote else os.path.join(self.root, name)

    def fs(self):
        """This process's fsspec filesystem for the URL (fsspec caches one per options and process, so a
        forked DataLoader worker makes its own). StorageError for a scheme with no installed filesystem."""
        # heavy: fsspec; vtt-prep --help stays light
        import fsspec
        protocol = self.root.split("://", 1)[0]
        try:
            return fsspec.filesystem(protocol, **self.options)
        except (ImportError, ValueError) as e:  # fsspec: "Protocol not known" / "Install s3fs to access S3"
            hint = "; pip install 'vtt[s3]'" if protocol in ("s3", "s3a") else ""
            raise StorageError(f"{self.root}: no filesystem for {protocol}:// ({e}{hint})") from e
        except TypeError as e:
            raise StorageError(f"{self.root}: bad storage option for {protocol}:// ({e})") from e

    # ------------------------------------------------------------ reads before any work (no retries)

    def read_bytes(self, name: str) -> bytes:
        """One small object (index.json). FileNotFoundError when the folder is reachable but has no such
        object; StorageError when the folder cannot be reached at all."""
        if not self.remote:
            return Path(self.join(name)).read_bytes()
        fs = self.fs()
        try:
            return fs.cat_file(self.join(name))
        except FileNotFoundError:
            self._check_bucket(fs)
            raise
        except Exception as e:
            raise StorageError(f"{self.root}: {_problem(e)}") from e

    def _check_bucket(self, fs) -> None:
        bucket = fs._strip_protocol(self.root).split("/", 1)[0]
        try:
            found = fs.exists(bucket)
        except Exception as e:
            raise StorageError(f"{self.root}: {_problem(e)}") from e
        if not found:
            raise StorageError(f"{self.root}: bucket {bucket!r} does not exist (or is not visible to these "
                               "credentials)")

    # ------------------------------------------------------------ reads during training (retried)

    def sizes(self, names: list[str] | tuple[str, ...]) -> dict[str, int | None]:
        """Size of each name, None when it is not there. Fresh every call (no cached listing)."""
        if not self.remote:
            out = {}
            for n in names:
                try:
                    out[n] = os.stat(self.join(n)).st_size
                except OSError:
                    out[n] = None
            return out
        listed = {Path(p).name: (int(i["size"]), _tag(i)) for p, i in self._listing().items()}
        return {n: listed[n][0] if n in listed else None for n in names}

    def stat(self, name: str) -> tuple[int, Any]:
        """(size, a tag that changes with the content: mtime or ETag); FileNotFoundError when gone."""
        if not self.remote:
            st = os.stat(self.join(name))
            return st.st_size, st.st_mtime
        fs = self.fs()
        fs.invalidate_cache(self.root)
        info = retry(lambda: fs.info(self.join(name)), self.join(name))
        return int(info["size"]), _tag(info)

    def names(self, pattern: str) -> list[str]:
        """Object names in the folder matching a glob pattern, sorted."""
        if not self.remote:
            return sorted(p.name for p in Path(self.root).glob(pattern))
        return sorted(n for n in (Path(p).name for p in self._listing()) if fnmatch.fnmatch(n, pattern))

    def _listing(self) -> dict[str, dict]:
        fs = self.fs()
        fs.invalidate_cache(self.root)
        try:
            entries = retry(lambda: fs.ls(self.root, detail=True, timeout=op_timeout()), self.root)
        except FileNotFoundError:
            return {}
        return {i["name"]: i for i in entries if i.get("type") == "file"}

    def open(self, name: str, size: int | None = None):
        """A seekable binary file: local `open`, or ranged reads with a read-ahead cache and retries."""
        if not self.remote:
            return open(self.join(name), "rb")
        return RetryingFile(self.fs(), self.join(name), size)

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.open(name) as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()


def _tag(info: dict) -> Any:
    for k in ("ETag", "etag", "generation", "mtime", "LastModified", "md5Hash"):
        if info.get(k) is not None:
            return str(info[k])
    return None


def retry(fn: Callable, what: str, retries: int | None = None):
    """fn() with bounded exponential backoff on network errors; permanent ones (gone, denied) raise at once."""
    retries = READ_RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return fn()
        except PERMANENT:
            raise
        except Exception as e:
            if attempt == retries or type(e).__name__ == "NoCredentialsError":
                # not an OSError: a reader must not count the shard as corrupt and skip it
                raise StorageError(f"{what}: {_problem(e)} (gave up after {attempt} retries)") from e
            wait = min(RETRY_BASE_S * 2 ** attempt, RETRY_MAX_S)
            log.warning("%s: %s: %s; retry %d/%d in %.1fs", what, type(e).__name__, e, attempt + 1, retries, wait)
            time.sleep(wait)


class RetryingFile:
    """A remote object read through fsspec (read-ahead cache of READ_BLOCK bytes): read/seek/tell for
    tarfile. A read that fails on the network reopens the object at the same offset and tries again."""

    def __init__(self, fs, path: str, size: int | None):
        self.fs, self.path, self.size, self.pos = fs, path, size, 0
        self.f = retry(self._open, path)

    def _open(self):
        kw = {"size": self.size} if self.size is not None else {}
        f = self.fs.open(self.path, "rb", block_size=READ_BLOCK, cache_type=READ_CACHE,
                         cache_options={"maxblocks": 2} if READ_CACHE == "background" else None, **kw)
        f.seek(self.pos)
        return f

    def read(self, n: int = -1) -> bytes:
        def once():
            if self.f is None:  # the last try broke the connection: start over at the same offset
                self.f = self._open()
            try:
                return self.f.read(n)
            except PERMANENT:
                raise
            except Exception:
                self._drop()
                raise
        data = retry(once, self.path)
        self.pos += len(data)
        return data

    def _drop(self) -> None:
        f, self.f = self.f, None
        try:
            f.close()
        except Exception:
            pass

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self.pos
        elif whence == 2:
            pos += self.size if self.size is not None else self.fs.size(self.path)
        self.pos = pos
        if self.f is not None:
            self.f.seek(pos)
        return pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self.f is not None:
            self._drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
