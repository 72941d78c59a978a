"""extract_frames on generated clips: exact frames (frame counter), plans, rotation, sizes, formats, failures."""
import io
import shutil
import time
from dataclasses import replace

import pytest
from PIL import Image

from clips import expected_time, make_clip, read_counter
from vtt.pipeline.extract import choose_frames, extract_frames, ffmpeg_version, make_distinct, plan_groups
from vtt.pipeline.frames import ExtractError, FrameSpec
from vtt.pipeline import probe as probe_mod
from vtt.pipeline.probe import likely_nonref, probe_video

STRIPES = dict(size=(96, 32), resize="stretch")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract_clips")
    return {
        "gop1s": make_clip(d / "gop1s.mp4", seconds=8, fps=25, gop=25),
        "gop10s": make_clip(d / "gop10s.mp4", seconds=8, fps=25, gop=250),
        "vfr": make_clip(d / "vfr.mp4", seconds=6, fps=25, gop=20, vfr=True),
        "halves": make_clip(d / "halves.mp4", seconds=0.4, size=(64, 32), pattern="halves"),
        "tiny": make_clip(d / "tiny.mp4", seconds=0.12, fps=25),  # 3 frames
        "dir": d,
    }


def _centre_frames(n_frames: int, n: int) -> list[int]:
    """Frame on screen at the centre of each of n equal segments of a CFR clip with n_frames frames."""
    return [int((i + 0.5) * n_frames / n) for i in range(n)]


def _assert_within_one(got: list[int], centres: list[int]) -> int:
    """pick='fast': the frame on screen at each centre or the next one; returns how many were next."""
    assert all(g in (c, c + 1) for g, c in zip(got, centres)) and len(got) == len(centres), (got, centres)
    return sum(g == c + 1 for g, c in zip(got, centres))


@pytest.fixture(scope="module")
def bclips(clips):
    """x264 with 3 B-frames between references: the middle one a reference (pyramid) or none of them."""
    d = clips["dir"]
    return {name: make_clip(d / f"{name}.mp4", seconds=8, fps=25, gop=25,
                            extra=("-x264-params", f"bframes=3:b-adapt=0:b-pyramid={pyr}"))
            for name, pyr in (("pyramid", "normal"), ("flat", "none"))}


@pytest.mark.parametrize("n", [10, 32])  # seeking inputs / one pass
def test_fast_pick_skips_non_reference_frames(bclips, n):
    spec = FrameSpec(num_frames=n, **STRIPES)
    exact = extract_frames(bclips["pyramid"], replace(spec, pick="on_screen"))
    assert [read_counter(f) for f in exact.frames] == _centre_frames(200, n) and "noref" not in exact.method
    fast = extract_frames(bclips["pyramid"], spec)
    got = [read_counter(f) for f in fast.frames]
    # I b B b P b B b P .. (keyframe every 25): references sit at even offsets from the keyframe, so
    # a centre at an odd offset moves to the next frame, which is one.
    moved = _assert_within_one(got, _centre_frames(200, n))
    assert fast.method.endswith("-noref") and "+" not in fast.method
    assert fast.timestamps == pytest.approx([g / 25 for g in got], abs=1e-6)
    assert moved == sum(c % 25 % 2 == 1 for c in _centre_frames(200, n)) > 0


def test_likely_nonref_from_decode_order():
    assert likely_nonref([0, 4, 2, 1, 3, 8, 6, 5, 7]) == {1, 3, 5, 7}  # B-pyramid: 2 and 6 are references
    assert likely_nonref([0, 3, 1, 2, 5, 4]) == {2, 4}  # pyramid of two: the first is the reference
    assert likely_nonref([0, 4, 1, 2, 3, 8, 5, 6, 7]) == {1, 2, 3, 5, 6, 7}  # flat runs of three
    assert likely_nonref([0, 1, 2, 3]) == set()  # no reordering: P-frames only


def test_fast_pick_plans_around_unservable_targets(bclips):
    # P b b b P: a centre on the first or second b has no reference frame within one frame; the
    # packet order says so, and those targets' groups decode every frame from the start.
    res = extract_frames(bclips["flat"], FrameSpec(num_frames=32, **STRIPES))
    _assert_within_one([read_counter(f) for f in res.frames], _centre_frames(200, 32))
    assert "+" not in res.method


def test_fast_pick_falls_back_when_the_guess_is_wrong(bclips, monkeypatch):
    monkeypatch.setattr(probe_mod, "likely_nonref", lambda decode_order: set())  # no guess at all
    res = extract_frames(bclips["flat"], FrameSpec(num_frames=32, **STRIPES))
    got = [read_counter(f) for f in res.frames]
    _assert_within_one(got, _centre_frames(200, 32))
    assert "-noref+" in res.method  # the unserved targets were decoded again, every frame
    assert res.timestamps == pytest.approx([g / 25 for g in got], abs=1e-6)


def test_fast_pick_needs_targets_two_frames_apart(clips):
    info = probe_video(clips["gop1s"])
    assert all(g.noref for g in plan_groups([10, 12, 50], info, noref=True))
    assert not any(g.noref for g in plan_groups([10, 11, 50], info, noref=True))


@pytest.mark.parametrize("clip", ["gop1s", "gop10s"])
@pytest.mark.parametrize("n", [8, 32])
def test_uniform_frames_are_exact(clips, clip, n):
    res = extract_frames(clips[clip], FrameSpec(num_frames=n, **STRIPES))
    got = [read_counter(f) for f in res.frames]
    assert got == _centre_frames(200, n)
    assert res.timestamps == pytest.approx([g / 25 for g in got], abs=1e-6)
    assert res.probe["duration"] == pytest.approx(8.0) and "frame_times" not in res.probe


def test_plan_follows_keyframe_spacing(clips):
    sparse = probe_video(clips["gop1s"])
    groups = plan_groups(_centre_frames(200, 8), sparse)
    assert len(groups) == 8 and all(g.seek is not None for g in groups[1:])
    dense = probe_video(clips["gop10s"])
    groups = plan_groups(_centre_frames(200, 32), dense)
    assert len(groups) == 1 and groups[0].seek is None  # one keyframe: one pass from the start


@pytest.mark.parametrize("plan", ["single", "seek"])
def test_forced_plans_give_identical_frames(clips, plan):
    spec = FrameSpec(num_frames=8, **STRIPES)
    auto = extract_frames(clips["gop1s"], spec)
    forced = extract_frames(clips["gop1s"], spec, plan=plan)
    assert forced.method.startswith(plan) and forced.frames == auto.frames
    assert forced.timestamps == auto.timestamps


def test_fixed_rate_with_cap(clips):
    res = extract_frames(clips["gop1s"], FrameSpec(fps=2, max_frames=10, **STRIPES))
    assert [read_counter(f) for f in res.frames] == [int(k * 12.5) for k in range(10)]
    assert res.timestamps[:3] == pytest.approx([0.0, 0.48, 1.0])
    assert any("capped at max_frames=10" in w for w in res.warnings)
    full = extract_frames(clips["gop1s"], FrameSpec(fps=0.5, **STRIPES))
    assert [read_counter(f) for f in full.frames] == [0, 50, 100, 150]


def test_variable_frame_rate(clips):
    res = extract_frames(clips["vfr"], FrameSpec(num_frames=16, **STRIPES))
    got = [read_counter(f) for f in res.frames]
    assert res.timestamps == pytest.approx([expected_time(n, 25, vfr=True) for n in got], abs=1e-6)
    info = probe_video(clips["vfr"])
    for t, ts in zip([(i + 0.5) * info["duration"] / 16 for i in range(16)], res.timestamps):
        assert ts <= t < ts + 3 / 25 + 1e-6  # the frame on screen at the target time
    assert len(set(got)) == 16


def test_vfr_gap_longer_than_segment_gives_distinct_frames():
    assert make_distinct([0, 0, 1, 5, 5, 5], 7) == [0, 1, 2, 4, 5, 6]
    assert make_distinct([3, 3, 3], 4) == [1, 2, 3]


def _white_fraction(img: Image.Image, box) -> float:
    px = list(img.convert("L").crop(box).get_flattened_data())
    return sum(p > 128 for p in px) / len(px)


@pytest.mark.parametrize("tag", [90, 180, 270])
def test_rotated_clips_come_out_upright(clips, tag):
    src = make_clip(clips["dir"] / f"halves_rot{tag}.mp4", seconds=0.2, size=(64, 32), pattern="halves",
                    rotate=tag)
    info = probe_video(src)
    w, h = info["display_width"], info["display_height"]
    res = extract_frames(src, FrameSpec(num_frames=1, size=(w, h), resize="stretch", image_format="png"))
    img = Image.open(io.BytesIO(res.frames[0]))
    assert img.size == (w, h) == ((32, 64) if tag != 180 else (64, 32))
    # The coded picture is white on its left half; turning it R degrees clockwise puts white on the
    # top (90), right (180) or bottom (270).
    boxes = {90: (0, 0, w, h // 2), 180: (w // 2, 0, w, h), 270: (0, h // 2, w, h)}
    assert _white_fraction(img, boxes[info["rotation"]]) > 0.95
    assert _white_fraction(img, (0, 0, w, h)) == pytest.approx(0.5, abs=0.05)


def test_real_phone_rotation_matches_manual_rotation(real_videos):
    """Our output equals the un-rotated decode turned by probe's `rotation` (direction checked on a real file)."""
    import subprocess
    path = real_videos / "decord__video_90.mov"
    info = probe_video(path)
    assert info["rotation"] == 90 and (info["display_width"], info["display_height"]) == (320, 568)
    res = extract_frames(path, FrameSpec(num_frames=1, size=(320, 568), resize="stretch", image_format="png"))
    raw = subprocess.run(["ffmpeg", "-v", "error", "-noautorotate", "-i", str(path), "-frames:v", "1",
                          "-f", "image2pipe", "-c:v", "png", "-"], check=True, capture_output=True).stdout
    manual = Image.open(io.BytesIO(raw)).convert("RGB").rotate(-90, expand=True)  # PIL turns counter-clockwise
    ours = Image.open(io.BytesIO(res.frames[0])).convert("RGB")
    diff = sum(abs(a - b) for a, b in zip(manual.convert("L").get_flattened_data(), ours.convert("L").get_flattened_data()))
    wrong = manual.rotate(180).convert("L").get_flattened_data()
    diff_wrong = sum(abs(a - b) for a, b in zip(wrong, ours.convert("L").get_flattened_data()))
    assert diff < diff_wrong / 5


@pytest.mark.parametrize("size", [(336, 336), (17, 9), (1, 1), (2, 3), (401, 33)])
@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_output_sizes(clips, size, mode):
    res = extract_frames(clips["halves"], FrameSpec(num_frames=2, size=size, resize=mode))
    for data in res.frames:
        img = Image.open(io.BytesIO(data))
        assert img.size == size and img.format == "JPEG"


def test_non_square_pixels_are_resized_as_displayed(clips):
    # 32x32 stored with 2:1 pixels is a 64x32 picture on screen: padded into 64x64 it has bars.
    src = make_clip(clips["dir"] / "sar2.mp4", seconds=0.2, size=(32, 32), pattern="halves", extra=("-aspect", "2:1"))
    info = probe_video(src)
    assert (info["width"], info["display_width"], info["display_height"]) == (32, 64, 32)
    res = extract_frames(src, FrameSpec(num_frames=1, size=(64, 64), resize="pad", image_format="png"))
    pad = Image.open(io.BytesIO(res.frames[0]))
    assert _white_fraction(pad, (0, 0, 64, 15)) == 0 and _white_fraction(pad, (0, 17, 30, 47)) > 0.95
    assert _white_fraction(pad, (34, 17, 64, 47)) == 0


def test_resize_modes_content(clips):
    def png(mode):
        res = extract_frames(clips["halves"], FrameSpec(num_frames=1, size=(64, 64), resize=mode,
                                                        image_format="png"))
        return Image.open(io.BytesIO(res.frames[0]))
    pad = png("pad")  # 64x32 fitted into 64x64: black bars above and below, halves in the middle
    assert _white_fraction(pad, (0, 0, 64, 15)) == 0 and _white_fraction(pad, (0, 17, 30, 47)) > 0.95
    crop = png("crop")  # covered to 128x64, centre 64 columns: white left half, black right half
    assert _white_fraction(crop, (0, 0, 30, 64)) > 0.95 and _white_fraction(crop, (34, 0, 64, 64)) == 0
    stretch = png("stretch")
    assert _white_fraction(stretch, (0, 0, 30, 64)) > 0.95 and _white_fraction(stretch, (34, 0, 64, 64)) == 0


@pytest.mark.parametrize("pix_fmt,codec", [("yuv420p10le", "libx264"), ("yuv444p", "libx264"),
                                           ("yuv422p10le", "libx265")])
def test_high_bit_depth_and_444(clips, pix_fmt, codec):
    src = make_clip(clips["dir"] / f"{pix_fmt}_{codec}.mp4", seconds=0.6, codec=codec, pix_fmt=pix_fmt)
    assert probe_video(src)["pix_fmt"] == pix_fmt
    for fmt, mode in (("jpg", "RGB"), ("png", "RGB")):
        res = extract_frames(src, FrameSpec(num_frames=4, image_format=fmt, **STRIPES))
        imgs = [Image.open(io.BytesIO(f)) for f in res.frames]
        _assert_within_one([read_counter(i) for i in imgs], _centre_frames(15, 4))  # x265 has B-frames
        assert all(i.convert("RGB").mode == mode and i.size == (96, 32) for i in imgs)
        if fmt == "jpg":
            assert all(i.mode in ("RGB", "YCbCr") for i in imgs)  # baseline 8-bit JPEG, PIL-readable


def test_jpeg_quality_option(clips):
    lo = extract_frames(clips["gop1s"], FrameSpec(num_frames=2, jpeg_quality=20))
    hi = extract_frames(clips["gop1s"], FrameSpec(num_frames=2, jpeg_quality=98))
    assert sum(map(len, lo.frames)) < sum(map(len, hi.frames))
    assert FrameSpec(jpeg_quality=100).jpeg_qscale == 2 and FrameSpec(jpeg_quality=1).jpeg_qscale == 31


def test_short_clip_policy(clips):
    res = extract_frames(clips["tiny"], FrameSpec(num_frames=8, **STRIPES))
    assert len(res.frames) == 8 and [read_counter(f) for f in res.frames] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert res.timestamps == pytest.approx([0, 0, 0, 0.04, 0.04, 0.08, 0.08, 0.08])
    assert any("short clip" in w for w in res.warnings)
    with pytest.raises(ExtractError) as e:
        extract_frames(clips["tiny"], FrameSpec(num_frames=8, short_clip="fail"))
    assert e.value.error_class == "too_short"
    assert len(extract_frames(clips["tiny"], FrameSpec(num_frames=3, short_clip="fail")).frames) == 3


@pytest.mark.parametrize("name", ["-i.mp4", "a:b.mp4", "-y", "pipe:1.mp4", "con cat|x.mp4"])
def test_path_never_read_as_option_or_protocol(clips, tmp_path, name):
    dst = tmp_path / name
    shutil.copy(clips["tiny"], dst)
    res = extract_frames(dst, FrameSpec(num_frames=2, **STRIPES))
    assert [read_counter(f) for f in res.frames] == [0, 2]


def test_truncated_file_replans_on_what_decodes(clips, tmp_path):
    src = make_clip(tmp_path / "whole.mp4", seconds=4, fps=25, gop=25, extra=("-movflags", "+faststart"))
    cut = tmp_path / "cut.mp4"
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    res = extract_frames(cut, FrameSpec(num_frames=8, **STRIPES))
    end = probe_video(cut)["duration"]
    assert 0.5 < end < 3.5 and any("truncated" in w or "exceeds" in w for w in res.warnings)
    got = [read_counter(f) for f in res.frames]
    assert res.timestamps == pytest.approx([g / 25 for g in got]) and max(res.timestamps) < end


def test_many_scattered_frames_one_select(clips, tmp_path):
    """300 non-adjacent frames: more select terms than ffmpeg's expression parser nests (100)."""
    src = make_clip(tmp_path / "long.mp4", seconds=24, fps=25, size=(96, 16), gop=250)
    res = extract_frames(src, FrameSpec(fps=12.5, max_frames=10000, size=(96, 16), resize="stretch"))
    assert [read_counter(f) for f in res.frames] == list(range(0, 600, 2))


def test_frame_that_does_not_decode_is_replaced(real_videos):
    """The truncated clip's last packet is cut short: asking for every frame re-plans that one."""
    res = extract_frames(real_videos / "DERIVED_truncated_smpte-2997_half.mp4",
                         FrameSpec(num_frames=121, size=(16, 16)))
    assert len(res.frames) == 121 and res.timestamps[-1] == res.timestamps[-2] == pytest.approx(4.76)
    assert any("4.800s did not decode; used 4.760s" in w for w in res.warnings)


def test_damaged_tail_replans_over_frames_that_decode(tmp_path):
    """Packets present but garbage (zeroed second half): targets re-planned over what really decodes."""
    src = make_clip(tmp_path / "whole.mp4", seconds=4, fps=25, gop=25, extra=("-movflags", "+faststart"))
    data = bytearray(src.read_bytes())
    cut = int(len(data) * 0.6)
    data[cut:] = bytes(len(data) - cut)
    bad = tmp_path / "zeroed.mp4"
    bad.write_bytes(bytes(data))
    assert probe_video(bad)["nb_frames"] == 100  # the container still lists every frame
    res = extract_frames(bad, FrameSpec(num_frames=8, **STRIPES))
    got = [read_counter(f) for f in res.frames]
    assert res.timestamps == pytest.approx([g / 25 for g in got]) and len(set(got)) == 8
    assert any("targets re-planned" in w for w in res.warnings)
    end = res.probe["duration"]
    assert 0.5 < end < 3.0 and got == [int((i + 0.5) * end * 25 / 8) for i in range(8)]
    zeros = tmp_path / "zeros.mp4"  # index intact, every frame's data zeroed: nothing decodes
    mdat = bytes(data).index(b"mdat") + 4
    data[mdat:] = bytes(len(data) - mdat)
    zeros.write_bytes(bytes(data))
    with pytest.raises(ExtractError) as e:
        extract_frames(zeros, FrameSpec(num_frames=2))
    assert e.value.error_class == "decode_failed"


def test_failure_classes(clips, tmp_path):
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8)
    with pytest.raises(ExtractError) as e:
        extract_frames(junk)
    assert e.value.error_class in ("probe_failed", "no_video_stream") and e.value.stderr_tail is not None
    with pytest.raises(ExtractError) as e:
        extract_frames(clips["tiny"], FrameSpec(ffmpeg=str(tmp_path / "nope")))
    assert e.value.error_class == "ffmpeg_missing"
    assert e.value.to_dict()["error_class"] == "ffmpeg_missing"


def test_extraction_timeout_kills_ffmpeg(clips, tmp_path):
    hang = tmp_path / "slow-ffmpeg"
    hang.write_text("#!/bin/sh\necho started >&2\nsleep 30\n")
    hang.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(ExtractError) as e:
        extract_frames(clips["tiny"], FrameSpec(ffmpeg=str(hang), timeout_s=1))
    assert e.value.error_class == "timeout" and "started" in e.value.stderr_tail
    assert time.monotonic() - t0 < 8


def test_ffmpeg_version_and_settings():
    assert ffmpeg_version().startswith("ffmpeg version")
    s = FrameSpec(num_frames=4).settings()
    assert s["num_frames"] == 4 and "ffmpeg" not in s and "max_frames" not in s
    with pytest.raises(ValueError):
        FrameSpec(resize="zoom")
    with pytest.raises(ValueError):
        FrameSpec(size=(0, 3))


def test_choose_frames_fixed_rate_repeats_when_faster_than_video(clips):
    info = probe_video(clips["tiny"])
    idx, _ = choose_frames(info, FrameSpec(fps=50))
    assert idx == [0, 0, 1, 1, 2, 2]


def test_recorded_tool_output_is_normalised():
    """What vtt keeps of ffmpeg's stderr is the same text in every process: no context addresses, no
    temp folder names, a downloaded temp copy named by its URL."""
    from vtt.pipeline.proc import normalise, shown_as, tail, telling_line
    raw = ("[h264 @ 0x55ebfbe7f300] error while decoding MB 3 4\n[vist#0:0/h264 @ 0x7f01] concealing\n"
           "[NULL @ (nil)] missing picture\nOutput #0, image2, to '/var/tmp/x/vtt-frames-ab_c12z9/g000_%05d.jpg':\n"
           "frame=    8 fps=0.0 q=-0.0 Lsize=N/A time=00:00:05.00 bitrate=N/A speed=16.8x\n")
    assert normalise(raw) == (
        "[h264] error while decoding MB 3 4\n[vist#0:0/h264] concealing\n[NULL] missing picture\n"
        "Output #0, image2, to '<tmp>/vtt-frames/g000_%05d.jpg':\n"
        "frame=    8 fps=0.0 q=-0.0 Lsize=N/A time=00:00:05.00 bitrate=N/A speed=?\n")
    with shown_as("/tmp/vtt-prep-k2j3h4g5/v.mp4", "s3://bucket/videos/v.mp4"):
        assert tail(b"file:/tmp/vtt-prep-k2j3h4g5/v.mp4: Invalid data\n") == "file:s3://bucket/videos/v.mp4: Invalid data\n"
    assert tail(b"file:/tmp/vtt-prep-k2j3h4g5/v.mp4: x") == "file:<tmp>/vtt-prep/v.mp4: x"
    # a long stderr is cut at a line start before normalising: no half address survives the cut
    long = b"".join(b"[h264 @ 0x%012x] concealing errors in P frame\n" % (0x55ebfbe7f300 + i) for i in range(500))
    assert "0x" not in tail(long) and tail(long).startswith("[h264] ")
    assert telling_line("[mov,mp4,m4a] moov atom not found\nfile:/a b/x.mp4: Invalid data found when processing "
                        "input\n") == "moov atom not found"
    assert telling_line("started\n") == ""


def test_a_failure_reason_carries_the_tools_telling_line(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    with pytest.raises(ExtractError) as e:
        extract_frames(text)
    assert e.value.reason == f"{text}: ffprobe exited 1: moov atom not found", e.value.reason
