"""A real S3-compatible HTTP server on localhost (moto's standalone server, its own process) and s3fs
clients for it, configured the way a user configures S3: AWS_* variables, AWS_ENDPOINT_URL."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vtt.trainer.run.dist import free_port

KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer:
    """`moto_server -H 127.0.0.1 -p PORT` in a child process; start() waits until it answers."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto server exited with {self.proc.returncode}")
                time.sleep(0.1)
        raise RuntimeError(f"moto server on {self.url} did not answer in 30 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def env(self) -> dict:
        """The variables a user sets to reach this endpoint with (dummy) keys."""
        return {**KEYS, "AWS_ENDPOINT_URL": self.url}


def set_env(server: MotoServer) -> dict:
    """Point this process at the server (returns the previous values for restore_env)."""
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    # fsspec keeps one filesystem per options and process, and an endpoint taken from the environment is
    # not part of its cache key: a filesystem made for an earlier test's server would be reused.
    _forget_filesystems()
    return old


def _forget_filesystems() -> None:
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()


def restore_env(old: dict) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _forget_filesystems()


def s3() -> "s3fs.S3FileSystem":  # noqa: F821
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True)


def upload(folder: Path, url: str) -> str:
    """Copy a local shards folder to s3://bucket/prefix (bucket created when missing), as a user would."""
    fs = s3()
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for p in sorted(Path(folder).iterdir()):
        if p.is_file():
            fs.put_file(str(p), f"{url}/{p.name}")
    return url


class CuttableProxy:
    """A TCP forwarder in front of the server: `cut(seconds)` resets every open connection and refuses new
    ones for a while - a real network failure mid-read, with the server and its data untouched."""

    def __init__(self, target_port: int):
        import threading
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.down_until = 0.0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                _reset(client)
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def cut(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            _reset(c)

    def close(self) -> None:
        self.closed = True
        self.cut(0)
        self.sock.close()


def _reset(s: socket.socket) -> None:
    import struct
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        s.close()
    except OSError:
        pass


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
