"""Reading a stream's samples from the tars of its plan, decoding them and making its micro batches.

Every per-sample failure - a damaged tar, a member that does not decode, a sample the adapter's collate
rejects (SampleError) - goes through the on_corrupt policy: counted by class with its shard and key
('skip') or raised ('stop'); a skipped sample is replaced by the next one, so batches keep their size
and the raw count that a resume skips stays exact. A shard of the snapshot that is gone or has another
size is a SnapshotError, never a skip.

Costs: tars are opened with seeking reads (`tarfile` "r:"), so a passed-over sample costs its member
headers (512 bytes each), a read one its bytes; a stream holds one open tar per interleaved shard and
at most `shuffle_buffer` samples (+ one per interleaved shard). A shard at a URL is read through fsspec in
ranged reads of storage.READ_BLOCK bytes, the next one prefetched in the background (passing over a sample
costs a request only when it leaves the cached blocks; two blocks of memory per open tar), network errors
retried with backoff.
"""
from __future__ import annotations

import json
import logging
import random
import tarfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from vtt.shards.conversation import SampleError
from vtt.shards.format import (ShardFormatError, decode_frame, frame_fields, frame_index, image_size,
                               split_member)
from vtt.shards.sample_meta import with_frames_kept
from vtt.trainer.data.order import ReadPlan
from vtt.trainer.data.source import RESTART_HINT, SnapshotError, Source

log = logging.getLogger("vtt.trainer.data.loader")

MAX_EVENTS = 100  # corrupt events kept for logging; counters keep counting past it
MAX_CONSECUTIVE_CORRUPT = 1000  # under 'skip', a stream that finds nothing usable stops instead of spinning


class CorruptSampleError(ShardFormatError):
    """A sample or shard that cannot be decoded or collated, raised under on_corrupt='stop'."""


class Bad(Exception):
    def __init__(self, cls: str, reason: str):
        super().__init__(f"{cls}: {reason}")
        self.cls, self.reason = cls, reason


class Corrupt:
    """Counts corrupt samples/shards and applies the policy. A resumed stream passes over its stretch up
    to the checkpoint without reading it, so only a broken tar there can be counted a second time."""

    def __init__(self, policy: str):
        self.policy = policy
        self.counts: Counter = Counter()
        self.events: list[dict] = []
        self.muted = False  # replaying what the run before a resume already counted (data/group.py)

    def report(self, cls: str, shard: str, key: str | None, reason: str) -> None:
        msg = f"{shard}: sample {key}: {cls}: {reason}" if key else f"{shard}: {cls}: {reason}"
        if self.policy == "stop":
            raise CorruptSampleError(msg + " (on_corrupt='stop'; use 'skip' to count and go on)")
        if self.muted:
            return
        self.counts[cls] += 1
        n = sum(self.counts.values())
        if n <= MAX_EVENTS:  # beyond that, counted (Loader.corrupt) but not logged one by one
            self.events.append({"class": cls, "shard": shard, "key": key, "reason": reason})
            log.warning("skipping corrupt data: %s%s", msg, " (further ones are only counted)" if n == MAX_EVENTS else "")

    def take_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events


# ---------------------------------------------------------------- tars

def open_shard(src: Source, j: int):
    """The snapshot's shard j, or SnapshotError when it is gone or is not the file that was pinned."""
    path, size = src.path(j), src.size(j)
    try:
        got, _ = src.store.stat(src.name(j))
        f = src.store.open(src.name(j), size)
    except FileNotFoundError as e:
        raise SnapshotError(f"{path}: shard of the pinned index is gone (vtt-prep deletes retired shards "
                            f"after its retention period); {RESTART_HINT}") from e
    if got != size:
        f.close()
        raise SnapshotError(f"{path}: {got} bytes on disk, {size} in the pinned index: the shard was "
                            f"replaced; {RESTART_HINT}")
    return f


def shard_samples(src: Source, j: int, start: int, want: Callable[[int], bool], frames: bool,
                  corrupt: Corrupt) -> Iterator[tuple[int, dict]]:
    """(r, raw) for every r in [start, counts[j]) with want(r), in order, exactly once: r counts the
    split's samples of shard j, raw holds the members (frames only if `frames`) or, for a sample the
    tar broke in or lacks, `__lost__`. Unwanted samples are passed over by their headers."""
    path, count = src.path(j), src.counts[j]
    r, cur, take, key, broken = -1, None, False, None, False
    with open_shard(src, j) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                while (info := tar.next()) is not None:
                    tar.members.clear()  # TarFile keeps every header it read: O(members) memory otherwise
                    parts = split_member(info.name) if info.isfile() else None
                    if parts is None:
                        continue
                    if parts[0] != key:
                        if cur is not None:
                            yield r, cur
                            cur = None
                        key, take = parts[0], False
                        if src.keep(key):
                            r += 1
                            if r >= count:  # more than the index lists: not the pinned contents
                                break
                            take = r >= start and want(r)
                            cur = {"__key__": key, "__url__": path} if take else None
                    if take and (frames or frame_index(parts[1]) is None):
                        cur[parts[1]] = tar.extractfile(info).read()
        except (OSError, tarfile.TarError, EOFError) as e:
            corrupt.report("bad_shard", path, None, f"{type(e).__name__}: {e}")
            broken = True
    if not broken and r + 1 < count:  # tarfile ends quietly at a damaged header
        corrupt.report("bad_shard", path, None, f"the tar ends after {r + 1} of its {count} samples")
        broken = True
    if cur is not None:
        yield r, ({"__key__": key, "__url__": path, "__lost__": True} if broken else cur)
    for rest in range(max(r + 1, start), count):
        if want(rest):
            yield rest, {"__key__": None, "__url__": path, "__lost__": True}


def read_sequence(plan: ReadPlan, start: int, want: Callable[[int], bool],
                  corrupt: Corrupt) -> Iterator[tuple[int, dict]]:
    """(i, raw) for G positions start+i, i = 0, 1, ..., cycling, wanted ones only. The shards of the
    group being walked are open at once, each read front to back."""
    layout = plan.layout()
    with ExitStack() as stack:
        readers: dict[int, Iterator] = {}
        group, base = None, 0
        for i, g, j, r in layout.walk(start):
            p = layout.position(g, j, r)
            if g != group or p == layout.starts[g]:  # the next group, or the same one again (one group)
                stack.close()
                readers, group = {}, g
                base = start + i - p  # G position 0 of this cycle, unwrapped
            if not want(i):
                continue
            if j not in readers:
                def want_r(rr, g=g, j=j, base=base):
                    return want(base + layout.position(g, j, rr) - start)
                gen = shard_samples(plan.src, j, r, want_r, plan.decode_frames, corrupt)
                readers[j] = gen
                stack.callback(gen.close)
            rr, raw = next(readers[j])
            assert rr == r, (rr, r)
            yield i, raw


def raw_samples(plan: ReadPlan, l: int, consumed: int, corrupt: Corrupt) -> Iterator[dict]:
    """Stream l's raw samples after the first `consumed`: its stretch in emission order, then (to
    replace corrupt ones) what follows the stretch in G, in order."""
    start, quota = plan.range_start(l), plan.quota(l)
    if consumed < quota:
        pending = plan.emission(l)[consumed:]
        first = min(pending)  # a resume starts reading where the still-owed samples start
        need = set(pending)
        held: dict[int, dict] = {}
        t = 0
        for i, raw in read_sequence(plan, start + first, lambda i: i + first in need, corrupt):
            held[i + first] = raw
            while t < len(pending) and pending[t] in held:
                yield held.pop(pending[t])
                t += 1
            if t == len(pending):
                break
    extra = max(consumed - quota, 0)
    for _, raw in read_sequence(plan, start + quota + extra, lambda i: True, corrupt):
        yield raw


# ---------------------------------------------------------------- decoding

@dataclass(frozen=True)
class FramePick:
    """Which stored frames a sample keeps: at most `num` (None: all), evenly spaced or drawn at random from
    (seed, epoch, key) - the same draw on a resume, a new one each epoch."""
    num: int | None = None
    sampling: str = "uniform"
    seed: int = 0
    epoch: int = 0

    def indices(self, stored: int, key: str) -> list[int]:
        """Sorted indices into the stored frames; a sample with num or fewer frames keeps them all (frames
        are never invented here: the adapters pad or resample). O(stored)."""
        if self.num is None or stored <= self.num:
            return list(range(stored))
        if self.sampling == "random":
            rng = random.Random(f"vtt-frames:{self.seed}:{self.epoch}:{key}")
            return sorted(rng.sample(range(stored), self.num))
        return np.linspace(0, stored - 1, self.num).round().astype(int).tolist()  # the adapters' resample


def picked(sample: dict, idx: list[int], stored: int) -> dict:
    """The sample's meta with the timestamps of the frames `idx` of `stored`, and `frame_indices` = idx."""
    return dict(sample, meta=with_frames_kept(sample["meta"], idx, stored), frame_indices=idx)


def check_frames(raw: dict) -> list[str]:
    """The sample's frame members in order; Bad when there are none or their numbers have gaps."""
    names = frame_fields(raw)
    if not names:
        raise Bad("missing_frames", "no NNNN.jpg/png members")
    if [frame_index(n) for n in names] != list(range(len(names))):
        raise Bad("frame_gap", f"frame members {names} are not numbered 0000..{len(names) - 1:04d}")
    return names


def frame_size(data: bytes) -> tuple[int, int]:
    """(height, width) of a frame member from its header, without decoding it; Bad when unreadable."""
    try:
        return image_size(data)
    except Exception as e:  # Pillow raises many types for damaged files
        raise Bad("bad_image", f"{type(e).__name__}: {e}") from e


def _decode_frames(raw: dict, pick: FramePick | None = None) -> tuple[np.ndarray, list[int] | None]:
    """(frames, their indices among the stored ones, None when all are kept)."""
    names = check_frames(raw)
    idx = pick.indices(len(names), raw["__key__"]) if pick is not None else None
    if idx is not None and len(idx) < len(names):  # only the picked frames are decoded
        names = [names[i] for i in idx]
    else:
        idx = None
    frames = []
    for name in names:
        try:
            frames.append(decode_frame(raw[name]))
        except Exception as e:  # Pillow raises many types for damaged files (OSError, SyntaxError, ...)
            raise Bad("bad_image", f"{name}: {type(e).__name__}: {e}") from e
    if len({f.shape for f in frames}) != 1:
        raise Bad("frame_size_mismatch", f"frames differ in size: {sorted({f.shape for f in frames})}")
    return np.stack(frames), idx


def decode_sample(raw: dict, decode_frames: bool = True, pick: FramePick | None = None) -> dict:
    """{key, meta, text, frames} from a raw sample, only the `pick`ed frames decoded (their indices in
    `frame_indices`, their timestamps in meta.vtt.timestamps); raises Bad(class, reason)."""
    if raw.get("__lost__"):
        raise Bad("lost_sample", "the tar ended or broke inside this sample (see bad_shard)")
    if "json" not in raw:
        raise Bad("missing_meta", "no .json member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise Bad("bad_json", str(e)) from e
    if not isinstance(meta, dict):
        raise Bad("bad_json", f"expected an object, got {type(meta).__name__}")
    if "txt" not in raw:
        raise Bad("missing_text", "no .txt member")
    try:
        text = raw["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise Bad("bad_text", str(e)) from e
    sample = {"key": raw["__key__"], "meta": meta, "text": text, "frames": None}
    if not decode_frames:
        return sample
    frames, idx = _decode_frames(raw, pick)
    sample["frames"] = frames
    return picked(sample, idx, len(frame_fields(raw))) if idx is not None else sample


# ---------------------------------------------------------------- batches

def _offenders(samples: list[tuple[dict, str]], collate_fn: Callable) -> list[tuple[int, SampleError]]:
    """The samples that collate rejects on their own (costs one collate per sample, on failure only)."""
    out = []
    for n, (sample, _) in enumerate(samples):
        try:
            collate_fn([sample])
        except SampleError as e:
            out.append((n, e))
    return out


class SampleStream:
    """Stream l's raw samples in order, decoded, and its micro batches, under the on_corrupt policy: a sample
    that does not decode or that the collate rejects is counted and replaced by the next raw one. `consumed`
    counts the raw samples taken (good or corrupt): the `raw` of a resume position."""

    def __init__(self, plan: ReadPlan, l: int, collate_fn: Callable):
        self.plan, self.l, self.collate_fn = plan, l, collate_fn
        self.corrupt = Corrupt(plan.on_corrupt)
        self.pick = FramePick(plan.num_frames, plan.frame_sampling, plan.seed, plan.epoch)
        self.consumed = plan.skip(l)
        self.raw = raw_samples(plan, l, self.consumed, self.corrupt)
        self.bad_run = 0  # samples dropped since the last good batch

    def next_raw(self) -> dict:
        self.consumed += 1
        return next(self.raw)

    def drop(self, cls: str, url: str, key: str | None, reason: str, cause: Exception) -> None:
        self.corrupt.report(cls, url, key, reason)
        self.bad_run += 1
        if self.bad_run >= MAX_CONSECUTIVE_CORRUPT:
            raise CorruptSampleError(f"{self.bad_run} corrupt samples in a row, last in {url} ({cls}: {reason}): "
                                     "the data is unusable") from cause

    def decoded(self, raw: dict) -> tuple[dict, str] | None:
        """(sample, its shard) or None when it does not decode (counted)."""
        url = raw.get("__url__", "?")
        try:
            return decode_sample(raw, self.plan.decode_frames, self.pick), url
        except Bad as e:
            self.drop(e.cls, url, raw.get("__key__"), e.reason, e)
            return None

    def batch(self, raws: list[dict] = (), size: int | None = None) -> Any:
        """The collated micro batch of `raws` (decoded here), filled up to `size` (default micro_batch) from the
        stream: with the next raw samples when some do not decode or the collate rejects them."""
        samples = [s for s in map(self.decoded, raws) if s is not None]
        size = size or self.plan.micro_batch
        while True:
            while len(samples) < size:
                got = self.decoded(self.next_raw())
                if got is not None:
                    samples.append(got)
            try:
                batch = self.collate_fn([s for s, _ in samples])
                break
            except SampleError as e:
                bad = _offenders(samples, self.collate_fn)
                if not bad:
                    e.add_note("collate rejects this batch, yet every sample of it alone: an adapter bug")
                    raise
                for n, err in reversed(bad):
                    sample, url = samples.pop(n)
                    self.drop("bad_sample", url, sample.get("key"), str(err), err)
        self.bad_run = 0
        return batch

    def info(self, i: int, raw: int) -> dict:
        """What the main process records with batch i: `raw` is where a resume of this stream reads from."""
        return {"l": self.l, "i": i, "raw": raw, "corrupt": dict(self.corrupt.counts),
                "events": self.corrupt.take_events()}


def stream_batches(plan: ReadPlan, l: int, collate_fn: Callable) -> Iterator[tuple[Any, dict]]:
    """Stream l's batches of the epoch, each with the bookkeeping the main process needs."""
    mine = plan.my_batches(l)
    if not mine:
        return
    stream = SampleStream(plan, l, collate_fn)
    for i in mine:
        batch = stream.batch()
        yield batch, stream.info(i, stream.consumed)
