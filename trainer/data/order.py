"""Sample-order arithmetic of the streaming reader: no I/O, only indices (see data/loader.py for the picture).

One epoch: the non-empty shards, in an order drawn from (seed, epoch), are cut into groups of K
(`interleave_shards`); within a group the shards take turns sample by sample. The groups in order form
one cyclic sequence G of the epoch's samples. Stream s = rank x W + l owns the stretch of G that starts
after the stretches of streams < s and is exactly as long as its batches need, and emits it in the order
of a seeded shuffle buffer computed on indices alone. Everything here is a pure function of
(shard counts, seed, epoch, rank, world size, workers, micro batch, K, buffer), so a position
`{epoch, batch, raw}` resumes exactly and every rank gets the same number of batches.

Costs as the dataset grows: a stream's plan is O(shards) to lay out G and O(its samples) for its
emission order (a list of ints); locating a position is O(log groups + K log samples-per-shard).
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Iterator

from vtt.shards.format import ShardFormatError
from vtt.trainer.data.source import Source


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: the next batch is `batch` of `epoch`. `raw[l]` counts the samples stream l
    has consumed (good or corrupt) so that skipped corrupt samples do not shift a resumed stream. The rest
    records what the order depended on, so a resume can tell whether it is still the same order:
    `snapshot` is the shard list the epoch was reading (Snapshot.to_dict) and `counts` its per-shard
    sample counts in this split."""
    epoch: int = 0
    batch: int = 0
    raw: tuple[int, ...] | None = None
    corrupt: dict = field(default_factory=dict)
    world_size: int | None = None
    num_workers: int | None = None
    micro_batch: int | None = None
    seed: int | None = None
    num_samples: int | None = None
    shuffle_buffer: int | None = None
    interleave_shards: int | None = None
    eval_fraction: float | None = None
    snapshot: dict | None = None
    counts: tuple[int, ...] | None = None
    group_window: int | None = None  # data.group_by_length's window in micro batches, 0 = not grouped
    balance: str | None = None  # data.balance_tokens: 'packed' | 'padded' cost, '' = batches of micro_batch samples

    ORDER_KEYS = ("world_size", "num_workers", "micro_batch", "seed", "shuffle_buffer", "interleave_shards",
                  "eval_fraction", "group_window", "balance")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("raw", "counts"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict | StreamPosition | None) -> StreamPosition:
        if d is None:
            return cls()
        if isinstance(d, StreamPosition):
            return d
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("raw", "counts"):
            if known.get(k) is not None:
                known[k] = tuple(int(x) for x in known[k])
        if "snapshot" not in d and known.get("batch", 0) > 0:
            known["interleave_shards"] = 1  # saved before interleaving existed: it read shards one by one
        if "group_window" not in d and known.get("batch", 0) > 0:
            known["group_window"] = 0  # saved before length grouping existed: not grouped
        if "balance" not in d and known.get("batch", 0) > 0:
            known["balance"] = ""  # saved before token-balanced batches existed: micro_batch samples each
        return cls(**known)

    def order_changes(self, now: dict) -> list[str]:
        """What differs from `now` (ORDER_KEYS + num_samples) among the settings this position recorded."""
        return [f"{k} was {getattr(self, k)}, now {v}" for k, v in now.items()
                if getattr(self, k) is not None and getattr(self, k) != v]


def batches_per_rank(total: int, micro_batch: int, world_size: int, split: str, where: str) -> int:
    per_step = micro_batch * world_size
    if split == "eval":
        return math.ceil(total / per_step)
    if total < per_step:
        raise ShardFormatError(f"{where}: {total} training samples, fewer than one global micro batch "
                               f"(micro_batch {micro_batch} x world_size {world_size} = {per_step})")
    return total // per_step


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
class Layout:
    """The sequence G of one epoch: `groups` of shard ids; inside a group the shards take turns (round r
    holds sample r of every shard that has more than r samples), groups follow each other."""
    counts: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]  # G position of each group's first sample
    total: int

    @classmethod
    def build(cls, counts: tuple[int, ...], order: list[int], k: int) -> Layout:
        groups = tuple(tuple(order[i:i + k]) for i in range(0, len(order), k))
        starts, at = [], 0
        for g in groups:
            starts.append(at)
            at += sum(counts[j] for j in g)
        return cls(counts, groups, tuple(starts), at)

    def _before_round(self, g: int, r: int) -> int:
        """Samples of group g in rounds < r."""
        return sum(min(self.counts[j], r) for j in self.groups[g])

    def position(self, g: int, j: int, r: int) -> int:
        """G position of sample r of shard j (a member of group g)."""
        ahead = 0
        for x in self.groups[g]:
            if x == j:
                break
            ahead += self.counts[x] > r
        return self.starts[g] + self._before_round(g, r) + ahead

    def locate(self, p: int) -> tuple[int, int, int]:
        """(group, round, index among the round's shards) of G position p (0 <= p < total)."""
        g = bisect.bisect_right(self.starts, p) - 1
        q = p - self.starts[g]
        lo, hi = 0, max(self.counts[j] for j in self.groups[g])
        while lo < hi:  # the last round r with before_round(r) <= q
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._before_round(g, mid) <= q else (lo, mid - 1)
        return g, lo, q - self._before_round(g, lo)

    def walk(self, start: int) -> Iterator[tuple[int, int, int, int]]:
        """(i, g, j, r) for G positions start, start+1, ... cycling forever: i counts from 0 at `start`,
        sample r of shard j (in group g) sits there. O(K) per round of a group."""
        g, r, a = self.locate(start % self.total)
        i = 0
        while True:
            members = self.groups[g]
            end = max(self.counts[j] for j in members)
            while r < end:
                active = [j for j in members if self.counts[j] > r]
                for j in active[a:]:
                    yield i, g, j, r
                    i += 1
                r, a = r + 1, 0
            g, r = (g + 1) % len(self.groups), 0


@dataclass(frozen=True)
class ReadPlan:
    """One epoch of one rank, as plain data (DataLoader workers get it by fork or pickle).

    Stream l (of `workers` on this rank) makes the rank's batches i with i % workers == l; its stretch of
    G is as long as those batches need, so ranks and workers get disjoint, equal shares; samples
    replacing corrupt ones come from after the stretch. Eval keeps index order (K = 1) and wraps
    around to pad the last batches."""
    src: Source
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
    interleave: int
    on_corrupt: str
    decode_frames: bool
    num_frames: int | None = None  # frames kept per sample (data_read.pick_frames); None: all stored
    frame_sampling: str = "uniform"
    group_window: int = 0  # data.group_by_length: micro batches per length-sorted window; 0 = off
    balance: str = ""  # data.balance_tokens: a window's batches of equal 'packed' or 'padded' token cost

    def my_batches(self, l: int, start: int | None = None) -> range:
        first = self.start_batch if start is None else start
        first += (l - first) % self.workers
        return range(first, self.batches, self.workers)

    def skip(self, l: int) -> int:
        """Raw samples stream l passes over: the saved count, else (no corrupt samples assumed) those of its
        batches before start_batch, or, grouping, before the window holding its first batch still owed."""
        if self.raw_skip is not None:
            return self.raw_skip[l]
        done = len(range(l, self.start_batch, self.workers))
        if self.group_window:
            done -= done % self.group_window
        return done * self.micro_batch

    def window(self, l: int, w: int) -> range:
        """Stream l's local batch numbers (batch i is local number i // workers) in length-sorted window w:
        a pure function of the batch index, so a resume finds the window's start from its batch alone."""
        return range(w * self.group_window, min((w + 1) * self.group_window, len(self.my_batches(l, 0))))

    def windows(self, l: int) -> int:
        """Length-sorted windows of stream l this epoch (the last one may be shorter)."""
        return -(-len(self.my_batches(l, 0)) // self.group_window)

    def window_order(self, l: int, w: int) -> list[int]:
        """The order window w of stream l emits its length-sorted batches in: drawn from (seed, epoch, rank,
        stream, window), so long batches come anywhere in the epoch, not all at its end."""
        order = list(range(len(self.window(l, w))))
        random.Random(f"vtt-group-order:{self.seed}:{self.epoch}:{self.rank}:{l}:{w}").shuffle(order)
        return order

    def quota(self, l: int) -> int:
        return len(self.my_batches(l, 0)) * self.micro_batch

    def range_start(self, l: int) -> int:
        per_rank = sum(self.quota(w) for w in range(self.workers))
        return self.rank * per_rank + sum(self.quota(w) for w in range(l))

    def layout(self) -> Layout:
        order = [j for j, c in enumerate(self.src.counts) if c > 0]
        if self.split == "train":
            random.Random(f"vtt-shard-order:{self.seed}:{self.epoch}").shuffle(order)
        return Layout.build(self.src.counts, order, self.interleave if self.split == "train" else 1)

    def emission(self, l: int) -> list[int]:
        """The order in which stream l emits the samples of its stretch (indices into the stretch)."""
        if self.split != "train":
            return list(range(self.quota(l)))
        rng = random.Random(f"vtt-sample-shuffle:{self.seed}:{self.epoch}:{self.rank}:{l}")
        return shuffle_order(self.quota(l), self.shuffle_buffer, rng)
