"""Length-grouped micro batches (data.group_by_length): what Hugging Face Trainer's `group_by_length` does with
its mega-batches, on vtt's streams.

A stream's batches of the epoch, numbered locally k = 0, 1, ... (batch i is k = i // workers), are cut into
windows of `group_window` (M) batches (ReadPlan.window: a pure function of k). For window w the stream takes the
next M x micro samples that pass the cheap checks (json, text, frame members; the frames are NOT decoded), sorts
them by the adapter's `sample_length` (`sorted_samples`), cuts the sorted list into M micro batches and emits
those in an order drawn from (seed, epoch, rank, stream, w) (ReadPlan.window_order), so the long batches are
spread over the epoch. Each batch's frames are decoded and collated when it is emitted; a sample that
then fails (a damaged frame, a collate rejection) is replaced by the next one of the stream, as without grouping.
The samples, the number of batches per rank and the streams' shares are those of the ungrouped epoch; only the
order within a window changes (and, with corrupt samples, which replacement goes where).

Token-balanced batches (data.balance_tokens): the same windows, cut by token cost instead of by count
(`window_batches`): M batches of about equal cost with a varying number of samples (micro on average), so no step
is far costlier than another: a padded batch costs samples x longest (a contiguous cut of the sorted window with
the least largest cost), a packed row the sum of its samples (longest first into the emptiest bin). The batch count,
the samples of the epoch and the resume rule are those of grouping; the loss stays the per-token mean.

Resume: the position saved with a batch says where its window started reading (`raw`), except after the
window's last batch, when it says where the next window starts. A resumed stream re-reads its window from there,
rebuilds the same sorted batches, replays the ones already emitted (decoded and collated again, so that their
replacements are drawn again: exact, corrupt samples included; the counts are not counted twice) and goes on.

Costs: a stream holds one window of encoded samples (M x micro raw samples: their JPEG bytes, roughly a tenth of
the decoded frames) plus one decoded micro batch; one `sample_length` per sample (a tokenisation of its text, no
pixels), one sort of M x micro lengths per window. The first batch of a window waits for the whole window's
reading; per step the work stays one batch's on average. A resume in the middle of a window re-reads the
window's samples and decodes and collates up to M - 1 batches again, once.
"""
from __future__ import annotations

import heapq
import math
from typing import Any, Callable, Iterator

from vtt.shards.conversation import SampleError
from vtt.trainer.data.order import ReadPlan
from vtt.trainer.data.read import Bad, SampleStream, check_frames, decode_sample, frame_size, picked

LengthFn = Callable[[dict, "tuple[int, int, int] | None"], "tuple[int, ...]"]


def measured(stream: SampleStream, raw: dict, length_fn: LengthFn) -> tuple[int, ...] | None:
    """The sample's length for sorting, from its text and its frames' count and size (one header read, no
    decoding); None when it is dropped (counted as corrupt: it would fail when decoded or collated)."""
    url, key = raw.get("__url__", "?"), raw.get("__key__")
    try:
        sample = decode_sample(raw, decode_frames=False)
        shape = None
        if stream.plan.decode_frames:
            names = check_frames(raw)
            idx = stream.pick.indices(len(names), raw["__key__"])
            if len(idx) < len(names):  # the picked frames' timestamps, as the collate will see them
                sample = picked(sample, idx, len(names))
            shape = (len(idx), *frame_size(raw[names[0]]))
        return tuple(int(x) for x in length_fn(sample, shape))
    except Bad as e:
        stream.drop(e.cls, url, key, e.reason, e)
    except SampleError as e:
        stream.drop("bad_sample", url, key, str(e), e)
    return None


def sorted_samples(lengths: list[tuple[int, ...]], micro: int) -> list[int]:
    """Indices of the window's samples in the order its micro batches are cut from. One length: sorted by it.
    Two (LLaVA: video, text; seq2seq: source, target, each padded to the batch's longest on its own): a sort on
    the sum leaves both spread (LLaVA 67% real tokens against 83-88% here, benchmarks/bench_packing.py), so a
    2-D grid: sorted by the first, cut into strips of ~sqrt(batches) batches, each strip sorted by the rest.
    Ties keep the stream's order. O(n log n)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i][0], i))
    if not lengths or len(lengths[0]) < 2:
        return order
    strip = micro * max(1, round(math.sqrt(len(lengths) / micro)))
    strips = (sorted(order[a:a + strip], key=lambda i: (lengths[i][1:], i)) for a in range(0, len(order), strip))
    return [i for part in strips for i in part]


def padded_cost(lengths: list[tuple[int, ...]]) -> int:
    """Token slots of a padded batch: its samples x the longest of each length (LLaVA pads frames and text
    apart, seq2seq source and target)."""
    return len(lengths) * sum(map(max, zip(*lengths)))


def balanced_padded(lengths: list[tuple[int, ...]], order: list[int], m: int) -> list[list[int]]:
    """`order` (length-sorted) cut into m non-empty runs whose largest padded_cost is the least possible: a
    binary search on the cap, each cap tried by a greedy cut (optimal for contiguous runs, as a run's cost
    only grows when it grows). Short samples go many to a batch, long ones few. O(n log(cost)) per window."""
    def cuts(cap: int) -> list[list[int]]:
        runs: list[list[int]] = [[]]
        top = lengths[order[0]]  # the longest of each length in the current run
        for i in order:
            wider = tuple(map(max, top, lengths[i]))
            if runs[-1] and (len(runs[-1]) + 1) * sum(wider) > cap:
                runs.append([])
                wider = lengths[i]
            runs[-1].append(i)
            top = wider
        return runs

    lo, hi = max(sum(x) for x in lengths), padded_cost(lengths)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(cuts(mid)) <= m else (mid + 1, hi)
    runs = cuts(lo)
    while len(runs) < m:  # fewer runs than batches: halve the one with most samples (its cost can only fall)
        k = max(range(len(runs)), key=lambda r: len(runs[r]))
        runs[k:k + 1] = [runs[k][:len(runs[k]) // 2], runs[k][len(runs[k]) // 2:]]
    return runs


def balanced_packed(lengths: list[tuple[int, ...]], m: int) -> list[list[int]]:
    """The window's samples in m bins of about equal total tokens (a packed row costs the sum of its samples):
    longest first, each into the bin holding the fewest tokens (LPT; the largest bin stays within one sample of
    the mean). Bins mix long and short samples; each keeps the stream's order. O(n log n) per window."""
    total = [sum(x) for x in lengths]
    bins: list[list[int]] = [[] for _ in range(m)]
    load = [(0, b) for b in range(m)]  # a heap of (tokens, bin)
    for i in sorted(range(len(total)), key=lambda i: (-total[i], i)):
        tokens, b = heapq.heappop(load)
        bins[b].append(i)
        heapq.heappush(load, (tokens + total[i], b))
    return [sorted(b) for b in bins]


def window_batches(lengths: list[tuple[int, ...]], micro: int, balance: str) -> list[list[int]]:
    """The window's samples (indices) cut into len // micro micro batches: `micro` each, by length
    (sorted_samples); or, data.balance_tokens, of about equal token cost with a varying number of samples
    (`balance` = 'packed': rows of summed tokens; 'padded': samples x longest). Balanced batches are never
    costlier than the count cut's largest, so the memory planner's micro x longest-sample bound still holds."""
    m, order = len(lengths) // micro, sorted_samples(lengths, micro)
    by_count = [order[a:a + micro] for a in range(0, len(order), micro)]
    if balance == "padded":  # the count cut is among the contiguous cuts searched
        return balanced_padded(lengths, order, m)
    if balance == "packed":  # LPT is within 4/3 of the best cut, not always below the count cut: keep the better
        return min(balanced_packed(lengths, m), by_count,
                   key=lambda bins: max(sum(sum(lengths[i]) for i in b) for b in bins))
    return by_count


def sorted_window(stream: SampleStream, n: int, length_fn: LengthFn) -> list[list[dict]]:
    """The next n usable raw samples of the stream, cut into micro batches by length (window_batches)."""
    raws, lengths = [], []
    while len(raws) < n:
        raw = stream.next_raw()
        length = measured(stream, raw, length_fn)
        if length is not None:
            raws.append(raw)
            lengths.append(length)
            stream.bad_run = 0  # the corrupt-in-a-row stop counts consecutive drops, not a window's
    batches = window_batches(lengths, stream.plan.micro_batch, stream.plan.balance)
    return [[raws[i] for i in b] for b in batches]


def grouped_batches(plan: ReadPlan, l: int, collate_fn: Callable,
                    length_fn: LengthFn) -> Iterator[tuple[Any, dict]]:
    """Stream l's batches of the epoch from its start_batch on, length-grouped by window, each with the
    bookkeeping the main process needs (as read.stream_batches)."""
    mine = plan.my_batches(l)
    if not mine:
        return
    first = mine[0] // plan.workers  # the local number of the first batch still owed
    stream = SampleStream(plan, l, collate_fn)
    for w in range(first // plan.group_window, plan.windows(l)):
        ks, start = plan.window(l, w), stream.consumed
        stream.corrupt.muted = first > ks[0]  # the run before the resume counted this window's reading
        batches = sorted_window(stream, len(ks) * plan.micro_batch, length_fn)
        for k, j in zip(ks, plan.window_order(l, w)):
            stream.corrupt.muted = k < first
            batch = stream.batch(batches[j], len(batches[j]))
            batches[j] = []  # its encoded samples are no longer needed
            if k >= first:
                yield batch, stream.info(l + k * plan.workers, stream.consumed if k == ks[-1] else start)
