"""Streaming reader of vtt shards for training and evaluation: the public API and the torch loader.

The jobs live in four modules: data/source.py (which shards: pinned index snapshots, splits),
data/order.py (sample-order arithmetic, no I/O), data/read.py (tars -> samples -> micro batches, the
corrupt policy), data/group.py (data.group_by_length: length-sorted windows of micro batches). This module
holds DataConfig, the DataLoader around a plan, and the resume rules.

The stream is a pure function of (snapshot, seed, epoch, rank, world size, workers, micro batch,
interleave, shuffle buffer, group window), so a position `{epoch, batch, raw}` is enough to resume exactly; a
resume passes over the samples already used by their tar headers, without reading or decoding them (grouped:
from the start of the window it stopped in, which it reads again).

One epoch: the shards, in an order drawn from (seed, epoch), cut into groups of `interleave_shards`
that take turns sample by sample, form one sequence of samples. There are S = world_size x W streams
(W = max(num_workers, 1)); stream (rank, l) makes the rank's batches i with i % W == l, and owns the
next stretch of the sequence, exactly as long as those batches need. So every rank gets the same number
of batches and ranks and workers disjoint samples, with any number of shards; only the last
`total % (world_size x micro_batch)` samples of the epoch's order are left out. Within its stretch a
stream emits in the order of a seeded shuffle buffer. The DataLoader's round robin puts worker batches
back in order, rotated on resume so that worker 0 serves the first batch still owed. Eval: index order,
no shuffle, the last batches padded by wrapping around, the same number of batches on every rank.

Resume rules: a saved position carries the shard list (snapshot) its epoch was reading. On resume the
epoch continues on that snapshot exactly - the same samples, none repeated, none skipped - as long as
its shards are still on disk as listed (vtt-prep keeps retired shards for a retention period) and the
order settings are unchanged; the next epoch reads the index pinned at this start. Otherwise the
resume is refused with a message naming what changed, unless DataConfig.resume='next_epoch', which
drops the rest of the saved epoch and starts the next one on the current index.

Use:
    pin_data(cfg)                           # once per process, before any loader (train() does it)
    agree_data(cfg)                         # collective: every rank takes rank 0's snapshot
    loader = build_loader(cfg, adapter.collate, micro_batch, rank, world_size,  # checks shards now
                          length_fn=adapter.sample_length)  # used by data.group_by_length
    it = iter(loader)                       # train: endless over epochs; stop at max_steps
    batch = next(it)                        # state() counts batches handed out, so take them with
    ckpt["data"] = loader.state()           # next(it) (zip(loader, ...) would pull one extra)
    build_loader(..., start=ckpt["data"])   # resumes with the very next batch
    loader.corrupt, loader.corrupt_events   # {class: count}, first MAX_EVENTS {class, shard, key, reason}
    for batch in build_loader(..., split="eval"): ...   # one deterministic pass per iter()
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import pickle
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from vtt.shards.format import INDEX_FILE, ShardFormatError
from vtt.shards.storage import StorageError, Store  # noqa: F401
from vtt.trainer.data.group import LengthFn, grouped_batches
from vtt.trainer.data.order import ReadPlan, StreamPosition, batches_per_rank, shuffle_order  # noqa: F401
from vtt.trainer.data.read import (MAX_EVENTS, CorruptSampleError, decode_sample,  # noqa: F401
                                   stream_batches)
from vtt.trainer.data.source import (RESTART_HINT, DataResumeError, Snapshot, SnapshotError,  # noqa: F401
                                     Source, agree, in_eval_slice, pin, snapshot, split_source, unpin)

log = logging.getLogger(__name__)

ON_CORRUPT = ("skip", "stop")
FRAME_SAMPLING = ("uniform", "random")
RESUME_MODES = ("exact", "next_epoch")
GROUP_WINDOW = 32  # micro batches per length-sorted window (HF Trainer's mega-batch uses 50)
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class DataConfig:
    shards: str
    eval_shards: str | None = None  # a held-out shards folder with its own index.json
    eval_fraction: float = 0.0  # else: this fraction of keys (by hash) is held out of training
    shuffle_buffer: int = 256  # samples; 0 or 1 = no sample shuffle
    interleave_shards: int = 4  # shards a stream reads at once, taking turns: batches mix K shards
    seed: int = 0
    num_workers: int = 0
    on_corrupt: str = "skip"  # skip | stop
    resume: str = "exact"  # exact: continue the saved epoch exactly or refuse | next_epoch: may drop its rest
    decode_frames: bool = True  # False: frames stay undecoded (text-only models), sample["frames"] is None
    verify_checksums: bool = False  # sha256 of every tar against the index before training
    prefetch_factor: int = 2
    # frames chosen at train time (data_read.pick_frames): at most num_frames of a sample's stored frames,
    # evenly spaced ('uniform') or drawn per epoch from (seed, epoch, key) ('random'); None: all of them
    num_frames: int | None = None
    frame_sampling: str = "uniform"
    video_tokens: int | None = None  # per-sample video-token budget: caps num_frames (vtt.trainer.run.memory)
    # padding-free packing (vtt.trainer.inputs.packing): the collate gets packed=True and puts a micro batch's samples
    # in one row with per-sample position ids; still `micro_batch` whole samples per batch (exact resume)
    packing: bool = False
    # length-grouped micro batches (train only; data/group.py): each stream sorts the samples of `group_window`
    # micro batches by the adapter's sample_length, cuts them into batches and emits those in a seeded order;
    # less padding in unpacked batches, at the cost of holding one window of encoded samples per stream
    group_by_length: bool = False
    group_window: int = GROUP_WINDOW
    # token-balanced micro batches (train only; data/group.py): a window's samples are cut into its micro batches
    # by token cost (a packed row's sum, or a padded batch's samples x longest) instead of by count, so every
    # step costs about the same; micro_batch samples per batch on average, the number of batches unchanged
    balance_tokens: bool = False
    # fsspec storage options for URL folders (s3://...): endpoint_url, key, secret, profile, anon, ...;
    # empty: each filesystem's standard places (AWS_* variables, profiles, instance roles)
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.shards:
            raise ValueError("DataConfig.shards: a shards folder is required")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_shards and self.eval_fraction:
            raise ValueError("DataConfig: give eval_shards or eval_fraction, not both")
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(f"DataConfig.on_corrupt must be one of {ON_CORRUPT}, got {self.on_corrupt!r}")
        if self.resume not in RESUME_MODES:
            raise ValueError(f"DataConfig.resume must be one of {RESUME_MODES}, got {self.resume!r}")
        if self.shuffle_buffer < 0 or self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError("DataConfig: shuffle_buffer and num_workers must be >= 0, prefetch_factor >= 1")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"DataConfig.num_frames must be >= 1 or None, got {self.num_frames}")
        if self.frame_sampling not in FRAME_SAMPLING:
            raise ValueError(f"DataConfig.frame_sampling must be one of {FRAME_SAMPLING}, got {self.frame_sampling!r}")
        if self.video_tokens is not None and self.video_tokens < 1:
            raise ValueError(f"DataConfig.video_tokens must be >= 1 or None, got {self.video_tokens}")
        if self.interleave_shards < 1:
            raise ValueError(f"DataConfig.interleave_shards must be >= 1, got {self.interleave_shards}")
        if self.group_window < 1:
            raise ValueError(f"DataConfig.group_window must be >= 1, got {self.group_window}")

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_shards) or self.eval_fraction > 0

    @property
    def folders(self) -> list[str]:
        return [self.shards] + ([self.eval_shards] if self.eval_shards else [])


# ---------------------------------------------------------------- snapshots and splits

def pin_data(cfg: DataConfig) -> None:
    """Pin the index of the train (and eval) folder for this process: every later loader, eval pass and
    resume reads these shard lists, whatever vtt-prep commits meanwhile. O(shards) stats."""
    pin(cfg.folders, cfg.verify_checksums, cfg.storage_options)


def check_storage(cfg: DataConfig) -> None:
    """StorageError (one line: the URL and the problem) when a folder cannot be reached at all; costs one
    small read per folder. Other problems (no index.json, ...) are left to pin_data."""
    for folder in dict.fromkeys(cfg.folders):
        try:
            Store.of(folder, cfg.storage_options).read_bytes(INDEX_FILE)
        except StorageError:
            raise
        except OSError:
            pass


def agree_data(cfg: DataConfig) -> bool:
    """Collective: all ranks take rank 0's pinned snapshots; True where this rank's differed (re-plan)."""
    return agree(cfg.folders)


def _fraction(cfg: DataConfig, split: str) -> float:
    return 0.0 if (split == "eval" and cfg.eval_shards) else cfg.eval_fraction


def _folder(cfg: DataConfig, split: str) -> str:
    return cfg.eval_shards if split == "eval" and cfg.eval_shards else cfg.shards


def resolve_source(cfg: DataConfig, split: str) -> Source:
    """The split of the folder's pinned snapshot (or of a fresh read when none is pinned)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "eval" and not cfg.has_eval:
        raise ValueError("no eval set configured: set DataConfig.eval_shards or eval_fraction")
    folder = _folder(cfg, split)
    src = split_source(snapshot(folder, cfg.verify_checksums, cfg.storage_options), _fraction(cfg, split),
                       split == "eval")
    if src.total == 0:
        raise ShardFormatError(f"{folder}: the {split} split is empty (eval_fraction={cfg.eval_fraction})")
    return src


def steps_per_epoch(cfg: DataConfig, micro_batch: int, world_size: int) -> int:
    """Micro batches each rank yields per training epoch (the same on every rank)."""
    return batches_per_rank(resolve_source(cfg, "train").total, micro_batch, world_size, "train", cfg.shards)


def eval_batches(cfg: DataConfig, micro_batch: int, world_size: int) -> int:
    """Micro batches each rank yields per evaluation pass (the last ones wrap around to pad)."""
    return batches_per_rank(resolve_source(cfg, "eval").total, micro_batch, world_size, "eval", "eval")


# ---------------------------------------------------------------- the loader

def _identity(x):
    return x


class _EpochDataset(torch.utils.data.IterableDataset):
    def __init__(self, plan: ReadPlan, collate_fn: Callable, length_fn: LengthFn | None):
        self.plan, self.collate_fn, self.length_fn = plan, collate_fn, length_fn

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        j = info.id if info is not None else 0
        # DataLoader asks worker 0 first; rotate so worker 0 serves the first batch still owed.
        l = (self.plan.start_batch + j) % self.plan.workers
        if self.plan.group_window:
            stream = grouped_batches(self.plan, l, self.collate_fn, self.length_fn)
        else:
            stream = stream_batches(self.plan, l, self.collate_fn)
        return stream if info is None else _errors_as_data(stream, j)


def _errors_as_data(stream: Iterator, worker: int) -> Iterator:
    """Hand a worker's exception to the main process as data, with its worker traceback as a note:
    the exception keeps its own type (DataLoader's re-raise rebuilds it from a message)."""
    try:
        yield from stream
    except Exception as e:
        e.add_note(f"in DataLoader worker {worker}:\n{traceback.format_exc()}")
        try:
            pickle.loads(pickle.dumps(e))  # some exception types pickle but do not unpickle
        except Exception:
            e = RuntimeError(f"{type(e).__name__}: {e}\n{e.__notes__[-1]}")
        yield None, {"error": e}


class Loader:
    """Iterable of collated micro batches. Train: endless over epochs (the loop stops at max_steps);
    eval: one deterministic pass per iter(). `state()` is the JSON-able position of the next batch."""

    def __init__(self, cfg: DataConfig, collate_fn: Callable, micro_batch: int, rank: int,
                 world_size: int, split: str, start: StreamPosition | dict | None, length_fn: LengthFn | None = None):
        if micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad micro_batch={micro_batch} rank={rank} world_size={world_size}")
        self.cfg, self.split, self.length_fn = cfg, split, length_fn
        windows = (cfg.group_by_length or cfg.balance_tokens) and split == "train"
        self.group_window = cfg.group_window if windows else 0
        self.balance = ("packed" if cfg.packing else "padded") if cfg.balance_tokens and windows else ""
        if self.group_window and length_fn is None:
            raise ValueError("data.group_by_length / data.balance_tokens need the samples' length: pass the "
                             "adapter's sample_length as build_loader(length_fn=...)")
        self.collate_fn = packing_collate(collate_fn) if cfg.packing else collate_fn
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.src = resolve_source(cfg, split)  # every epoch after a resumed one reads this
        self.where = _folder(cfg, split)
        self.workers = max(cfg.num_workers, 1)
        pos = StreamPosition.from_dict(start)
        self.epoch, self.batch, self._raw, self._src = self._resume(pos) if start is not None else (0, 0, None, self.src)
        if self.batch >= len(self):
            self._next_epoch()
        self._corrupt_base: Counter = Counter(pos.corrupt)
        self._corrupt_live: dict[int, dict] = {}
        self.corrupt_events: list[dict] = []  # the first MAX_EVENTS corrupt samples, for the run log
        n_shards = sum(c > 0 for c in self.src.counts)
        if split == "train" and n_shards < world_size * self.workers and rank == 0:
            log.warning("%s: %d non-empty shards for %d ranks x %d workers: streams share shards and "
                        "read past each other's samples (correct, more I/O; write smaller shards)",
                        self.where, n_shards, world_size, self.workers)

    def _order_settings(self, src: Source) -> dict:
        cfg = self.cfg
        return {"world_size": self.world_size, "num_workers": cfg.num_workers, "micro_batch": self.micro_batch,
                "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer, "interleave_shards": cfg.interleave_shards,
                "eval_fraction": _fraction(cfg, self.split), "group_window": self.group_window,
                "balance": self.balance, "num_samples": src.total}

    def _saved_source(self, pos: StreamPosition) -> tuple[Source | None, list[str]]:
        """(what the saved epoch was reading, why it cannot go on). The saved shards are looked up in
        this run's folder (a moved folder is fine); one stat per shard."""
        if pos.snapshot is None:  # saved before snapshots: only the sample count can be compared
            return self.src, []
        saved = Snapshot.from_dict(pos.snapshot)
        if saved.digest == self.src.snap.digest:
            return self.src, []
        saved = dataclasses.replace(saved, folder=self.src.snap.folder, options=self.src.snap.options)
        gone = saved.problems()
        if gone:
            return None, [f"{len(gone)} shard(s) of the index the checkpoint was reading are not on disk as "
                          "they were (vtt-prep deletes retired shards after its retention period): "
                          + "; ".join(gone[:10]) + (" ..." if len(gone) > 10 else "")]
        log.info("%s: index.json changed since the checkpoint (re-sharded?); the saved epoch goes on on its "
                 "%d shards, the next epoch reads the current index", self.where, len(saved.shards))
        return split_source(saved, _fraction(self.cfg, self.split), self.split == "eval", pos.counts), []

    def _resume(self, pos: StreamPosition) -> tuple[int, int, tuple[int, ...] | None, Source]:
        src, why = self._saved_source(pos)
        if src is not None:
            why = pos.order_changes(self._order_settings(src))
        if pos.raw is not None and len(pos.raw) != self.workers and not why:
            why = [f"resume position has {len(pos.raw)} worker streams, this loader {self.workers}"]
        if not why:
            return pos.epoch, pos.batch, pos.raw, src
        msg = f"{self.where}: cannot resume the data stream exactly: " + ", ".join(why)
        if self.cfg.resume != "next_epoch":
            raise DataResumeError(msg + " (the sample order depends on these); " + RESTART_HINT)
        log.warning("%s; data.resume=next_epoch: the rest of epoch %d is dropped, epoch %d starts on the "
                    "current index", msg, pos.epoch, pos.epoch + 1)
        return pos.epoch + 1, 0, None, self.src

    def _next_epoch(self) -> None:
        self.epoch, self.batch, self._raw, self._src = self.epoch + 1, 0, None, self.src

    def __len__(self) -> int:
        """Batches per rank in the current epoch (a resumed epoch may be of an older index)."""
        return batches_per_rank(self._src.total, self.micro_batch, self.world_size, self.split, self.where)

    def _plan(self, epoch: int, start_batch: int, raw: tuple[int, ...] | None) -> ReadPlan:
        cfg, train = self.cfg, self.split == "train"
        return ReadPlan(self._src, self.split, cfg.seed, epoch, self.rank, self.world_size, self.workers,
                    self.micro_batch, len(self), start_batch, raw, cfg.shuffle_buffer if train else 0,
                    cfg.interleave_shards if train else 1, cfg.on_corrupt, cfg.decode_frames,
                    cfg.num_frames, cfg.frame_sampling if train else "uniform", self.group_window, self.balance)

    def __iter__(self) -> Iterator[Any]:
        if self.split == "eval":
            yield from self._run(self._plan(0, 0, None), track=False)
            self._fold_counters()
            return
        while True:
            yield from self._run(self._plan(self.epoch, self.batch, self._raw), track=True)
            self._fold_counters()
            self._next_epoch()

    def _run(self, plan: ReadPlan, track: bool) -> Iterator[Any]:
        ds = _EpochDataset(plan, self.collate_fn, self.length_fn)
        if self.cfg.num_workers == 0:
            it = iter(ds)
        else:
            it = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_identity,
                pin_memory=torch.cuda.is_available(), prefetch_factor=self.cfg.prefetch_factor))
        raw = list(plan.raw_skip) if plan.raw_skip else [plan.skip(l) for l in range(self.workers)]
        try:
            for batch, info in it:
                self._record(info, raw if track else None)
                yield batch
        finally:
            # Drop the DataLoader here: kept alive by an exception's traceback, it would be shut down
            # later by the cycle collector, when its queues are gone and each worker join times out (5 s).
            del it

    def _record(self, info: dict, raw: list[int] | None) -> None:
        if "error" in info:
            raise info["error"]
        self._corrupt_live[info["l"]] = info["corrupt"]
        room = MAX_EVENTS - len(self.corrupt_events)
        self.corrupt_events.extend(info["events"][:max(room, 0)])
        if raw is not None:
            raw[info["l"]] = info["raw"]
            self.batch, self._raw = info["i"] + 1, tuple(raw)

    def _fold_counters(self) -> None:
        for counts in self._corrupt_live.values():
            self._corrupt_base.update(counts)
        self._corrupt_live = {}

    @property
    def corrupt(self) -> dict[str, int]:
        """Corrupt samples/shards seen so far by class (cumulative across resumes), for logging."""
        total = Counter(self._corrupt_base)
        for counts in self._corrupt_live.values():
            total.update(counts)
        return dict(total)

    def state(self) -> dict:
        """JSON-able StreamPosition of the next batch (train); save it with the checkpoint. It carries
        the epoch's shard list: O(shards) bytes."""
        s = self._order_settings(self._src)
        return StreamPosition(self.epoch, self.batch, self._raw, self.corrupt, s["world_size"], s["num_workers"],
                              s["micro_batch"], s["seed"], s["num_samples"], s["shuffle_buffer"],
                              s["interleave_shards"], s["eval_fraction"], self._src.snap.to_dict(),
                              self._src.counts, s["group_window"], s["balance"]).to_dict()


def packing_collate(collate_fn: Callable) -> Callable:
    """data.packing: the adapter's collate called with packed=True; a collate without that keyword (a sample
    collector such as `list`: vtt-caption, vtt-eval, the first-sample check) gets the samples as they are."""
    try:
        inspect.signature(collate_fn).bind([], packed=True)
    except (TypeError, ValueError):  # no such keyword / a builtin without a signature
        return collate_fn
    return functools.partial(collate_fn, packed=True)


def build_loader(cfg: DataConfig, collate_fn: Callable, micro_batch: int, rank: int = 0,
                 world_size: int = 1, split: str = "train",
                 start: StreamPosition | dict | None = None, length_fn: LengthFn | None = None) -> Loader:
    """Validate the shards (pinned snapshot vs tars) and return the rank's Loader; errors before any
    training. Cost: O(shards) stats (+ the eval_fraction key scan once per process). `length_fn(sample,
    (frames, height, width) or None)`: the adapter's sample_length, needed by data.group_by_length (train)."""
    return Loader(cfg, collate_fn, micro_batch, rank, world_size, split, start, length_fn)
