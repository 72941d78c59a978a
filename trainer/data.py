"""Streaming reader of vtt shards for training and evaluation.

The stream is a pure function of (index, seed, epoch, rank, world size, workers, micro batch), so a
position `{epoch, batch, raw}` is enough to resume exactly; a resume passes over the samples already
used without decoding or keeping them (tar streams are still read through, no seeking).

One epoch: the shards, in an order drawn from (seed, epoch), form one sequence of samples. There are
S = world_size x W streams (W = max(num_workers, 1)); stream (rank, l) makes the rank's batches i
with i % W == l, and owns the next stretch of the sequence, exactly as long as those batches need.
So every rank gets the same number of batches and ranks and workers disjoint samples, with any number
of shards (streams may share a shard); only the last `total % (world_size x micro_batch)` samples of
the epoch's order are left out. Within its stretch a stream emits in the order of a seeded shuffle
buffer. The DataLoader's round robin puts worker batches back in order, rotated on resume so that
worker 0 serves the first batch still owed. Eval: index order, no shuffle, the last batches padded
by wrapping around, the same number of batches on every rank.

Use:
    loader = build_loader(cfg, adapter.collate, micro_batch, rank, world_size)  # checks shards now
    it = iter(loader)                       # train: endless over epochs; stop at max_steps
    batch = next(it)                        # state() counts batches handed out, so take them with
    ckpt["data"] = loader.state()           # next(it) (zip(loader, ...) would pull one extra)
    build_loader(..., start=ckpt["data"])   # resumes with the very next batch
    loader.corrupt, loader.corrupt_events   # {class: count}, first MAX_EVENTS {class, shard, key, reason}
    for batch in build_loader(..., split="eval"): ...   # one deterministic pass per iter()
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import pickle
import random
import re
import tarfile
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from vtt.shards.format import ShardFormatError, frame_fields
from vtt.shards.index import check_index, read_index

log = logging.getLogger(__name__)
_FRAME_MEMBER = re.compile(r"\.\d{4}\.(jpg|png)$", re.IGNORECASE)

ON_CORRUPT = ("skip", "stop")
SPLITS = ("train", "eval")
MAX_EVENTS = 100  # corrupt events kept for logging; counters keep counting past it
MAX_CONSECUTIVE_CORRUPT = 1000  # under 'skip', a stream that finds nothing good stops instead of spinning


class CorruptSampleError(ShardFormatError):
    """A sample or shard that cannot be decoded, raised under on_corrupt='stop'."""


@dataclass(frozen=True)
class DataConfig:
    shards: str
    eval_shards: str | None = None  # a held-out shards folder with its own index.json
    eval_fraction: float = 0.0  # else: this fraction of keys (by hash) is held out of training
    shuffle_buffer: int = 256  # samples; 0 or 1 = no sample shuffle
    seed: int = 0
    num_workers: int = 0
    on_corrupt: str = "skip"  # skip | stop
    decode_frames: bool = True  # False: frames stay undecoded (text-only models), sample["frames"] is None
    verify_checksums: bool = False  # sha256 of every tar against the index before training
    prefetch_factor: int = 2

    def __post_init__(self):
        if not self.shards:
            raise ValueError("DataConfig.shards: a shards folder is required")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_shards and self.eval_fraction:
            raise ValueError("DataConfig: give eval_shards or eval_fraction, not both")
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(f"DataConfig.on_corrupt must be one of {ON_CORRUPT}, got {self.on_corrupt!r}")
        if self.shuffle_buffer < 0 or self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError("DataConfig: shuffle_buffer and num_workers must be >= 0, prefetch_factor >= 1")

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_shards) or self.eval_fraction > 0


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: the next batch is `batch` of `epoch`. `raw[l]` counts the samples stream l
    has consumed (good or corrupt) so that skipped corrupt samples do not shift a resumed stream."""
    epoch: int = 0
    batch: int = 0
    raw: tuple[int, ...] | None = None
    corrupt: dict = field(default_factory=dict)
    world_size: int | None = None
    num_workers: int | None = None
    micro_batch: int | None = None
    seed: int | None = None
    num_samples: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["raw"] = list(self.raw) if self.raw is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict | StreamPosition | None) -> StreamPosition:
        if d is None:
            return cls()
        if isinstance(d, StreamPosition):
            return d
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if known.get("raw") is not None:
            known["raw"] = tuple(int(x) for x in known["raw"])
        return cls(**known)


# ---------------------------------------------------------------- index and split

def in_eval_slice(key: str, fraction: float) -> bool:
    """Deterministic held-out slice: same answer in every process and run (no Python hash())."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0 ** 64


def checked_index(folder: str, verify_checksums: bool = False):
    """read_index + check_index; stops with one message listing every disagreement."""
    index = read_index(folder)
    # sha256 of every tar is slow; an eval loader built every N steps must not redo it
    stamp = (str(Path(folder).resolve()),) + tuple(_stat_stamp(Path(folder) / s.url) for s in index.shards)
    verify = verify_checksums and stamp not in _VERIFIED
    problems = check_index(folder, index, checksums=verify)
    if problems:
        raise ShardFormatError(f"{folder}: index.json disagrees with the tars on disk (rerun vtt-prep "
                               "extract or vtt-prep verify):\n  " + "\n  ".join(problems))
    if not index.shards or index.num_samples == 0:
        raise ShardFormatError(f"{folder}: index.json lists no samples")
    if verify:
        _VERIFIED.add(stamp)
    return index


_VERIFIED: set[tuple] = set()


def _stat_stamp(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (path.name, None)
    return (path.name, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4096)
def _scan_keys(path: str, size: int, mtime: float) -> tuple[str, ...]:
    """Sample keys of one tar from its member headers only (no member data is read)."""
    keys: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _ = base_plus_ext(member.name)
                if member.isreg() and key is not None and (not keys or keys[-1] != key):
                    keys.append(key)
    except (OSError, tarfile.TarError) as e:
        raise ShardFormatError(f"{path}: unreadable tar: {e}") from e
    return tuple(keys)


def _split_counts(folder: Path, index, fraction: float, want_eval: bool) -> list[int]:
    if fraction <= 0:
        return [s.nsamples for s in index.shards]
    counts = []
    for s in index.shards:
        p = folder / s.url
        st = p.stat()
        keys = _scan_keys(str(p), st.st_size, st.st_mtime)
        counts.append(sum(in_eval_slice(k, fraction) == want_eval for k in keys))
    return counts


@dataclass(frozen=True)
class _Source:
    """The shards of one split: paths, per-shard sample counts and the key filter."""
    paths: tuple[str, ...]
    counts: tuple[int, ...]
    fraction: float  # eval_fraction slice; 0 = keep every key
    want_eval: bool

    @property
    def total(self) -> int:
        return sum(self.counts)

    def keep(self, key: str) -> bool:
        return self.fraction <= 0 or in_eval_slice(key, self.fraction) == self.want_eval


def resolve_source(cfg: DataConfig, split: str) -> _Source:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "eval" and not cfg.has_eval:
        raise ValueError("no eval set configured: set DataConfig.eval_shards or eval_fraction")
    folder = Path(cfg.eval_shards if split == "eval" and cfg.eval_shards else cfg.shards)
    index = checked_index(str(folder), cfg.verify_checksums)
    fraction = 0.0 if (split == "eval" and cfg.eval_shards) else cfg.eval_fraction
    counts = _split_counts(folder, index, fraction, want_eval=split == "eval")
    src = _Source(tuple(str(folder / s.url) for s in index.shards), tuple(counts), fraction, split == "eval")
    if src.total == 0:
        raise ShardFormatError(f"{folder}: the {split} split is empty (eval_fraction={cfg.eval_fraction})")
    return src


def _batches_per_rank(total: int, micro_batch: int, world_size: int, split: str, where: str) -> int:
    per_step = micro_batch * world_size
    if split == "eval":
        return math.ceil(total / per_step)
    if total < per_step:
        raise ShardFormatError(f"{where}: {total} training samples, fewer than one global micro batch "
                               f"(micro_batch {micro_batch} x world_size {world_size} = {per_step})")
    return total // per_step


def steps_per_epoch(cfg: DataConfig, micro_batch: int, world_size: int) -> int:
    """Micro batches each rank yields per training epoch (the same on every rank)."""
    return _batches_per_rank(resolve_source(cfg, "train").total, micro_batch, world_size, "train", cfg.shards)


def eval_batches(cfg: DataConfig, micro_batch: int, world_size: int) -> int:
    """Micro batches each rank yields per evaluation pass (the last ones wrap around to pad)."""
    return _batches_per_rank(resolve_source(cfg, "eval").total, micro_batch, world_size, "eval", "eval")


# ---------------------------------------------------------------- reading and decoding

class _Bad(Exception):
    def __init__(self, cls: str, reason: str):
        super().__init__(f"{cls}: {reason}")
        self.cls, self.reason = cls, reason


class _Corrupt:
    """Counts corrupt samples/shards and applies the policy. A resumed stream re-reads its range up to
    the checkpoint without decoding, so only a broken tar there can be counted a second time."""

    def __init__(self, policy: str):
        self.policy = policy
        self.counts: Counter = Counter()
        self.events: list[dict] = []

    def report(self, cls: str, shard: str, key: str | None, reason: str) -> None:
        msg = f"{shard}: sample {key}: {cls}: {reason}" if key else f"{shard}: {cls}: {reason}"
        if self.policy == "stop":
            raise CorruptSampleError(msg + " (on_corrupt='stop'; use 'skip' to count and go on)")
        self.counts[cls] += 1
        n = sum(self.counts.values())
        if n <= MAX_EVENTS:  # beyond that, counted (Loader.corrupt) but not logged one by one
            self.events.append({"class": cls, "shard": shard, "key": key, "reason": reason})
            log.warning("skipping corrupt data: %s%s", msg,
                        " (further ones are only counted)" if n == MAX_EVENTS else "")

    def take_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events


class _Selector:
    """tar_file_iterator's select_files: decides per member, from its name alone, whether its data is
    read. Counts kept samples along the stream (`k`) so that unwanted ones are passed over unloaded."""

    def __init__(self, keep: Callable[[str], bool], want: Callable[[int], bool], frames: bool, k: int):
        self.keep, self.want, self.frames, self.k = keep, want, frames, k
        self.key: str | None = None
        self.take = False
        self.taken: dict[str, int] = {}  # key -> k of samples selected but not yet yielded

    def __call__(self, fname: str) -> bool:
        key, _ = base_plus_ext(fname)
        if key is None:
            return False
        if key != self.key:
            self.key, self.take = key, False
            if self.keep(key):
                self.take = self.want(self.k)
                if self.take:
                    self.taken[key] = self.k
                self.k += 1
        return self.take and (self.frames or _FRAME_MEMBER.search(fname) is None)


def _shard_samples(path: str, sel: _Selector, corrupt: _Corrupt) -> Iterator[tuple[int, dict]]:
    """(k, raw sample) for the selected samples of one tar, in stored order. A sample selected but
    never completed (the tar ends or breaks inside it) comes out as a `__lost__` sample."""
    try:
        with open(path, "rb") as f:
            members = ({**m, "__url__": path} for m in tar_file_iterator(f, select_files=sel))
            for sample in group_by_keys(members):
                yield sel.taken.pop(sample["__key__"]), sample
    except (OSError, tarfile.TarError, ValueError) as e:
        corrupt.report("bad_shard", path, None, f"{type(e).__name__}: {e}")
    for key, k in sorted(sel.taken.items(), key=lambda kv: kv[1]):
        yield k, {"__key__": key, "__url__": path, "__lost__": True}
    sel.taken.clear()


def _decode_frames(raw: dict) -> np.ndarray:
    names = frame_fields(raw)
    if not names:
        raise _Bad("missing_frames", "no NNNN.jpg/png members")
    want = [f"{i:04d}" for i in range(len(names))]
    if [n.split(".")[0] for n in names] != want:
        raise _Bad("frame_gap", f"frame members {names} are not numbered 0000..{len(names) - 1:04d}")
    frames = []
    for name in names:
        try:
            with Image.open(io.BytesIO(raw[name])) as im:
                frames.append(np.asarray(im if im.mode == "RGB" else im.convert("RGB")))
        except Exception as e:  # Pillow raises many types for damaged files (OSError, SyntaxError, ...)
            raise _Bad("bad_image", f"{name}: {type(e).__name__}: {e}") from e
    if len({f.shape for f in frames}) != 1:
        raise _Bad("frame_size_mismatch", f"frames differ in size: {sorted({f.shape for f in frames})}")
    return np.stack(frames)


def decode_sample(raw: dict, decode_frames: bool = True) -> dict:
    """{key, meta, text, frames} from a raw WebDataset sample; raises _Bad(class, reason)."""
    if raw.get("__lost__"):
        raise _Bad("lost_sample", "the tar ended or broke inside this sample (see bad_shard)")
    if "json" not in raw:
        raise _Bad("missing_meta", "no .json member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise _Bad("bad_json", str(e)) from e
    if not isinstance(meta, dict):
        raise _Bad("bad_json", f"expected an object, got {type(meta).__name__}")
    if "txt" not in raw:
        raise _Bad("missing_text", "no .txt member")
    try:
        text = raw["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("bad_text", str(e)) from e
    frames = _decode_frames(raw) if decode_frames else None
    return {"key": raw["__key__"], "meta": meta, "text": text, "frames": frames}


def shuffle_order(n: int, bufsize: int, rng: random.Random) -> list[int]:
    """The emission order of a `bufsize` shuffle buffer over n items, computed on indices alone: the
    stream still reads sequentially holding at most `bufsize` samples, and a resume knows which
    samples were emitted before the checkpoint without reading them."""
    if bufsize <= 1:
        return list(range(n))
    out: list[int] = []
    buf: list[int] = []
    for k in range(n):
        if len(buf) < bufsize:
            buf.append(k)
            continue
        j = rng.randrange(bufsize)
        out.append(buf[j])
        buf[j] = k
    rng.shuffle(buf)
    return out + buf


@dataclass(frozen=True)
class _Plan:
    """One epoch of one rank, as plain data (DataLoader workers get it by fork or pickle).

    The epoch's samples form a cyclic sequence G (shards in the epoch's order). Stream s = rank x W + l
    owns the range of G that starts after the ranges of streams < s and is exactly as long as its
    batches need, so ranks and workers get disjoint, equal shares; samples replacing corrupt ones
    come from after the range. Eval keeps index order and wraps around to pad the last batches."""
    src: _Source
    split: str
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int  # streams per rank (num_workers, or 1 in the main process)
    micro_batch: int
    batches: int  # per rank per epoch
    start_batch: int
    raw_skip: tuple[int, ...] | None
    shuffle_buffer: int
    on_corrupt: str
    decode_frames: bool

    def my_batches(self, l: int, start: int | None = None) -> range:
        first = self.start_batch if start is None else start
        first += (l - first) % self.workers
        return range(first, self.batches, self.workers)

    def skip(self, l: int) -> int:
        if self.raw_skip is not None:
            return self.raw_skip[l]
        return len(range(l, self.start_batch, self.workers)) * self.micro_batch

    def quota(self, l: int) -> int:
        return len(self.my_batches(l, 0)) * self.micro_batch

    def range_start(self, l: int) -> int:
        per_rank = sum(self.quota(w) for w in range(self.workers))
        return self.rank * per_rank + sum(self.quota(w) for w in range(l))

    def shard_order(self) -> list[int]:
        order = [j for j, c in enumerate(self.src.counts) if c > 0]
        if self.split == "train":
            random.Random(f"vtt-shard-order:{self.seed}:{self.epoch}").shuffle(order)
        return order

    def emission(self, l: int) -> list[int]:
        """The order in which stream l emits the samples of its range (indices into the range)."""
        if self.split != "train":
            return list(range(self.quota(l)))
        rng = random.Random(f"vtt-sample-shuffle:{self.seed}:{self.epoch}:{self.rank}:{l}")
        return shuffle_order(self.quota(l), self.shuffle_buffer, rng)

    def read(self, start: int, want: Callable[[int], bool], corrupt: _Corrupt) -> Iterator[tuple[int, dict]]:
        """(k, raw) for the k-th sample of G from position `start` on, cycling, wanted ones only."""
        order = self.shard_order()
        cum = list(itertools.accumulate(self.src.counts[j] for j in order))
        start %= cum[-1]
        i0 = next(i for i, c in enumerate(cum) if c > start)
        k = -(start - (cum[i0 - 1] if i0 else 0))  # negative: the head of the first shard, skipped
        empty = 0
        for i in itertools.count(i0):
            sel = _Selector(self.src.keep, lambda x: x >= 0 and want(x), self.decode_frames, k)
            yield from _shard_samples(self.src.paths[order[i % len(order)]], sel, corrupt)
            empty = 0 if sel.k > k else empty + 1
            k = sel.k
            if empty > len(order):
                raise ShardFormatError(f"no readable samples in any of the {len(order)} shards "
                                       f"(e.g. {self.src.paths[order[0]]})")

    def raw_samples(self, l: int, consumed: int, corrupt: _Corrupt) -> Iterator[dict]:
        """Stream l's raw samples after the first `consumed`: its range in emission order, then
        (to replace corrupt ones) what follows the range in G, in order."""
        start, quota = self.range_start(l), self.quota(l)
        if consumed < quota:
            pending = self.emission(l)[consumed:]
            need = set(pending)
            held: dict[int, dict] = {}
            t = 0
            for k, raw in self.read(start, need.__contains__, corrupt):
                held[k] = raw
                while t < len(pending) and pending[t] in held:
                    yield held.pop(pending[t])
                    t += 1
                if t == len(pending):
                    break
        extra = max(consumed - quota, 0)
        for _, raw in self.read(start + quota + extra, lambda k: True, corrupt):
            yield raw


def _stream_batches(plan: _Plan, l: int, collate_fn: Callable) -> Iterator[tuple[Any, dict]]:
    """Stream l's batches of the epoch, each with the bookkeeping the main process needs."""
    mine = plan.my_batches(l)
    if not mine:
        return
    corrupt = _Corrupt(plan.on_corrupt)
    consumed = plan.skip(l)
    raw = plan.raw_samples(l, consumed, corrupt)
    bad_run = 0
    for i in mine:
        samples = []
        while len(samples) < plan.micro_batch:
            sample = next(raw)
            consumed += 1
            try:
                samples.append(decode_sample(sample, plan.decode_frames))
                bad_run = 0
            except _Bad as e:
                corrupt.report(e.cls, sample.get("__url__", "?"), sample.get("__key__"), e.reason)
                bad_run += 1
                if bad_run >= MAX_CONSECUTIVE_CORRUPT:
                    raise CorruptSampleError(f"{bad_run} corrupt samples in a row, last in "
                                             f"{sample.get('__url__')}: the data is unusable") from e
        info = {"l": l, "i": i, "raw": consumed, "corrupt": dict(corrupt.counts),
                "events": corrupt.take_events()}
        yield collate_fn(samples), info


# ---------------------------------------------------------------- the loader

def _identity(x):
    return x


class _EpochDataset(torch.utils.data.IterableDataset):
    def __init__(self, plan: _Plan, collate_fn: Callable):
        self.plan, self.collate_fn = plan, collate_fn

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        j = info.id if info is not None else 0
        # DataLoader asks worker 0 first; rotate so worker 0 serves the first batch still owed.
        l = (self.plan.start_batch + j) % self.plan.workers
        stream = _stream_batches(self.plan, l, self.collate_fn)
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
                 world_size: int, split: str, start: StreamPosition | dict | None):
        if micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad micro_batch={micro_batch} rank={rank} world_size={world_size}")
        self.cfg, self.collate_fn, self.split = cfg, collate_fn, split
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.src = resolve_source(cfg, split)
        where = cfg.eval_shards if split == "eval" and cfg.eval_shards else cfg.shards
        self.batches_per_epoch = _batches_per_rank(self.src.total, micro_batch, world_size, split, where)
        self.workers = max(cfg.num_workers, 1)
        pos = StreamPosition.from_dict(start)
        self._check_resumable(pos)
        self.epoch, self.batch, self._raw = pos.epoch, pos.batch, pos.raw
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._raw = self.epoch + 1, 0, None
        self._corrupt_base: Counter = Counter(pos.corrupt)
        self._corrupt_live: dict[int, dict] = {}
        self.corrupt_events: list[dict] = []  # the first MAX_EVENTS corrupt samples, for the run log
        n_shards = sum(c > 0 for c in self.src.counts)
        if split == "train" and n_shards < world_size * self.workers and rank == 0:
            log.warning("%s: %d non-empty shards for %d ranks x %d workers: streams share shards and "
                        "read past each other's samples (correct, more I/O; write smaller shards)",
                        where, n_shards, world_size, self.workers)

    def _check_resumable(self, pos: StreamPosition) -> None:
        now = {"world_size": self.world_size, "num_workers": self.cfg.num_workers,
               "micro_batch": self.micro_batch, "seed": self.cfg.seed, "num_samples": self.src.total}
        then = {k: getattr(pos, k) for k in now if getattr(pos, k) is not None}
        diff = {k: (v, now[k]) for k, v in then.items() if v != now[k]}
        if diff:
            raise ValueError("cannot resume the data stream exactly: "
                             + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in diff.items())
                             + " (the sample order depends on these)")
        if pos.raw is not None and len(pos.raw) != self.workers:
            raise ValueError(f"resume position has {len(pos.raw)} worker streams, this loader {self.workers}")

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _plan(self, epoch: int, start_batch: int, raw: tuple[int, ...] | None) -> _Plan:
        cfg = self.cfg
        return _Plan(self.src, self.split, cfg.seed, epoch, self.rank, self.world_size, self.workers,
                     self.micro_batch, self.batches_per_epoch, start_batch, raw,
                     cfg.shuffle_buffer if self.split == "train" else 0, cfg.on_corrupt, cfg.decode_frames)

    def __iter__(self) -> Iterator[Any]:
        if self.split == "eval":
            yield from self._run(self._plan(0, 0, None), track=False)
            self._fold_counters()
            return
        while True:
            yield from self._run(self._plan(self.epoch, self.batch, self._raw), track=True)
            self._fold_counters()
            self.epoch, self.batch, self._raw = self.epoch + 1, 0, None

    def _run(self, plan: _Plan, track: bool) -> Iterator[Any]:
        ds = _EpochDataset(plan, self.collate_fn)
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
        """JSON-able StreamPosition of the next batch (train); save it with the checkpoint."""
        return StreamPosition(self.epoch, self.batch, self._raw, self.corrupt, self.world_size,
                              self.cfg.num_workers, self.micro_batch, self.cfg.seed, self.src.total).to_dict()


def build_loader(cfg: DataConfig, collate_fn: Callable, micro_batch: int, rank: int = 0,
                 world_size: int = 1, split: str = "train",
                 start: StreamPosition | dict | None = None) -> Loader:
    """Validate the shards (index vs tars) and return the rank's Loader; errors before any training."""
    return Loader(cfg, collate_fn, micro_batch, rank, world_size, split, start)
