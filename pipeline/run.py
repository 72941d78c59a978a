"""`vtt-prep extract`: data folder -> shards, incrementally and crash-safely (run_extract).

`run_extract` reads top to bottom as its stages; each is a function below, in the same order:
  repair    under the folder lock: the folder made to match its ledger (repair.py), retired shards past
            retention deleted (retire.py)                                      -> Ledger
  discover  videos + sidecars of the data folder, or annotation entries       -> list[Video]
  plan      the videos compared with the ledger (rerun_plan.py)               -> Work (+ report.plan)
  extract   Work -> Samples in sample order (a hash of the key, so a shard mixes folders): ffmpeg
            through the engine (engine.map: local pool or Ray), or old frames repackaged (no ffmpeg)
  write     Samples -> tar shards (writer.py); the writer returns each shard it finishes
  commit    each finished shard: the ledger's next commit file, then index.json (commit.py)
The run loop (`write_and_commit`) commits every shard the writer finishes before it writes the next
sample, so the ledger commit (create-if-absent of its next commit file) stays the only commit point and
kill -9 anywhere leaves the old or the new state (a published shard no commit lists is a leftover the next
run's repair removes; the extraction leaves at most one). Before the extraction, the shards holding
changed or deleted videos are rewritten (survivors copied to new shard numbers, a sample whose sidecar
alone changed rebuilt from its old frames, the old shards retired) in one commit (`rewrite_shards`, last
in this file); --rebuild stages every new shard and switches to the new set in one commit at the end. Every write goes through the shards folder's OutFolder
(shards/folder.py), so OUT may be a local folder or a URL (s3://bucket/shards) with the same protocol.
Cost: repair one listing of OUT; plan O(videos) stats (a URL data folder: its listing); ffmpeg and shard
writes only for what changed; a commit O(records it changed + shards).
"""
from __future__ import annotations

import gc
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm
from vtt.shards.folder import OutFolder
from vtt.shards.format import Members, read_samples
from vtt.shards.index import ShardEntry
from vtt.shards.ledger import STATUS_FAILED, STATUS_OK, Ledger, VideoRecord, read_ledger
from vtt.shards import sample_meta
from vtt.shards.storage import is_url
from vtt.shards.store import LockHeld

from .annotations import load_annotations
from .commit import commit_ledger
from .config import PrepConfig, preflight
from .discover import Video, discover
from .discover_remote import read_sidecars
from .engine import Engine, make_engine
from .extract import ffmpeg_version
from .faults import crash_point
from .frames import ExtractError
from .repair import reconcile
from .report import EXIT_FAILED_VIDEOS, Report
from .rerun_plan import RetryPolicy, Work, make_plan, sidecar_fp
from .retire import purge, retire
from .task import Outcome, Task, process_video, residecar_members
from .writer import ShardWriter, copy_to_new_shards

LockBusy = LockHeld  # another vtt-prep run holds the shards folder (shards/folder.py OutFolder.lock): exit 4


def run_extract(cfg: PrepConfig) -> Report:
    """Bring `cfg.out_dir` (a folder or a URL) up to date with `cfg.data_dir`. Raises ConfigError,
    SettingsChanged, LockBusy, ShardFormatError; video failures are in the report (exit_code 3), never raised."""
    preflight(cfg)  # folders, annotation files, URLs: a ConfigError before any work
    report = Report(str(cfg.data_dir), str(cfg.out_dir), dry_run=cfg.dry_run)
    t0 = time.perf_counter()
    if cfg.dry_run:
        return _dry_run(cfg, report, t0)
    engine = make_engine(cfg)
    engine.check()  # no Ray, no cluster, no ffmpeg on a node: ConfigError before any work
    out = cfg.out_folder()
    out.prepare()
    with engine, out.lock(cfg.break_lock):
        ledger = repair(out, cfg, report)
        cfg = cfg.from_folder(ledger.settings)  # flags not given: as the folder was made
        videos = discover_videos(cfg, ledger, report)
        work = plan_work(cfg, videos, ledger, report)
        read_skipped_sidecars(work, report)
        gc.freeze()  # the discovered videos and the plan live as long as the run, too
        run = _Run(cfg, ledger, report, rebuild=report.plan["rebuild"], out=out)
        if not run.rebuild:
            if work.from_frames:  # before the rewrite: a donor sample may be on its way out
                write_and_commit(run, package_samples(run, work), "package")
            with timed(report, "rewrite"):
                rewrite_shards(run, work, report.plan["deleted"])
        write_and_commit(run, extract_samples(run, work, engine), "extract")
        finish(run, work)
        report.seconds["total"] = time.perf_counter() - t0
        report.exit_code = EXIT_FAILED_VIDEOS if report.failed else 0
        report.write(out)
    return report


@contextmanager
def timed(report: Report, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.seconds[stage] = report.seconds.get(stage, 0.0) + time.perf_counter() - t0


# -- repair, discover, plan -------------------------------------------------------------------------------

def repair(out: OutFolder, cfg: PrepConfig, report: Report) -> Ledger:
    """The folder's ledger, after making the folder match it (repair.py) and deleting the retired shards
    past retention; what was repaired goes to the report's warnings. Cost: one listing of the folder."""
    with timed(report, "reconcile"):
        ledger, notes = reconcile(out, read_ledger(out))
        # the records live as long as the run and hold no cycles (refcounting frees them): out of
        # the cyclic collector's sight, or each of its full passes rescans a million of them
        gc.freeze()
        report.shards_purged = purge(out, ledger, cfg.retention_hours)
    report.warnings += notes
    return ledger


def discover_videos(cfg: PrepConfig, ledger: Ledger, report: Report) -> list[Video]:
    """The data folder's videos (or the annotation files' entries). `ledger` lets a URL data folder skip
    reading the sidecars of unchanged videos."""
    with timed(report, "discover"):
        if cfg.annotations:
            return load_annotations(cfg.data_dir, cfg.annotations, cfg.video_column, cfg.caption_column,
                                    cfg.storage())
        exclude = None if is_url(cfg.out_dir) else cfg.out_dir  # shards inside the data folder
        return discover(cfg.data_dir, cfg.allow_missing_sidecar, exclude=exclude, options=cfg.storage(),
                        known=ledger.records)


def plan_work(cfg: PrepConfig, videos: list[Video], ledger: Ledger, report: Report) -> Work:
    """What this run does (rerun_plan.make_plan); the plan by source goes to `report.plan`."""
    with timed(report, "plan"):
        policy = RetryPolicy(cfg.settings_hash(), {"timeout": cfg.timeout, "video_timeout": cfg.video_timeout},
                             lambda: _ffmpeg_version(cfg), always=cfg.retry_failed)
        plan, work = make_plan(videos, ledger, cfg.settings_hash(), cfg.rebuild, cfg.workers, policy,
                               settings=cfg.output_settings())
    report.plan = asdict(plan)
    report.videos_unchanged = len(plan.unchanged)
    return work


def _ffmpeg_version(cfg: PrepConfig):
    try:
        return ffmpeg_version(cfg.frame_spec())
    except ExtractError:
        return None  # no ffmpeg: retry, which records the failure again at once


def read_skipped_sidecars(work: Work, report: Report) -> None:
    """A URL data folder's videos to extract whose sidecar discovery skipped (unchanged: only the video
    changed, or --rebuild) get it read now; one that cannot be read is an invalid video."""
    with timed(report, "discover"):
        fresh = read_sidecars(work.extract)
    work.invalid += [v for v in fresh if not v.ok]
    work.extract = [v for v in fresh if v.ok]


def _dry_run(cfg: PrepConfig, report: Report, t0: float) -> Report:
    """The plan, with nothing written, locked or repaired."""
    out = cfg.out_folder()
    ledger = (read_ledger(out) if out.remote or out.path.is_dir() else None) or Ledger()
    cfg = cfg.from_folder(ledger.settings)
    plan_work(cfg, discover_videos(cfg, ledger, report), ledger, report)
    report.seconds["total"] = time.perf_counter() - t0
    return report


# -- extract: Work -> Samples --------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """A sample on its way to a shard: key, members, and its ledger record once the shard it went into is
    known (`record(shard=url)`)."""
    source: str
    key: str
    members: Members
    record: Callable[..., VideoRecord]


def package_samples(run: _Run, work: Work) -> Iterator[Sample]:
    """New entries of unchanged videos (work.from_frames), built from a donor sample's frames, no ffmpeg:
    each donor shard read once. Runs before the rewrite, while every donor's shard is live. Cost: reads
    the donors' shards."""
    by_shard: dict[str, dict[str, list[Video]]] = {}
    for source, (v, donor) in sorted(work.from_frames.items()):
        rec = run.ledger.records[donor]
        by_shard.setdefault(rec.shard, {}).setdefault(rec.key, []).append(v)
    for url, wanted in sorted(by_shard.items()):
        with run.out.open(url) as f:
            for key, members in read_samples(f):
                for v in wanted.get(key, []):
                    donor = run.ledger.records[work.from_frames[v.source][1]]
                    yield _shared_sample(run, v, donor, members)


def _shared_sample(run: _Run, v: Video, donor: VideoRecord, members: Members) -> Sample:
    members = residecar_members(members, v.key, v.meta, v.source)
    nbytes = sum(len(d) for _, d in members)
    run.report.videos_ok += 1
    run.report.bytes_written += nbytes
    _note_warnings(run.report, v.source, members)
    return Sample(v.source, v.key, members, partial(replace, donor, source=v.source, video_id=v.video_id,
                                                    key=v.key, sidecar=v.entry, nbytes=nbytes))


def extract_samples(run: _Run, work: Work, engine: Engine) -> Iterator[Sample]:
    """`work.extract` through the engine in sample order -> their samples; failures (and `work.invalid`)
    recorded as data for the next commit.

    Cost: one worker task per video file (its annotation entries share the result); the samples come in
    the same order whatever the engine's finishing order (engine.py: the local pool or Ray), so the bytes
    do not depend on timing or workers."""
    for v in work.invalid:
        run.fail(v, v.error)
    if not work.extract:
        return
    try:
        version = ffmpeg_version(run.cfg.frame_spec())  # only here: a no-op run starts no ffmpeg at all
    except ExtractError as e:
        for v in work.extract:
            run.fail(v, {"class": e.error_class, "reason": e.reason, "stderr_tail": e.stderr_tail})
        return
    older = sorted({r.ffmpeg_version for r in run.ledger.ok_records()} - {version})
    if older:  # other pixels are possible; not refused, as an ffmpeg upgrade would block every rerun
        run.report.warnings.append(f"existing samples were made with {', '.join(older)}; new ones with "
                                   f"{version} (--rebuild makes them uniform)")
    leaders, followers = _by_video(sample_order(work.extract))
    by_source = {v.source: v for v in leaders}
    bar = _progress(run.cfg, len(work.extract))
    try:
        workers = min(run.cfg.workers, len(leaders))  # 1: in this process, no pool to start
        for outcome in engine.map(process_video, _tasks(run, leaders, version), workers, size=_size):
            for stage, sec in outcome.seconds.items():
                run.report.seconds[f"worker_{stage}"] = run.report.seconds.get(f"worker_{stage}", 0.0) + sec
            v = by_source[outcome.source]
            # the video's other entries: its frames, their metadata
            for entry, result in [(v, outcome)] + [(f, _share(outcome, f)) for f in followers.get(v.path, [])]:
                sample = _extracted_sample(run, entry, result, version)
                if sample is not None:
                    yield sample
            bar.update(1 + len(followers.get(v.path, [])))
            bar.set_postfix(failed=run.report.videos_failed, refresh=False)
    finally:
        bar.close()


def _extracted_sample(run: _Run, v: Video, outcome: Outcome, ffmpeg_version: str) -> Sample | None:
    """The sample of one extracted video, or None with the failure recorded."""
    if outcome.error:
        run.fail(v, outcome.error, outcome, ffmpeg_version)
        return None
    video = outcome.fingerprint()  # the worker hashed it already
    nbytes = sum(len(d) for _, d in outcome.members)
    run.report.videos_ok += 1
    run.report.frames += outcome.nframes
    run.report.bytes_written += nbytes
    _note_warnings(run.report, v.source, outcome.members)
    return Sample(v.source, v.key, outcome.members, partial(
        VideoRecord, source=v.source, status=STATUS_OK, video_id=v.video_id, key=v.key, video=video,
        sidecar=sidecar_fp(v), settings_hash=run.settings_hash, ffmpeg_version=ffmpeg_version,
        nframes=outcome.nframes, nbytes=nbytes))


def sample_order(videos: list[Video]) -> list[Video]:
    """Videos in the order their samples are written: by a hash of the key, so that a shard mixes
    folders (classes) instead of following the sorted paths. Deterministic: same inputs, same bytes."""
    return sorted(videos, key=lambda v: (hashlib.sha256(v.key.encode()).hexdigest(), v.source))


def _by_video(videos: list[Video]) -> tuple[list[Video], dict[Path, list[Video]]]:
    """(one entry per video file, the others by file): annotation entries of one video extract once."""
    leaders, followers, seen = [], {}, set()
    for v in videos:
        if v.entry is not None and v.path in seen:
            followers.setdefault(v.path, []).append(v)
        else:
            seen.add(v.path)
            leaders.append(v)
    return leaders, followers


def _share(outcome: Outcome, v: Video) -> Outcome:
    """Another entry's sample from one extracted video: same frames and provenance, its own metadata."""
    members = [] if outcome.error else residecar_members(outcome.members, v.key, v.meta, v.source)
    return replace(outcome, source=v.source, key=v.key, members=members, seconds={})


def _tasks(run: _Run, videos: list[Video], ffmpeg_version: str) -> Iterator[Task]:
    spec = run.cfg.frame_spec()
    for v in videos:
        yield Task(v.path, v.source, v.key, v.meta, spec, run.settings, ffmpeg_version)


def _size(outcome: Outcome) -> int:
    return sum(len(d) for _, d in outcome.members)


def _progress(cfg: PrepConfig, total: int):
    return tqdm(total=total, unit="video", file=sys.stderr, disable=cfg.quiet or total == 0,
                dynamic_ncols=True, desc="vtt-prep")


def _note_warnings(report: Report, source: str, members) -> None:
    """The warnings a sample written this run carries (its vtt.warnings) into the report. Cost: one
    parse of the sample's small JSON member."""
    meta = json.loads(next(d for n, d in members if n.endswith(".json")))
    report.sample_warnings(source, sample_meta.warnings(meta))


# -- write -> commit ------------------------------------------------------------------------------------

def write_and_commit(run: _Run, samples: Iterable[Sample], stage: str) -> None:
    """write -> commit: `samples` into new shards in the order given; every shard the writer finishes is
    committed (`run.commit_shard`) before the next sample is written, the last one at the end.

    Cost: the samples' bytes written once; a commit O(one shard's records + shards)."""
    writer = ShardWriter(run.out, run.ledger.next_shard_number(), run.cfg.shard_size, run.cfg.shard_max_samples)
    try:
        with timed(run.report, stage):
            for s in samples:
                with timed(run.report, "write"):
                    done = writer.close_if_full(s.members)
                if done is not None:
                    run.commit_shard(done)
                with timed(run.report, "write"):
                    url = writer.add(s.key, s.members)
                run.pending[s.source] = s.record(shard=url)
            done = writer.close()
            if done is not None:
                run.commit_shard(done)
    except BaseException:
        writer.abort()
        raise
    finally:
        if hasattr(samples, "close"):  # a stage generator: its engine and progress bar are released now
            samples.close()


# -- the run's ledger state and the commit stage --------------------------------------------------------

class _Run:
    """State of one extract run: the ledger being built, what waits for a commit, and the report."""

    def __init__(self, cfg: PrepConfig, ledger: Ledger, report: Report, rebuild: bool = False,
                 out: OutFolder | None = None):
        self.cfg, self.ledger, self.report = cfg, ledger, report
        self.out = out or cfg.out_folder()           # every write of the run goes through it
        self.settings, self.settings_hash = cfg.output_settings(), cfg.settings_hash()
        self.pending: dict[str, VideoRecord] = {}    # ok records whose shard is not committed yet
        self.failures: dict[str, VideoRecord] = {}
        self.rebuild = rebuild                       # new shards are staged, committed all at once
        self.staged: list = []                       # rebuild: closed shards, not in the ledger yet
        self.to_delete: list[str] = []               # old shards to unlink once the commit is done

    def commit(self) -> None:
        """The commit point: the ledger's next commit file (what changed since the last, the failures
        recorded meanwhile included), then the index derived from it. Cost: O(records changed + shards)."""
        with timed(self.report, "commit"):
            self.ledger.settings, self.ledger.settings_hash = self.settings, self.settings_hash
            self.ledger.records.update(self.failures)
            self.failures = {}
            commit_ledger(self.out, self.ledger)  # a no-op run writes nothing

    def commit_shard(self, entry: ShardEntry) -> None:
        """A shard the writer finished goes live with its samples' records, in one commit; under --rebuild
        it is staged instead (switch() commits the whole new set). Cost: O(pending records) = one shard's."""
        self.report.shards_written.append(entry.url)
        if self.rebuild:  # until switch() the old set stays the live one
            self.staged.append(entry)
            return
        done = {s: r for s, r in self.pending.items() if r.shard == entry.url}
        self.ledger.shards[entry.url] = entry
        self.ledger.records.update(done)
        for s in done:
            del self.pending[s]
        self.commit()

    def switch(self) -> None:
        """--rebuild's one commit: the staged set replaces every old shard (retired, not deleted)."""
        self.report.samples_removed += len(self.ledger.ok_records())
        self.retire(sorted(self.ledger.shards))
        self.ledger.records = dict(self.pending)
        self.ledger.shards.update({e.url: e for e in self.staged})
        self.pending, self.staged, self.rebuild = {}, [], False
        self.commit()
        crash_point("rewrite-committed")
        self.delete_retired()

    def retire(self, urls: list[str]) -> None:
        """Take `urls` out of the live set in the next commit (kept as retired unless retention is 0)."""
        self.to_delete += retire(self.ledger, urls, self.cfg.retention_hours)
        self.report.shards_removed += urls
        self.report.shards_retired += [u for u in urls if u in self.ledger.retired]

    def delete_retired(self) -> None:
        """After a commit: delete what retention 0 says goes at once (a crash before: leftovers)."""
        for url in self.to_delete:
            self.out.delete(url)
        self.to_delete = []

    def fail(self, v: Video, error: dict, outcome: Outcome | None = None, version: str | None = None) -> None:
        """Record a failure with what decided it (fingerprints, ffmpeg, limits): retried only when one
        of those changes. Without `version` (ffmpeg never ran for it) it is retried every run. It goes
        into the next commit."""
        error = {"class": error["class"], "reason": error["reason"], "stderr_tail": error.get("stderr_tail", "")}
        video = outcome.fingerprint() if outcome is not None and outcome.sha256 else None
        sidecar = None
        if video is not None and (v.sidecar_path is not None or v.entry is not None):
            try:
                sidecar = sidecar_fp(v)
            except OSError:  # gone meanwhile: a record without it is retried next run
                pass
        limits = {"timeout": self.cfg.timeout, "video_timeout": self.cfg.video_timeout}
        self.failures[v.source] = VideoRecord(
            source=v.source, status=STATUS_FAILED, video_id=v.video_id, key=v.key, video=video,
            sidecar=sidecar, settings_hash=self.settings_hash, ffmpeg_version=version if video else None,
            error=error, limits=limits if video else None)
        self.report.failed.append({"source": v.source, **error})
        self.report.videos_failed += 1


def finish(run: _Run, work: Work) -> None:
    """The run's last commit: the failures recorded since the last one, earlier failures not retried
    listed in the report, --rebuild's switch, and the new stats of touched-but-unchanged files."""
    _keep_failures(run.ledger, run.report)
    if run.rebuild:
        run.switch()
    work.apply_refreshed(run.ledger)
    run.commit()


def _keep_failures(ledger: Ledger, report: Report) -> None:
    """Earlier failures that were not retried stay failed: listed in the report (and exit 3)."""
    for source in report.plan["failed_unchanged"]:
        rec = ledger.records[source]
        report.failed.append({"source": source, **rec.error, "unchanged": True})
        report.videos_failed_unchanged += 1


# -- rewrite: the shards holding changed or deleted videos ---------------------------------------------------

def rewrite_shards(run: _Run, work: Work, deleted: list[str]) -> None:
    """Rewrite the shards holding samples of changed or deleted videos, then commit once.

    Survivors are copied into new shard numbers (a sample whose video is unchanged but whose sidecar
    changed is rebuilt from its old frames on the way); the old files are retired in the same commit
    (deleted after retention), so a crash before it leaves the old state (the new files are unlisted
    and the next run removes them). Cost: reads and writes the affected shards only.
    """
    ledger, out = run.ledger, run.out
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
            _note_warnings(run.report, rec.source, members)
            return v.key, members
        return None if rec is None or rec.source in gone else (key, members)

    moved, written = copy_to_new_shards(out, affected, change, ledger.next_shard_number(),
                                        run.cfg.shard_size, run.cfg.shard_max_samples)
    for s in gone:
        ledger.records.pop(s, None)
    for old_key, url in moved:
        ledger.records[by_key[old_key].source] = _moved_record(run, work, by_key[old_key], url, nbytes)
    run.retire(affected)
    ledger.shards.update({e.url: e for e in written})
    run.report.samples_removed += len(gone) - len(work.residecar)
    run.report.shards_written += [e.url for e in written]
    run.commit()
    crash_point("rewrite-committed")
    run.delete_retired()


def _moved_record(run: _Run, work: Work, rec: VideoRecord, url: str, nbytes: dict) -> VideoRecord:
    rec = replace(rec, shard=url)
    if rec.source in work.residecar:
        v, video = work.residecar[rec.source]
        rec = replace(rec, video_id=v.video_id, key=v.key, video=video,
                      sidecar=sidecar_fp(v), nbytes=nbytes[rec.source])
        run.report.videos_ok += 1
    return rec
