"""`vtt-prep extract`: data folder -> shards, incrementally and crash-safely (run_extract).

Stages: lock -> reconcile the folder with its ledger -> discover -> plan -> rewrite the shards holding
changed or deleted videos (survivors copied to new shard numbers; a sample whose sidecar alone changed is
rebuilt from its old frames; one commit) -> extract new/changed/failed videos in sorted order through a
bounded process pool into new shards (one ledger commit per finished shard) -> final commit.
The ledger write is the only commit point, so kill -9 anywhere leaves the old or the new state.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import filelock

from vtt.shards.format import LEDGER_FILE, LOCK_FILE
from vtt.shards.ledger import (STATUS_FAILED, STATUS_OK, Fingerprint, Ledger, VideoRecord, ledger_bytes, read_ledger,
                               write_ledger)

from .config import PrepConfig
from .discover import Video, discover
from .faults import crash_point
from .ledger import Work, fingerprint, make_plan, reconcile, sync_index
from .report import EXIT_FAILED_VIDEOS, Report
from .task import Outcome, Task, process_video, residecar_members
from .writer import ShardWriter, copy_to_new_shards


class LockBusy(RuntimeError):
    """Another vtt-prep run holds the shards folder."""


@contextmanager
def folder_lock(folder: Path):
    path = folder / LOCK_FILE
    lock = filelock.FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LockBusy(f"another vtt-prep run holds {path}; wait for it to finish "
                       f"(the lock goes away with its process)") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def timed(report: Report, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.seconds[stage] = report.seconds.get(stage, 0.0) + time.perf_counter() - t0


def _watch_parent() -> None:
    """Pool worker initializer: exit when the main process dies (kill -9 leaves no orphans behind)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items, results in input order, at most 2*workers tasks in flight (bounded memory).

    Workers are spawned, not forked: a forked child would inherit the folder lock's descriptor and
    keep the lock alive after the main process was killed.
    """
    if workers == 1:
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_watch_parent)
    window = deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    except BrokenProcessPool as e:
        raise RuntimeError(
            "a vtt-prep worker process died (killed, or out of memory; a script that calls run_extract "
            "with workers > 1 needs `if __name__ == '__main__':`, as worker processes are spawned)") from e
    finally:
        # on error or Ctrl-C, queued videos must not run on before we can exit
        pool.shutdown(wait=True, cancel_futures=True)


class _Run:
    """State of one extract run: the ledger being built and the report."""

    def __init__(self, cfg: PrepConfig, ledger: Ledger, report: Report):
        self.cfg, self.ledger, self.report = cfg, ledger, report
        self.settings, self.settings_hash = cfg.output_settings(), cfg.settings_hash()
        self.pending: dict[str, VideoRecord] = {}    # ok records whose shard is not closed yet
        self.failures: dict[str, VideoRecord] = {}

    def commit(self) -> None:
        """The commit point: ledger first (atomic), then the index derived from it."""
        with timed(self.report, "commit"):
            self.ledger.settings, self.ledger.settings_hash = self.settings, self.settings_hash
            self.ledger.records.update(self.failures)
            self.failures = {}
            data = ledger_bytes(self.ledger)
            path = self.cfg.out_dir / LEDGER_FILE
            if not path.is_file() or path.read_bytes() != data:  # a no-op run rewrites nothing
                write_ledger(self.cfg.out_dir, self.ledger)
                crash_point("ledger-written")
            sync_index(self.cfg.out_dir, self.ledger)

    def shard_closed(self, entry, keys) -> None:
        done = {s: r for s, r in self.pending.items() if r.shard == entry.url}
        self.ledger.shards[entry.url] = entry
        self.ledger.records.update(done)
        for s in done:
            del self.pending[s]
        self.report.shards_written.append(entry.url)
        self.commit()

    def fail(self, v: Video, error: dict) -> None:
        error = {"class": error["class"], "reason": error["reason"], "stderr_tail": error.get("stderr_tail", "")}
        self.failures[v.source] = VideoRecord(
            source=v.source, status=STATUS_FAILED, video_id=v.video_id, key=v.key,
            settings_hash=self.settings_hash, error=error)
        self.report.failed.append({"source": v.source, **error})
        self.report.videos_failed += 1


def rewrite_shards(run: _Run, work: Work, deleted: list[str]) -> None:
    """Rewrite the shards holding samples of changed or deleted videos, then commit once.

    Survivors are copied into new shard numbers (a sample whose video is unchanged but whose sidecar
    changed is rebuilt from its old frames on the way); the old files are deleted only after the
    commit, so a crash in between leaves the old state (the new files are unlisted and the next run
    removes them).
    """
    ledger, out = run.ledger, run.cfg.out_dir
    gone = {s: ledger.records[s] for s in sorted(work.remove)
            if s in ledger.records and ledger.records[s].status == STATUS_OK}
    for s in deleted:
        ledger.records.pop(s, None)
    affected = sorted({r.shard for r in gone.values()})
    if not affected:
        return
    by_key = {r.key: r for r in ledger.ok_records() if r.shard in affected}
    nbytes = {}

    def change(key, members):
        rec = by_key.get(key)
        if rec is not None and rec.source in work.residecar:
            v = work.residecar[rec.source][0]
            members = residecar_members(members, v.key, v.meta)
            nbytes[rec.source] = sum(len(d) for _, d in members)
            return v.key, members
        return None if rec is None or rec.source in gone else (key, members)

    moved, written = copy_to_new_shards(out, affected, change, ledger.next_shard_number(),
                                        run.cfg.shard_size, run.cfg.shard_max_samples)
    for s in gone:
        ledger.records.pop(s, None)
    for old_key, url in moved:
        ledger.records[by_key[old_key].source] = _moved_record(run, work, by_key[old_key], url, nbytes)
    for url in affected:
        del ledger.shards[url]
    ledger.shards.update({e.url: e for e in written})
    run.report.samples_removed += len(gone) - len(work.residecar)
    run.report.shards_written += [e.url for e in written]
    run.commit()
    crash_point("rewrite-committed")
    for url in affected:
        (out / url).unlink(missing_ok=True)
    run.report.shards_removed += affected


def _moved_record(run: _Run, work: Work, rec: VideoRecord, url: str, nbytes: dict) -> VideoRecord:
    rec = replace(rec, shard=url)
    if rec.source in work.residecar:
        v, video = work.residecar[rec.source]
        rec = replace(rec, video_id=v.video_id, key=v.key, video=video,
                      sidecar=fingerprint(v.sidecar_path), nbytes=nbytes[rec.source])
        run.report.videos_ok += 1
    return rec


def _tasks(run: _Run, videos: list[Video], ffmpeg_version: str) -> Iterator[Task]:
    spec = run.cfg.frame_spec()
    for v in videos:
        yield Task(v.path, v.source, v.key, v.meta, spec, run.settings, ffmpeg_version)


def _progress(cfg: PrepConfig, total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="video", file=sys.stderr, disable=cfg.quiet or total == 0,
                dynamic_ncols=True, desc="vtt-prep")


def _accept(run: _Run, writer: ShardWriter, v: Video, outcome: Outcome, ffmpeg_version: str) -> None:
    for stage, sec in outcome.seconds.items():
        run.report.seconds[f"worker_{stage}"] = run.report.seconds.get(f"worker_{stage}", 0.0) + sec
    if outcome.error:
        run.fail(v, outcome.error)
        return
    video = Fingerprint(outcome.stat[0], outcome.stat[1], outcome.sha256)  # the worker hashed it already
    with timed(run.report, "write"):
        url = writer.add(v.key, outcome.members)
    nbytes = sum(len(d) for _, d in outcome.members)
    run.pending[v.source] = VideoRecord(
        source=v.source, status=STATUS_OK, video_id=v.video_id, key=v.key, video=video,
        sidecar=fingerprint(v.sidecar_path), settings_hash=run.settings_hash, ffmpeg_version=ffmpeg_version,
        shard=url, nframes=outcome.nframes, nbytes=nbytes)
    run.report.videos_ok += 1
    run.report.frames += outcome.nframes
    run.report.bytes_written += nbytes


def extract_all(run: _Run, work: Work) -> None:
    """Extract `work.extract` in sorted order into new shards; record `work.invalid` as failed."""
    from .extract import ffmpeg_version as get_version
    from .frames import ExtractError
    for v in work.invalid:
        run.fail(v, v.error)
    if not work.extract:
        return
    try:
        version = get_version(run.cfg.frame_spec())  # only here: a no-op run starts no ffmpeg at all
    except ExtractError as e:
        for v in work.extract:
            run.fail(v, {"class": e.error_class, "reason": e.message, "stderr_tail": e.stderr_tail})
        return
    older = sorted({r.ffmpeg_version for r in run.ledger.ok_records()} - {version})
    if older:  # other pixels are possible; not refused, as an ffmpeg upgrade would block every rerun
        run.report.warnings.append(f"existing samples were made with {', '.join(older)}; new ones with "
                                   f"{version} (--rebuild makes them uniform)")
    by_source = {v.source: v for v in work.extract}
    writer = ShardWriter(run.cfg.out_dir, run.ledger.next_shard_number(), run.cfg.shard_size,
                         run.cfg.shard_max_samples, on_close=run.shard_closed)
    bar = _progress(run.cfg, len(work.extract))
    try:
        with timed(run.report, "extract"):
            workers = min(run.cfg.workers, len(work.extract))  # 1: in this process, no pool to start
            for outcome in ordered_map(process_video, _tasks(run, work.extract, version), workers):
                _accept(run, writer, by_source[outcome.source], outcome, version)
                bar.update(1)
                bar.set_postfix(failed=run.report.videos_failed, refresh=False)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def run_extract(cfg: PrepConfig) -> Report:
    """Bring `cfg.out_dir` up to date with `cfg.data_dir`. Raises ConfigError, SettingsChanged, LockBusy,
    ShardFormatError; video failures are in the report (exit_code 3), never raised."""
    report = Report(str(cfg.data_dir), str(cfg.out_dir), dry_run=cfg.dry_run)
    t0 = time.perf_counter()
    if cfg.dry_run:
        return _dry_run(cfg, report, t0)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(cfg.out_dir):
        with timed(report, "reconcile"):
            ledger, notes = reconcile(cfg.out_dir, read_ledger(cfg.out_dir))
        report.warnings += notes
        work = _plan(cfg, ledger, report)
        run = _Run(cfg, ledger, report)
        with timed(report, "rewrite"):
            rewrite_shards(run, work, report.plan["deleted"])
        extract_all(run, work)
        work.apply_refreshed(ledger)
        run.commit()
        report.seconds["total"] = time.perf_counter() - t0
        report.exit_code = EXIT_FAILED_VIDEOS if report.failed else 0
        report.write(cfg.out_dir)
    return report


def _plan(cfg: PrepConfig, ledger: Ledger, report: Report) -> Work:
    with timed(report, "discover"):
        videos = discover(cfg.data_dir, cfg.allow_missing_sidecar, exclude=cfg.out_dir)
    with timed(report, "plan"):
        plan, work = make_plan(videos, ledger, cfg.settings_hash(), cfg.rebuild, cfg.workers)
    report.plan = asdict(plan)
    report.videos_unchanged = len(plan.unchanged)
    return work


def _dry_run(cfg: PrepConfig, report: Report, t0: float) -> Report:
    """The plan, with nothing written, locked or repaired."""
    ledger = (read_ledger(cfg.out_dir) if cfg.out_dir.is_dir() else None) or Ledger()
    _plan(cfg, ledger, report)
    report.seconds["total"] = time.perf_counter() - t0
    return report
