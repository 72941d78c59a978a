"""The `vtt-prep` command line: help texts, exit codes, status, verify (incl. damaged shards), sample-data."""
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from prep_helpers import env, make_corpus, prep_cmd

from vtt.pipeline.cli import main

FLAGS = ["--num-frames", "3", "--size", "96x32", "--resize", "stretch", "--workers", "1", "-q"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A data folder and its shards, made through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = make_corpus(root / "data", n=3)
    res = CliRunner().invoke(main, ["extract", str(data), str(root / "shards"), *FLAGS,
                                    "--shard-max-samples", "2"])
    assert res.exit_code == 0, res.output
    assert "3 written" in res.output
    return data, root / "shards"


def test_help_texts_document_flags_and_exit_codes():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for cmd in ("extract", "status", "verify", "sample-data"):
        assert cmd in top.output
    ext = runner.invoke(main, ["extract", "--help"]).output
    for flag in ("--num-frames", "--fps", "--max-frames", "--size", "--resize", "--image-format",
                 "--jpeg-quality", "--shard-size", "--shard-max-samples", "--workers", "--timeout", "--ffmpeg",
                 "--ffprobe", "--allow-missing-sidecar", "--rebuild", "--dry-run", "--quiet", "VTT_FFMPEG"):
        assert flag in ext, flag
    assert "Exit status" in ext and "3  some videos failed" in ext and "4  another vtt-prep run" in ext
    assert "Exit 0 when everything matches, 1 on any problem" in runner.invoke(main, ["verify", "--help"]).output


def test_console_script_runs(made):
    _, shards = made
    res = subprocess.run(["vtt-prep", "status", str(shards)], env=env(), capture_output=True, text=True,
                         timeout=60) if shutil.which("vtt-prep") else \
        subprocess.run(prep_cmd("status", str(shards)), env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "3 samples" in res.stdout and "3 ok, 0 failed" in res.stdout


def test_usage_errors_exit_2(made, tmp_path):
    data, shards = made
    runner = CliRunner()
    assert runner.invoke(main, ["extract", str(data), str(tmp_path / "o"), "--size", "big"]).exit_code == 2
    assert runner.invoke(main, ["extract", str(tmp_path / "none"), str(tmp_path / "o")]).exit_code == 2
    assert runner.invoke(main, ["extract", str(data), str(tmp_path / "o"), "--resize", "zoom"]).exit_code == 2
    res = runner.invoke(main, ["extract", str(data), str(shards), *FLAGS[2:], "--num-frames", "5"])
    assert res.exit_code == 2 and "--rebuild" in res.output


def test_dry_run_and_failed_videos_exit_3(made, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(made[0], data)
    (data / "broken.mp4").write_bytes(b"\0" * 100)
    (data / "broken.json").write_text('{"video_id": "broken", "description": "zeros"}')
    out = tmp_path / "out"
    runner = CliRunner()
    plan = runner.invoke(main, ["extract", str(data), str(out), *FLAGS, "--dry-run"])
    assert plan.exit_code == 0 and "new: 4" in plan.output and not out.exists()
    res = runner.invoke(main, ["extract", str(data), str(out), *FLAGS[:-1]])  # not quiet: progress bar
    assert res.exit_code == 3
    assert re.search(r"vtt-prep: 100%.* 4/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(video/s|s/video)", res.stderr)
    assert "FAILED broken.mp4: [probe_failed]" in res.output and "3 written" in res.output
    status = runner.invoke(main, ["status", str(out)])
    assert status.exit_code == 0 and "1 failed" in status.output and "broken.mp4" in status.output


def test_verify_passes_then_catches_damage(made, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(made[1], shards)
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(shards)])
    assert ok.exit_code == 0 and "OK: 2 shards, 3 samples, 9 frames decoded" in ok.output

    # flip bytes inside one JPEG: the size stays, the checksum and the decode catch it
    tar = shards / "shard-000000.tar"
    with tarfile.open(tar) as t:
        m = next(i for i in t if i.name.endswith(".0001.jpg"))
    raw = bytearray(tar.read_bytes())
    start = m.offset_data + 2
    raw[start:start + m.size - 4] = b"\x00" * (m.size - 4)
    tar.write_bytes(bytes(raw))
    bad = runner.invoke(main, ["verify", str(shards)])
    assert bad.exit_code == 1
    assert "sha256 differs" in bad.output and "0001.jpg does not decode" in bad.output

    # a truncated shard and a stray temp file
    other = shards / "shard-000001.tar"
    other.write_bytes(other.read_bytes()[:1500])
    (shards / ".tmp-left-over").write_bytes(b"")
    bad = runner.invoke(main, ["verify", str(shards)]).output
    assert "shard-000001.tar" in bad and "bytes on disk" in bad and "stray temp file" in bad
    status = runner.invoke(main, ["status", str(shards)])
    assert status.exit_code == 1 and "PROBLEM" in status.output


def test_a_rerun_takes_the_settings_the_folder_was_made_with(made, tmp_path):
    """Only the flags a user gives may contradict the shards folder's settings; the others are the
    folder's, so `extract DATA OUT` after a first run with --num-frames/--size needs no flag again."""
    data, _ = made
    out = tmp_path / "shards"
    runner = CliRunner()
    first = ["extract", str(data), str(out), "--num-frames", "3", "--size", "96x32", "--resize", "stretch", "-q"]
    assert runner.invoke(main, first).exit_code == 0
    again = runner.invoke(main, ["extract", str(data), str(out), "-q"])
    assert again.exit_code == 0 and "0 written, 3 unchanged" in again.output, again.output
    same = runner.invoke(main, ["extract", str(data), str(out), "--size", "96x32", "-q"])  # agrees: fine
    assert same.exit_code == 0 and "3 unchanged" in same.output
    line = one_line(runner.invoke(main, ["extract", str(data), str(out), "--num-frames", "5", "-q"]), 2,
                    "--num-frames 3", "--num-frames 5", "--rebuild")
    assert "--size" not in line and "{" not in line  # names the setting that differs, no dict dump
    one_line(runner.invoke(main, ["extract", str(data), str(out), "--fps", "2", "-q"]), 2,
             "--num-frames 3", "--fps 2", "--rebuild")
    dry = runner.invoke(main, ["extract", str(data), str(out), "--dry-run"])
    assert dry.exit_code == 0 and "unchanged: 3" in dry.output
    # --rebuild with one new setting keeps the folder's others
    assert runner.invoke(main, ["extract", str(data), str(out), "--num-frames", "2", "--rebuild", "-q"]).exit_code == 0
    settings = json.loads((out / "index.json").read_text())["vtt"]["settings"]
    assert (settings["num_frames"], settings["size"], settings["resize"]) == (2, [96, 32], "stretch")


def test_what_went_wrong_is_shown(made, tmp_path):
    """A failure prints the tool's telling line (not only "ffprobe exited 1"); sidecar-vs-probe
    disagreements are counted in report.json and the summary; --dry-run lists each video once."""
    data = tmp_path / "data"
    shutil.copytree(made[0], data)
    (data / "notes.mp4").write_text("a text file named .mp4\n")
    (data / "notes.json").write_text('{"video_id": "notes", "description": "text"}')
    (data / "v00.json").write_text('{"video_id": "v00", "description": "long?", "duration": 10}')  # clip: 1 s
    (data / "noid.mp4").write_bytes((data / "v01.mp4").read_bytes())
    (data / "noid.json").write_text('{"description": "no video_id"}')
    out = tmp_path / "out"
    runner = CliRunner()
    dry = runner.invoke(main, ["extract", str(data), str(out), *FLAGS, "--dry-run"])
    counts = dict(re.findall(r"^ *(\w+): (\d+)$", dry.output, re.M))
    assert dry.exit_code == 0 and (counts["new"], counts["invalid"], counts["failed"]) == ("4", "1", "0"), dry.output
    assert sum(map(int, counts.values())) == 5  # 5 videos, each counted once
    assert dry.output.count("noid.mp4") == 1 and dry.output.count("notes.mp4") == 1
    res = runner.invoke(main, ["extract", str(data), str(out), *FLAGS])
    assert res.exit_code == 3
    assert "FAILED notes.mp4: [probe_failed]" in res.output and "ffprobe exited 1: moov atom not found" in res.output
    assert "1 x sidecar duration N s, probe says N s" in res.output
    assert "warning: v00.mp4: sidecar duration 10 s, probe says 1.0 s" in res.output, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == ["v00.mp4: sidecar duration 10 s, probe says 1.0 s"]
    assert report["warning_counts"] == {"sidecar duration N s, probe says N s": 1}
    reasons = {f["source"]: f["reason"] for f in report["failed"]}
    assert reasons["notes.mp4"].endswith("ffprobe exited 1: moov atom not found")


def one_line(res, code: int, *words: str) -> str:
    """The command failed with `code` and one line on stderr, naming `words` (a path, the problem)."""
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code and len(lines) == 1, (res.exit_code, res.output)
    assert lines[0].startswith("vtt-prep: error: ") and all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in res.output
    return lines[0]


def test_verify_and_status_on_a_folder_that_is_not_a_shards_folder_exit_2(tmp_path):
    """Help and code agree: 2 when the folder cannot be verified at all (1 is for problems found in it)."""
    runner = CliRunner()
    one_line(runner.invoke(main, ["verify", str(tmp_path / "nope")]), 2, str(tmp_path / "nope"), "does not exist")
    one_line(runner.invoke(main, ["verify", str(tmp_path)]), 2, str(tmp_path), "no index")
    one_line(runner.invoke(main, ["status", str(tmp_path)]), 2, str(tmp_path), "no index")
    for cmd in ("verify", "status"):
        assert "2 when the folder cannot be reached" in " ".join(runner.invoke(main, [cmd, "--help"]).output.split())


def _unwritable() -> list[str]:
    """Folders no one can create, root included: pseudo filesystems (sysfs, procfs) refuse mkdir."""
    return [p for p in ("/proc/vtt-x", "/sys/vtt-x", "/sys/kernel/vtt-x/shards") if Path(p).parent.parent.is_dir()]


@pytest.mark.parametrize("out", _unwritable())
def test_an_out_folder_that_cannot_be_made_is_one_line_exit_2(made, out):
    data, _ = made
    res = CliRunner().invoke(main, ["extract", str(data), out, *FLAGS])
    one_line(res, 2, f"shards folder {out}: cannot create it (")
    assert not Path(out).exists()


def test_an_out_folder_below_a_file_is_one_line_exit_2(made, tmp_path):
    data, _ = made
    (tmp_path / "file").write_text("a file")
    out = tmp_path / "file" / "shards"
    one_line(CliRunner().invoke(main, ["extract", str(data), str(out), *FLAGS]), 2,
             str(out), f"{tmp_path / 'file'} is a file, not a folder")
    res = CliRunner().invoke(main, ["extract", str(data), str(tmp_path / "file"), *FLAGS])  # OUT itself a file
    one_line(res, 2, f"{tmp_path / 'file'}: OUT_DIR is a file, not a folder")
    one_line(CliRunner().invoke(main, ["status", str(tmp_path / "file")]), 2, f"{tmp_path / 'file'}: SHARDS is a file")
    assert (tmp_path / "file").read_text() == "a file"


def test_an_out_folder_made_halfway_leaves_nothing_behind(made, tmp_path):
    """The parents are made, the last name is refused (too long for the filesystem): the parents made
    for it are removed again."""
    data, _ = made
    out = tmp_path / "new" / "deeper" / ("x" * 300)
    one_line(CliRunner().invoke(main, ["extract", str(data), str(out), *FLAGS]), 2, str(out), "cannot create it")
    assert not (tmp_path / "new").exists()


def test_sample_data_command(tmp_path):
    res = CliRunner().invoke(main, ["sample-data", str(tmp_path / "s"), "--n-train", "2", "--n-heldout", "1"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "s" / "train").glob("*.mp4"))) == 2
    assert len(list((tmp_path / "s" / "heldout").glob("*.json"))) == 1


def test_lock_exit_4_through_the_real_command(made, tmp_path):
    data, _ = made
    out = tmp_path / "out"
    out.mkdir()
    import filelock
    lock = filelock.FileLock(str(out / ".vtt-prep.lock"))
    with lock:  # a separate process below: flock conflicts across processes
        res = subprocess.run(prep_cmd("extract", str(data), str(out), *FLAGS), env=env(),
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 4 and "another vtt-prep run holds" in res.stderr
    assert not list(out.glob("shard-*"))
    assert not (out / "report.json").exists()  # a refused run writes nothing


@pytest.mark.parametrize("args", [["extract", "DATA", "nosuchfs://bucket/shards"],
                                  ["status", "nosuchfs://bucket/shards"], ["verify", "nosuchfs://bucket/shards"],
                                  ["compact", "nosuchfs://bucket/shards"]])
def test_a_url_folder_stays_a_url_instead_of_becoming_a_local_folder(tmp_path, monkeypatch, args):
    # Path("s3://b/p") is the local "s3:/b/p": it once was created and filled, exit 0. A URL goes to fsspec;
    # a scheme with no installed filesystem is one line naming the URL, exit 2, and nothing local appears.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DATA").mkdir()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "nosuchfs://bucket/shards: no filesystem for nosuchfs://" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DATA"]


def test_a_url_shards_folder_is_checked_by_the_preflight_too(tmp_path):
    from vtt.pipeline.config import ConfigError, PrepConfig, preflight
    cfg = PrepConfig(data_dir=tmp_path, out_dir="nosuchfs://b/p/")  # no I/O in the config itself
    with pytest.raises(ConfigError, match="nosuchfs://b/p: no filesystem for nosuchfs://"):
        preflight(cfg)


def test_from_folder_takes_only_the_settings_not_given(tmp_path):
    from vtt.pipeline.config import PrepConfig
    folder = {"fps": 2.0, "max_frames": 10, "size": [32, 32], "resize": "pad", "image_format": "png",
              "short_clip": "fail", "pick": "on_screen"}
    c = PrepConfig(tmp_path, tmp_path / "o", size="64", given={"size"}).from_folder(folder)
    assert (c.fps, c.max_frames, c.size, c.resize, c.image_format, c.pick) == (2.0, 10, (64, 64), "pad", "png",
                                                                                "on_screen")
    c = PrepConfig(tmp_path, tmp_path / "o", num_frames=4, given={"num_frames"}).from_folder(folder)
    assert (c.fps, c.num_frames, c.size) == (None, 4, (32, 32))  # --num-frames asks for its mode
    code = PrepConfig(tmp_path, tmp_path / "o")  # built in code: means what it says
    assert code.from_folder(folder) is code
