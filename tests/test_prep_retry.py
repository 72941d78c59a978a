"""Earlier failures are retried only when something that decided them changed; one video's calls share
a wall-clock budget (--video-timeout). Real ffmpeg behind wrappers that log (and delay) calls."""
import json
import os
import subprocess

from prep_helpers import add_video, calls, cfg, env, logging_ffmpeg, make_corpus, prep_cmd

from vtt.pipeline.report import EXIT_FAILED_VIDEOS
from vtt.pipeline.run import run_extract
from vtt.shards.ledger import read_ledger


def _touched(log, n, name):
    """Whether any ffmpeg/ffprobe call after the first n logged ones names `name`."""
    return any(name in c for c in calls(log)[n:])


def test_unchanged_failure_is_not_retried_until_something_changes(tmp_path):
    data = make_corpus(tmp_path / "data", n=2)
    (data / "junk.mp4").write_bytes(os.urandom(4000))
    (data / "junk.json").write_text('{"video_id": "junk", "description": "random bytes"}')
    version = tmp_path / "ffmpeg-version"
    version.write_text("1")
    # the wrapper reports a version we control, so "ffmpeg changed" can be shown with the real binary
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path, before=(
        f'if [ "$TOOL" = ffmpeg ] && [ "$*" = "-hide_banner -version" ]; then '
        f'echo "ffmpeg version test-$(cat {version})"; exit 0; fi'))
    mk = lambda **kw: cfg(data, tmp_path / "out", ffmpeg=str(ffmpeg), ffprobe=str(ffprobe), **kw)  # noqa: E731
    r = run_extract(mk())
    assert r.videos_failed == 1 and r.failed[0]["class"] == "probe_failed"
    rec = read_ledger(tmp_path / "out").records["junk.mp4"]
    assert rec.status == "failed" and rec.video.size == 4000 and rec.sidecar is not None
    assert rec.ffmpeg_version == "ffmpeg version test-1" and rec.limits == {"timeout": 120.0, "video_timeout": 600.0}

    n = len(calls(log))
    r = run_extract(mk())  # nothing changed: not tried again, still reported (exit 3)
    assert r.plan["failed_unchanged"] == ["junk.mp4"] and not r.plan["failed"] and not _touched(log, n, "junk")
    assert r.exit_code == EXIT_FAILED_VIDEOS and r.videos_failed == 0 and r.videos_failed_unchanged == 1
    assert r.failed[0]["unchanged"] and "earlier failures unchanged" in r.summary()

    for change in ("--retry-failed", "ffmpeg", "sidecar", "video", "touch"):
        n = len(calls(log))
        if change == "ffmpeg":
            version.write_text("2")
        elif change == "sidecar":
            (data / "junk.json").write_text('{"video_id": "junk", "description": "still random"}')
        elif change == "video":
            (data / "junk.mp4").write_bytes(os.urandom(4000))
        elif change == "touch":  # same bytes, new mtime: a hash, no retry
            os.utime(data / "junk.mp4", ns=(1, 1))
        r = run_extract(mk(retry_failed=change == "--retry-failed"))
        retried = change != "touch"
        assert (r.plan["failed"] == ["junk.mp4"]) == retried, change
        assert _touched(log, n, "junk") == retried, change
    assert read_ledger(tmp_path / "out").records["junk.mp4"].video.mtime_ns == 1  # the new stat is kept


def test_video_timeout_budget_covers_all_calls_of_one_video(tmp_path):
    """Each call of slow.mp4 takes 0.7 s, well within --timeout, but probe + extraction together pass a
    1 s budget: the video fails as video_timeout, the others go in. Retried only with a larger budget."""
    data = make_corpus(tmp_path / "data", n=2)
    add_video(data, "slow.mp4")
    ffmpeg, ffprobe, log = logging_ffmpeg(tmp_path, before='case "$*" in *slow.mp4*) sleep 0.7;; esac')
    args = [str(data), str(tmp_path / "out"), "--ffmpeg", str(ffmpeg), "--ffprobe", str(ffprobe),
            "--num-frames", "2", "--size", "32", "--workers", "1", "-q"]
    res = subprocess.run(prep_cmd("extract", *args, "--video-timeout", "1"), env=env(), capture_output=True, text=True)
    assert res.returncode == EXIT_FAILED_VIDEOS, res.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    (fail,) = rep["failed"]
    assert fail["source"] == "slow.mp4" and fail["class"] == "video_timeout" and rep["videos_ok"] == 2
    assert "budget of 1s" in fail["reason"] and "--video-timeout" in fail["reason"]
    assert rep["error_classes"] == {"video_timeout": 1}

    n = len(calls(log))
    again = subprocess.run(prep_cmd("extract", *args, "--video-timeout", "1"), env=env(), capture_output=True)
    assert again.returncode == EXIT_FAILED_VIDEOS and not _touched(log, n, "slow.mp4")  # same budget: no retry

    bigger = subprocess.run(prep_cmd("extract", *args, "--video-timeout", "60"), env=env(), capture_output=True,
                            text=True)
    assert bigger.returncode == 0, bigger.stdout + bigger.stderr
    assert read_ledger(tmp_path / "out").records["slow.mp4"].status == "ok"


def test_budget_is_checked_before_each_call_and_shared():
    import pytest

    from vtt.pipeline.proc import BudgetExceeded, ProcTimeout, budget, run
    with budget(0.5):
        run(["sleep", "0.3"], timeout=10)
        with pytest.raises(BudgetExceeded, match="2 ffmpeg/ffprobe call"):
            run(["sleep", "5"], timeout=10)  # killed after the ~0.2 s left, not 10 s
        with pytest.raises(BudgetExceeded):
            run(["true"], timeout=10)  # nothing left: not even started
    with pytest.raises(ProcTimeout):  # outside a budget: the call's own timeout as before
        run(["sleep", "5"], timeout=0.2)
