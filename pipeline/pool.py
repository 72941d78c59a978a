"""A bounded process pool whose results come back in input order, without head-of-line stalls.

The shard writer needs samples in a fixed order (same inputs, same bytes), but videos take very
different times: a plain in-order window stops submitting while its oldest task runs, so one slow
video idles every other worker. Here results that finish ahead of their turn wait in a reorder buffer
while new tasks keep being submitted, until the buffer is full (by count or bytes); only then does
submission pause for the oldest one. Memory: at most 2 x workers tasks in the pool plus the buffer.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

# Results that may wait for a slow predecessor: per worker by count, and in all by bytes (a sample
# of 64 PNG frames at 336x336 is ~9 MB, of 8 JPEGs ~0.3 MB).
REORDER_ITEMS_PER_WORKER = 16
REORDER_MAX_BYTES = 256 * 2**20


def _watch_parent() -> None:
    """Pool worker initializer: exit when the main process dies (kill -9 leaves no orphans behind)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def ordered_map(fn: Callable, items: Iterable, workers: int, size: Callable = lambda r: 0,
                max_buffered: int | None = None, max_bytes: int = REORDER_MAX_BYTES) -> Iterator:
    """fn over items in worker processes; results in input order, as `map` would give them.

    At most 2 x workers tasks are submitted and unfinished; finished results wait for their turn in a
    buffer of at most `max_buffered` results (default REORDER_ITEMS_PER_WORKER x workers) or
    `max_bytes` by `size(result)`, and submission goes on while the buffer has room. So a slow item
    holds one worker, not the pool. Workers are spawned, not forked: a forked child would inherit the
    folder lock's descriptor and keep the lock alive after the main process was killed.
    """
    if workers == 1:
        yield from map(fn, items)
        return
    max_buffered = max_buffered or REORDER_ITEMS_PER_WORKER * workers
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_watch_parent)
    try:
        yield from ordered_window(lambda item: pool.submit(fn, item), _finished, items, 2 * workers,
                                  max_buffered, max_bytes, size, running={})
    except BrokenProcessPool as e:
        raise RuntimeError(
            "a vtt-prep worker process died (killed, or out of memory; a script that calls run_extract "
            "with workers > 1 needs `if __name__ == '__main__':`, as worker processes are spawned)") from e
    finally:
        # on error or Ctrl-C, queued videos must not run on before we can exit
        pool.shutdown(wait=True, cancel_futures=True)


def _finished(futures: list[Future]) -> list[tuple[Future, object]]:
    done, _ = wait(futures, return_when=FIRST_COMPLETED)
    return [(f, f.result()) for f in done]


def ordered_window(submit: Callable, collect: Callable, items: Iterable, max_running: int, max_buffered: int,
                   max_bytes: int, size: Callable, running: dict) -> Iterator:
    """The reorder window both engines share (this pool, engine_ray.py's Ray tasks): `submit(item)` starts
    one task and returns its handle; `collect(handles)` waits for at least one and returns (handle, result)
    for those finished. At most `max_running` tasks are unfinished; finished results wait for their turn in
    a buffer of `max_buffered` results or `max_bytes` by `size(result)`, and submission goes on while it
    has room. Yields the results in input order. `running` (handle -> index) is the caller's, so that it
    can cancel what is still running when the consumer stops early. Memory: the window and the buffer."""
    source, ready = iter(items), {}
    next_in = next_out = buffered = 0
    exhausted = False
    while True:
        while not exhausted and len(running) < max_running and len(ready) < max_buffered and buffered < max_bytes:
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                break
            running[submit(item)] = next_in
            next_in += 1
        if next_out in ready:
            result = ready.pop(next_out)
            buffered -= size(result)
            next_out += 1
            yield result
            continue
        if not running:
            return
        for handle, result in collect(list(running)):
            ready[running.pop(handle)] = result
            buffered += size(result)
