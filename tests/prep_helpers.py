"""Helpers shared by the vtt-prep tests: tiny corpora, an ffmpeg wrapper that logs calls, folder snapshots."""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from dataclasses import replace
from pathlib import Path

from clips import make_clip

from vtt.pipeline.config import PrepConfig
from vtt.shards.ledger import ledger_bytes, read_ledger, write_ledger
from vtt.shards.store import LEDGER_DIR

FPS = 10
SIZE = (96, 32)  # make_clip's counter pattern; output the same size so stripes map 1:1


def add_video(data: Path, name: str, seconds: float = 1.0, description: str | None = None, **clip) -> Path:
    path = make_clip(data / name, seconds=seconds, fps=FPS, size=SIZE, gop=5, **clip)
    vid = Path(name).stem
    sidecar = {"video_id": vid, "description": description or f"a clip called {vid}",
               "duration": seconds, "frames": int(seconds * FPS)}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def make_corpus(data: Path, n: int = 4, seconds: float = 1.0) -> Path:
    data.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        add_video(data, f"v{i:02d}.mp4", seconds=seconds)
    return data


def copy_corpus(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # copy2 keeps mtimes, so fingerprints match the template's
    return dst


def logging_ffmpeg(folder: Path, before: str = "") -> tuple[Path, Path, Path]:
    """(ffmpeg, ffprobe, log): wrappers that append each call to `log`, run the shell code `before`
    (with $TOOL = ffmpeg|ffprobe, $LOG and the call's arguments in "$@"), then the real binary."""
    log = folder / "ffmpeg-calls.log"
    out = []
    for name in ("ffmpeg", "ffprobe"):
        real = shutil.which(name)
        w = folder / f"logged-{name}"
        w.write_text(f"#!/bin/sh\nTOOL={name}\nLOG='{log}'\necho {name} \"$@\" >> '{log}'\n{before}\n"
                     f"exec '{real}' \"$@\"\n")
        w.chmod(w.stat().st_mode | stat.S_IXUSR)
        out.append(w)
    return out[0], out[1], log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def cfg(data: Path, out: Path, **kw) -> PrepConfig:
    kw.setdefault("workers", 1)
    kw.setdefault("quiet", True)
    kw.setdefault("size", f"{SIZE[0]}x{SIZE[1]}")
    kw.setdefault("num_frames", 4)
    kw.setdefault("resize", "stretch")
    return PrepConfig(data, out, **kw)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (mtime_ns, bytes) of every file (and of the ledger's log), to prove a run touched nothing."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    files += sorted((folder / LEDGER_DIR).glob("*"))
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def state_files(out: Path) -> dict[str, bytes]:
    """What must equal a clean run's: shards (live and retired), index and the ledger's state rendered
    canonically ("ledger"; not the lock or the report; the commit files are compared by log_files).
    The ledger's retirement times are the wall clock of the run that retired them."""
    keep = [p for p in sorted(out.iterdir()) if p.name.startswith("shard-") or p.name == "index.json"]
    files = {p.name: p.read_bytes() for p in keep}
    ledger = read_ledger(out)
    if ledger is not None:
        state = json.loads(ledger_bytes(ledger))
        for r in state.get("retired", []):
            r["retired_at"] = "(time)"
        files["ledger"] = json.dumps(state, indent=1, sort_keys=True).encode()
    return files


def log_files(out: Path) -> dict[str, dict]:
    """The ledger's commit files by name, parsed, retirement times normalised (the same history must
    give the same commits, whether or not a run was killed on the way)."""
    files = {}
    for p in sorted((out / LEDGER_DIR).glob("*.json")):
        commit = json.loads(p.read_bytes())
        for r in commit.get("retired_put", []):
            r["retired_at"] = "(time)"
        files[p.name] = commit
    return files


def edit_ledger(out: Path, change) -> None:
    """Change the committed ledger through its API (`change(ledger)`), as one more commit."""
    ledger = read_ledger(out)
    change(ledger)
    assert write_ledger(out, ledger)


def age_retired(out: Path, stamp: str = "2000-01-01T00:00:00Z") -> list[str]:
    """Pretend every retired shard was retired long ago; returns their urls."""
    def change(ledger):
        for u, r in list(ledger.retired.items()):
            ledger.retired[u] = replace(r, retired_at=stamp)
    edit_ledger(out, change)
    return sorted(read_ledger(out).retired)


def live_shards(out: Path) -> list[str]:
    """The shards index.json lists (retired ones stay on disk but are not listed)."""
    return [e["url"] for e in json.loads((out / "index.json").read_text())["shardlist"]]


def read_back(out: Path) -> dict[str, dict]:
    """Every sample through webdataset.WebDataset(...).decode(), by key; also proves the tars read as is."""
    import webdataset as wds
    urls = [str(out / e["url"]) for e in json.loads((out / "index.json").read_text())["shardlist"]]
    if not urls:
        return {}
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    samples = {}
    for s in ds:
        assert s["__key__"] not in samples, f"duplicate key {s['__key__']}"
        samples[s["__key__"]] = s
    return samples


def content(out: Path) -> dict[str, tuple]:
    """Shard-layout-independent content: key -> (json meta, txt, frames)."""
    return {k: (s["json"], s["txt"], tuple(s[f] for f in sorted(s) if f[0].isdigit()))
            for k, s in read_back(out).items()}


def prep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vtt.pipeline.cli", *args]


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e
