"""probe_video and the process runner: durations, rotation, keyframes, failure classes, timeouts."""
import shutil
import subprocess
import time

import pytest

from clips import make_clip
from vtt.pipeline.frames import ExtractError, FrameSpec
from vtt.pipeline.probe import ffprobe_args, probe_video, public_probe, rotation_of
from vtt.pipeline.proc import ProcMissing, ProcTimeout, run


@pytest.fixture(scope="module")
def clipdir(tmp_path_factory):
    return tmp_path_factory.mktemp("probe_clips")


def test_probe_basic_facts_and_keyframes(clipdir):
    p = make_clip(clipdir / "a.mp4", seconds=2, fps=25, size=(96, 32), gop=10, audio=True)
    info = probe_video(p)
    assert info["duration"] == pytest.approx(2.0, abs=1e-3)
    assert info["fps"] == 25 and info["width"] == 96 and info["height"] == 32
    assert info["nb_frames"] == 50 and info["codec"] == "h264" and info["has_audio"]
    assert info["keyframes"] == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6])
    assert info["frame_times"] == pytest.approx([i / 25 for i in range(50)])
    pub = public_probe(info)
    assert "frame_times" not in pub and pub["num_keyframes"] == 5
    assert pub["max_keyframe_interval"] == pytest.approx(0.4)


def test_video_stream_shorter_than_container(clipdir):
    # 1 s of video, 3 s of audio: the container says 3 s, the frames end at 1 s.
    src = make_clip(clipdir / "v1.mp4", seconds=1, fps=25, size=(32, 32))
    out = clipdir / "mixed.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), "-f", "lavfi", "-i", "sine=d=3",
                    "-c:v", "copy", "-c:a", "aac", str(out)], check=True)
    info = probe_video(out)
    assert info["container_duration"] == pytest.approx(3.0, abs=0.1)
    assert info["duration"] == pytest.approx(1.0, abs=1e-3)
    assert any("container duration" in w for w in info["warnings"])


@pytest.mark.parametrize("rotate,expect,display", [(90, (90, 270), (32, 96)), (180, (180,), (96, 32)),
                                                    (270, (90, 270), (32, 96))])
def test_rotation_from_display_matrix(clipdir, rotate, expect, display):
    # The tag's sign convention changed across ffmpeg versions; test_extract checks the direction.
    p = make_clip(clipdir / f"rot{rotate}.mp4", seconds=0.2, size=(96, 32), rotate=rotate)
    info = probe_video(p)
    assert info["rotation"] in expect
    assert (info["display_width"], info["display_height"]) == display


def test_rotation_sources():
    assert rotation_of({"side_data_list": [{"rotation": -90}]}) == 90
    assert rotation_of({"side_data_list": [{"rotation": 90}], "tags": {"rotate": "0"}}) == 270
    assert rotation_of({"tags": {"rotate": "180"}}) == 180
    assert rotation_of({}) == 0


def test_real_clips_durations(real_videos):
    webm = probe_video(real_videos / "moviepy__no_duration.webm")
    assert webm["container_duration"] is None and webm["duration"] == pytest.approx(4.938, abs=0.01)
    avi = probe_video(real_videos / "mmaction2__test.avi")  # pts missing: dts used
    assert avi["nb_frames"] == 164 and avi["duration"] == pytest.approx(6.56, abs=1e-3)
    trunc = probe_video(real_videos / "DERIVED_truncated_smpte-2997_half.mp4")
    assert trunc["container_duration"] == pytest.approx(10.048) and trunc["duration"] < 5
    assert any("truncated" in w for w in trunc["warnings"])
    fire = probe_video(real_videos / "moviepy__fire2.mp4")
    assert fire["rotation"] == 180 and fire["has_audio"]


def test_option_like_and_protocol_like_names(clipdir):
    src = make_clip(clipdir / "plain.mp4", seconds=0.2, size=(32, 32))
    for name in ("-i.mp4", "a:b.mp4", "http:x.mp4", "-y"):
        dst = clipdir / name
        shutil.copy(src, dst)
        assert probe_video(dst)["nb_frames"] == 5
    assert ffprobe_args(clipdir / "-i.mp4", FrameSpec())[-1].startswith("file:/")


def test_failure_classes(clipdir, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(ExtractError) as e:
        probe_video(text)
    assert e.value.error_class == "probe_failed" and "Invalid data" in e.value.stderr_tail
    audio = tmp_path / "audio.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=d=0.2", str(audio)], check=True)
    with pytest.raises(ExtractError) as e:
        probe_video(audio)
    assert e.value.error_class == "no_video_stream"
    with pytest.raises(ExtractError) as e:
        probe_video(tmp_path / "missing.mp4")
    assert e.value.error_class == "probe_failed"
    with pytest.raises(ExtractError) as e:
        probe_video(text, FrameSpec(ffprobe=str(tmp_path / "no-such-ffprobe")))
    assert e.value.error_class == "ffmpeg_missing"


def test_probe_timeout_is_a_class(clipdir, tmp_path):
    hang = tmp_path / "hanging-ffprobe"
    hang.write_text("#!/bin/sh\nsleep 30\n")
    hang.chmod(0o755)
    p = make_clip(clipdir / "t.mp4", seconds=0.2, size=(32, 32))
    t0 = time.monotonic()
    with pytest.raises(ExtractError) as e:
        probe_video(p, FrameSpec(ffprobe=str(hang), timeout_s=0.5))
    assert e.value.error_class == "timeout" and time.monotonic() - t0 < 5


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(ProcTimeout):
        run(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; echo dying >&2; wait"], timeout=0.5)
    assert time.monotonic() - t0 < 5
    pid = int(pidfile.read_text())
    for _ in range(50):  # killed: gone, or a zombie until whoever adopted it reaps it
        if not _alive(pid):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {pid} survived the timeout")


def test_run_reports_status_and_missing_binary():
    res = run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert res.returncode == 3 and res.stdout == b"out\n" and res.stderr_tail == "err\n"
    with pytest.raises(ProcMissing):
        run(["/nonexistent/ffmpeg"], timeout=1)
