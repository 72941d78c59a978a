"""vtt-prep extraction benchmark: exact planned extraction vs full decode, single pass and seek-per-frame.

    .venv/bin/python benchmarks/bench_prep.py [--corpus DIR] [--seconds 60] [--repeat 1] [--quick]

Generates (once, cached in --corpus) 60 s clips at 720p and 1080p, 25 fps, x264 veryfast crf 23 on
testsrc2 + temporal noise (so the bitrate is camera-like), with strict keyframe intervals of 10 s and
1 s, plus a 720p clip with a 10 s maximum interval and x264's scene-cut keyframes on content that
changes scene every few seconds (what film-like material looks like). Every method runs one thread
per ffmpeg; figures are CPU seconds of the ffmpeg children (user+sys), so "per core" rates are
frames / CPU second. Wall times are printed too but are noisy on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from vtt.pipeline.extract import Group, choose_frames, extract_frames, run_groups, scale_filters
from vtt.pipeline.frames import FrameSpec
from vtt.pipeline.probe import probe_video, safe_input

FPS = 25
CORPUS = {  # name: (width, height, x264 keyframe args, content)
    "720p_gop10s": (1280, 720, ["-g", "250", "-keyint_min", "250", "-sc_threshold", "0"], "plain"),
    "720p_gop1s": (1280, 720, ["-g", "25", "-keyint_min", "25", "-sc_threshold", "0"], "plain"),
    "1080p_gop10s": (1920, 1080, ["-g", "250", "-keyint_min", "250", "-sc_threshold", "0"], "plain"),
    "1080p_gop1s": (1920, 1080, ["-g", "25", "-keyint_min", "25", "-sc_threshold", "0"], "plain"),
    "720p_max10s_scenecut": (1280, 720, ["-g", "250"], "scenes"),
}


def _content(w: int, h: int, seconds: float, kind: str) -> str:
    base = f"testsrc2=s={w}x{h}:r={FPS}:d={seconds},noise=alls=5:allf=t"
    if kind == "plain":
        return base
    # Picture negated / hue-rotated on and off at 3.1 s and 4.7 s periods: a hard scene change every
    # ~2 s on average, where x264 places scene-cut keyframes as it would at a film's cuts.
    return (base + ",negate=enable='mod(floor(t/3.1),2)'"
            ",hue=h=120:enable='mod(floor(t/4.7),2)'")


def make_corpus(folder: Path, seconds: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (w, h, gop, kind) in CORPUS.items():
        path = folder / f"{name}_{int(seconds)}s.mp4"
        if not path.exists():
            tmp = path.with_suffix(".tmp.mp4")
            t0 = time.time()
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", _content(w, h, seconds, kind),
                            "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                            *gop, str(tmp)], check=True)
            tmp.rename(path)
            print(f"generated {path.name} in {time.time() - t0:.0f}s", file=sys.stderr)
        out.append(path)
    return out


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(fn, repeat: int) -> tuple[float, float]:
    """(best CPU seconds of children, wall seconds of that run) over `repeat` runs."""
    best = None
    for _ in range(repeat):
        c0, w0 = _cpu(), time.perf_counter()
        fn()
        c, w = _cpu() - c0, time.perf_counter() - w0
        best = (c, w) if best is None or c < best[0] else best
    return best


def full_decode(path: Path) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-threads", "1", "-i", safe_input(path),
                    "-map", "0:v:0", "-f", "null", "-"], check=True)


def _seek_point(i: int, times: list[float]) -> float:
    # Accurate input seeking returns the first frame with pts >= T: aim just below the frame, never
    # at or past the one before.
    gap = times[i] - times[i - 1] if i > 0 else 0.002
    return max(0.0, times[i] - min(gap / 2, 0.001))


def _baseline(path: Path, spec: FrameSpec, separate: bool) -> None:
    """single pass (one input, select + scale) or one ffmpeg process per frame (accurate -ss)."""
    info = probe_video(path, spec)  # not timed as part of ffmpeg: rusage counts it, so subtract below
    idx, _ = choose_frames(info, spec)
    if separate:
        with tempfile.TemporaryDirectory() as out:
            for i in sorted(set(idx)):
                # What FIELD-NOTES measured: `-ss T -i X -frames:v 1`, T just below the frame's pts.
                subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-threads", "1",
                                "-ss", f"{_seek_point(i, info['frame_times']):.6f}", "-i", safe_input(path),
                                "-map", f"0:{info['stream_index']}", "-frames:v", "1",
                                "-vf", scale_filters(info, spec), "-q:v", str(spec.jpeg_qscale),
                                "-threads", "1", "-y", os.path.join(out, f"{i}.jpg")], check=True)
    else:
        got, tail, _ = run_groups(path, info, [Group(sorted(set(idx)), None)], spec)
        assert len(got) == len(set(idx)), tail


def bench_methods(clips: list[Path], ns: list[int], repeat: int) -> list[dict]:
    """Every method on every clip; repetitions interleave the methods so load swings hit them alike."""
    rows = []
    for path in clips:
        for n in ns:
            spec = FrameSpec(num_frames=n)
            methods = {
                "full_decode": lambda: full_decode(path),
                "probe": lambda: probe_video(path, spec),
                "vtt": lambda: extract_frames(path, spec),
                "exact": lambda: extract_frames(path, replace(spec, pick="on_screen")),
                "single_raw": lambda: _baseline(path, spec, False),
                "seek_proc_raw": lambda: _baseline(path, spec, True),
                "seek_inputs": lambda: extract_frames(path, spec, plan="seek"),
            }
            best: dict[str, tuple[float, float]] = {}
            for _ in range(repeat):
                for name, fn in methods.items():
                    m = measure(fn, 1)
                    best[name] = min(best.get(name, m), m)
            row = {"clip": path.stem, "N": n, "plan": extract_frames(path, spec).method,
                   **{k: v[0] for k, v in best.items()}, "vtt_wall": best["vtt"][1]}
            # The baselines probe only to know the frame times; ffprobe is not part of their cost.
            row["single"] = row.pop("single_raw") - row["probe"]
            row["seek_proc"] = row.pop("seek_proc_raw") - row["probe"]
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows


HEADER = (f"{'clip':<26}{'N':>3} {'plan':>14} {'vtt':>6} {'exact':>6} {'single':>7} {'seek/p':>7} {'seekin':>7} "
          f"{'fulldec':>7} {'probe':>6} | {'x single':>8} {'(exact)':>7} {'x best':>7} {'fr/s/core':>9} "
          f"{'vid/s/core':>10}")


def _fmt_row(r: dict) -> str:
    best = min(r["single"], r["seek_proc"])
    return (f"{r['clip']:<26}{r['N']:>3} {r['plan'][:14]:>14} {r['vtt']:6.2f} {r['exact']:6.2f} {r['single']:7.2f} "
            f"{r['seek_proc']:7.2f} {r['seek_inputs']:7.2f} {r['full_decode']:7.2f} {r['probe']:6.2f} | "
            f"{r['single'] / r['vtt']:8.1f} {r['single'] / r['exact']:7.1f} {best / r['vtt']:7.2f} "
            f"{r['N'] / r['vtt']:9.1f} {1 / r['vtt']:10.2f}")


def bench_runs(clips: list[Path], work: Path, workers: int) -> dict:
    """Full run, no-op rerun and 1-changed-of-N rerun through vtt.pipeline.run.run_extract."""
    import json

    from vtt.pipeline.config import PrepConfig
    from vtt.pipeline.run import run_extract
    data, shards = work / "data", work / "shards"
    shutil.rmtree(work, ignore_errors=True)
    data.mkdir(parents=True)
    for i, clip in enumerate(clips):
        os.link(clip, data / clip.name)  # hard link: no copy of the corpus
        (data / f"{clip.stem}.json").write_text(json.dumps({"video_id": clip.stem, "description": f"clip {i}"}))
    cfg = PrepConfig(data_dir=data, out_dir=shards, num_frames=8, workers=workers, quiet=True)
    out = {}
    steps = (("full", None), ("noop", None), ("video_changed", _remux_one(data, clips[0])),
             ("sidecar_changed", _touch_one(data, clips[-1])))
    for label, prepare in steps:
        if prepare:
            prepare()
        c0, w0 = _cpu(), time.perf_counter()
        rep = run_extract(cfg)
        out[label] = {"wall": time.perf_counter() - w0, "child_cpu": _cpu() - c0,
                      "videos_ok": rep.videos_ok, "unchanged": rep.videos_unchanged, "failed": len(rep.failed),
                      "frames": rep.frames}
        print(f"run_extract {label:<16} wall {out[label]['wall']:7.2f}s  ffmpeg/ffprobe CPU "
              f"{out[label]['child_cpu']:6.2f}s  written {rep.videos_ok}  unchanged {rep.videos_unchanged}  "
              f"failed {len(rep.failed)}", flush=True)
    return out


def _remux_one(data: Path, clip: Path):
    """New bytes, same frames: a remux with another title (renamed over the link, corpus untouched)."""
    def change():
        tmp = data / f".{clip.name}"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", safe_input(clip), "-map", "0", "-c", "copy",
                        "-metadata", "title=changed", "-f", "mp4", str(tmp)], check=True)
        tmp.replace(data / clip.name)
    return change


def _touch_one(data: Path, clip: Path):
    def change():
        import json
        side = data / f"{clip.stem}.json"
        meta = json.loads(side.read_text())
        meta["description"] += " (edited)"
        side.write_text(json.dumps(meta))
    return change


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path(os.environ.get(
        "VTT_BENCH_CORPUS", Path.home() / ".cache" / "vtt" / "bench-corpus")))
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the lowest CPU time counts")
    ap.add_argument("--ns", default="8,32")
    ap.add_argument("--only", default="", help="comma-separated clip name prefixes")
    ap.add_argument("--no-runs", action="store_true", help="skip the run_extract full/no-op/changed runs")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    clips = make_corpus(args.corpus, args.seconds)
    if args.only:
        clips = [c for c in clips if any(c.name.startswith(p) for p in args.only.split(","))]
    print(f"{os.cpu_count()} cores; {subprocess.run(['ffmpeg', '-version'], capture_output=True, text=True).stdout.splitlines()[0]}")
    print("CPU seconds per video (ffmpeg/ffprobe children, one thread each). vtt: default pick='fast'; "
          "exact: pick='on_screen'; 'x best' = min(single, seek/p) / vtt")
    print(HEADER)
    bench_methods(clips, [int(n) for n in args.ns.split(",")], args.repeat)
    if not args.no_runs:
        with tempfile.TemporaryDirectory(prefix="vtt-bench-", dir=args.corpus) as work:
            bench_runs(clips, Path(work), args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
