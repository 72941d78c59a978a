"""One slow video must not stall the pool: the others finish meanwhile, the output stays byte-identical,
and the results waiting for their turn are bounded. Measured by order of events, not by timing."""
import subprocess
import time
from pathlib import Path

import pytest
from prep_helpers import calls, cfg, env, logging_ffmpeg, make_corpus, prep_cmd, state_files

from vtt.pipeline.discover import discover
from vtt.pipeline.pool import ordered_map
from vtt.pipeline.run import run_extract, sample_order

WAIT_S = 20  # the held task gives up after this; the assertions then fail (old behaviour), never hang


def _held(folder: Path, wanted: int) -> int:
    """Wait until `wanted` other tasks are done (or WAIT_S), then report how many ever started."""
    deadline = time.monotonic() + WAIT_S
    while len(list(folder.glob("done-*"))) < wanted and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # room for a bound violation to show; the check below does not depend on it
    return len(list(folder.glob("start-*")))


def _job(arg):
    i, folder, wanted = arg
    folder = Path(folder)
    if i == 0:
        return i, _held(folder, wanted)
    (folder / f"start-{i:03d}").touch()
    (folder / f"done-{i:03d}").touch()
    return i, None


@pytest.mark.parametrize("bound", ["count", "bytes"])
def test_reorder_buffer_is_bounded_by_count_and_bytes(tmp_path, bound):
    """Task 0 blocks: the pool goes on with later tasks until the buffer is full (3 results by count,
    or 30 bytes at 10 per result), then stops submitting; order is kept."""
    kw = dict(max_buffered=3) if bound == "count" else dict(max_buffered=100, max_bytes=30)
    items = [(i, str(tmp_path), 3) for i in range(20)]
    out = list(ordered_map(_job, items, workers=2, size=lambda r: 10, **kw))
    assert [i for i, _ in out] == list(range(20))
    started_while_held = out[0][1]
    # 3 fill the buffer; at most 2 x workers - 1 more were in the pool when it filled
    assert 3 <= started_while_held <= 3 + 2 * 2 - 1


def test_no_head_of_line_stall_in_the_pool(tmp_path):
    """Task 0 waits until all 19 others are done: possible only if submission goes on past it."""
    items = [(i, str(tmp_path), 19) for i in range(20)]
    out = list(ordered_map(_job, items, workers=2))
    assert [i for i, _ in out] == list(range(20)) and out[0][1] == 19


def test_slow_video_does_not_stall_the_others_and_output_is_unchanged(tmp_path):
    """A real run, 2 workers: the first video in sample order is held (its ffprobe waits) until the
    last video's first call has started, which a window of 2 x workers in input order never allows."""
    data = make_corpus(tmp_path / "data", n=7)
    order = [v.source for v in sample_order(discover(data, False))]
    slow, last = order[0], order[-1]
    hold = (f'case "$*" in *{slow}*) i=0; until grep -q "{last}" "$LOG"; do sleep 0.05; i=$((i+1)); '
            f'if [ $i -ge {WAIT_S * 20} ]; then echo GAVE-UP >> "$LOG"; break; fi; done; '
            f'echo RELEASED >> "$LOG";; esac')
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path, before=hold)
    res = subprocess.run(prep_cmd("extract", str(data), str(tmp_path / "out"), "--workers", "2", "-q",
                                  "--ffmpeg", str(ffmpeg), "--ffprobe", str(ffprobe), "--num-frames", "4",
                                  "--size", "96x32", "--resize", "stretch"),
                         env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    log_lines = calls(log)
    assert "GAVE-UP" not in log_lines, "the other videos waited for the slow one"
    released = log_lines.index("RELEASED")
    assert any(last in c for c in log_lines[:released])
    # every other video had started before the slow one was let go
    assert all(any(s in c for c in log_lines[:released]) for s in order[1:])
    run_extract(cfg(data, tmp_path / "serial"))  # one worker, no pool: the same bytes
    assert state_files(tmp_path / "out") == state_files(tmp_path / "serial")
