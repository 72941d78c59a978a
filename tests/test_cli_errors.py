"""Mistakes on the trainer CLIs' command lines (vtt-train, vtt-caption, vtt-eval) end in one line naming the
path and the problem, the documented exit status, and nothing left behind; good inputs are still used."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from train_helpers import PY, make_train_shards, train_env

from vtt.trainer.tools import caption as caption_cli
from vtt.trainer import cli as train_cli
from vtt.trainer.tools import gen_eval as eval_cli

ONE_RANK = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def invoke(main, args, env=None):
    res = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output  # no traceback
    return res


def err_lines(res) -> list[str]:
    """vtt's own lines on stderr (not the libraries' progress bars and warnings)."""
    return [x for x in res.stderr.splitlines() if x.startswith("vtt-")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_train_shards(tmp_path_factory.mktemp("cli") / "shards", n=8, per_shard=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A real tiny random LLaVA-NeXT-Video checkpoint (the --preset tiny one), used with --model llava."""
    from vtt.trainer.models.presets import build_tiny
    return build_tiny("llava", tmp_path_factory.mktemp("cli") / "tiny-llava")


# ------------------------------------------------------------------ vtt-train

def test_train_missing_shards_fails_first_and_leaves_no_run_folder(tmp_path):
    run = tmp_path / "run"
    res = invoke(train_cli.main, ["--model", "llava", "--preset", "tiny", "--shards", tmp_path / "missing",
                                  "--output-dir", run, "--max-steps", 1], env=ONE_RANK)
    assert res.exit_code == 2, res.output
    assert err_lines(res) == [f"vtt-train: error: {tmp_path / 'missing'}: shards folder does not exist (expected "
                              "a folder written by vtt-prep extract: index.json + shard-*.tar)"]
    assert not run.exists()  # nothing made: not the run folder, not the preset model


def test_train_shard_tar_given_as_folder_says_what_it_is(tmp_path, shards):
    tar = shards / "shard-000000.tar"
    res = invoke(train_cli.main, ["--model", "llava", "--preset", "tiny", "--shards", shards,
                                  "--eval-shards", tar, "--output-dir", tmp_path / "run"], env=ONE_RANK)
    assert res.exit_code == 2, res.output
    (line,) = err_lines(res)
    assert line.startswith(f"vtt-train: error: {tar}: is a shard tar, not a shards folder")
    assert line.endswith(f"give its folder, {shards}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["file", "below_file"])
def test_train_output_dir_that_is_a_file(tmp_path, shards, where):
    f = tmp_path / "some_file"
    f.write_text("keep me")
    out = f if where == "file" else f / "run"
    res = invoke(train_cli.main, ["--model", "llava", "--preset", "tiny", "--shards", shards, "--output-dir", out],
                 env=ONE_RANK)
    assert res.exit_code == 2, res.output
    (line,) = err_lines(res)
    assert line.startswith(f"vtt-train: error: {out}: ") and ("is a file" in line)
    assert f.read_text() == "keep me"


def test_train_failing_before_the_run_starts_removes_the_folder_it_made(tmp_path, shards):
    """A template field the samples lack fails the first-sample check (after the preset is built): exit 1,
    one line, and the run folder this command created is gone again."""
    run = tmp_path / "run"
    res = invoke(train_cli.main, ["--model", "llava", "--preset", "tiny", "--shards", shards, "--output-dir", run,
                                  "--max-steps", 1, "--set", "model.target_template={no_such_field}",
                                  "--set", "data.on_corrupt=stop"], env=ONE_RANK)
    assert res.exit_code == 1, res.output
    errors = err_lines(res)
    assert len(errors) == 1 and "no_such_field" in errors[0], res.stderr
    assert not run.exists()


def test_train_failing_in_an_existing_run_folder_keeps_it(tmp_path, shards):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    res = invoke(train_cli.main, ["--model", "llava", "--preset", "tiny", "--shards", shards, "--output-dir", run,
                                  "--max-steps", 1, "--set", "model.target_template={no_such_field}",
                                  "--set", "data.on_corrupt=stop"], env=ONE_RANK)
    assert res.exit_code == 1
    assert (run / "notes.txt").read_text() == "mine"


def test_cpu_process_group_builds_no_deepspeed_op(tmp_path):
    """init_distributed on DeepSpeed's CPU accelerator compiles nothing (its shm comm op is only for AutoTP
    inference): the backend holds no op and nothing appears in TORCH_EXTENSIONS_DIR. A fresh process: the
    process group is per process."""
    code = ("import deepspeed.comm.comm as c\n"
            "from vtt.trainer.run.dist import dist_env, init_distributed\n"
            "assert init_distributed(dist_env(), 1) == 'cpu'\n"
            "print('shm op:', getattr(c.cdb, 'shm_comm_op', 'missing'))\n")
    p = subprocess.run([PY, "-c", code], env=dict(train_env(), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "shm op: None" in p.stdout and "built successfully" not in p.stdout + p.stderr
    assert not (tmp_path / "ext").exists()


# ------------------------------------------------------------------ vtt-caption

def test_caption_captions_the_good_inputs_and_reports_each_bad_one(tmp_path, model, real_videos):
    bad = tmp_path / "not_a_video.mp4"
    bad.write_text("this is text, not a video\n")
    good = tmp_path / "good.mp4"
    shutil.copy(real_videos / "torchcodec__testsrc2.mp4", good)
    missing = tmp_path / "missing.mp4"
    res = invoke(caption_cli.main, [model, "--model", "llava", bad, good, missing, "--num-frames", 4,
                                    "--max-new-tokens", 3, "--json", "--device", "cpu"])
    assert res.exit_code == 1, res.output
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["key"] for r in rows] == ["good"] and isinstance(rows[0]["caption"], str)
    lines = err_lines(res)
    assert len(lines) == 3, lines
    assert lines[0] == f"vtt-caption: error: {missing}: no such file or folder"  # found before the model loads
    assert lines[1].startswith(f"vtt-caption: error: {bad}: not captioned, probe_failed: ffprobe exited 1 (")
    assert "Invalid data found when processing input" in lines[1]
    assert lines[2] == "vtt-caption: 2 of 3 input(s) failed"
    assert not list(tmp_path.glob(".tmp*")) and sorted(p.name for p in tmp_path.iterdir()) == ["good.mp4",
                                                                                                "not_a_video.mp4"]


def test_caption_only_missing_inputs_loads_no_model(tmp_path):
    res = invoke(caption_cli.main, [tmp_path, tmp_path / "a.mp4"])
    assert res.exit_code == 2  # MODEL holds no model: a usage error, one line
    assert err_lines(res) == [f"vtt-caption: error: {tmp_path}: no exported model (config.json) here or in final/"]


def test_caption_bad_shards_key_is_one_line(tmp_path, model, shards):
    res = invoke(caption_cli.main, [model, "--model", "llava", shards, "--key", "nope", "--device", "cpu"])
    assert res.exit_code == 1, res.output
    assert err_lines(res) == [f"vtt-caption: error: {shards}: no sample(s) with key ['nope']",
                              "vtt-caption: 1 of 1 input(s) failed"]


# ------------------------------------------------------------------ vtt-eval

@pytest.mark.parametrize("what", ["missing", "tar"])
def test_eval_bad_shards_one_line_nothing_written(tmp_path, model, shards, what):
    target = tmp_path / "missing" if what == "missing" else shards / "shard-000000.tar"
    out = tmp_path / "eval"
    res = invoke(eval_cli.main, [model, "--model", "llava", "--shards", target, "--out", out])
    assert res.exit_code == 2, res.output
    (line,) = err_lines(res)
    assert line.startswith(f"vtt-eval: error: {target}: ")
    assert ("does not exist" if what == "missing" else "is a shard tar, not a shards folder") in line
    assert not out.exists()


def test_eval_out_below_a_file(tmp_path, model, shards):
    f = tmp_path / "f"
    f.write_text("x")
    res = invoke(eval_cli.main, [model, "--model", "llava", "--shards", shards, "--out", f / "eval"])
    assert res.exit_code == 2
    assert err_lines(res) == [f"vtt-eval: error: {f / 'eval'}: cannot make the output folder there, {f} is a file"]


# ------------------------------------------------------------------ -h and --version everywhere

def _all_clis():
    from vtt.pipeline.cli import main as prep
    return {"vtt-prep": prep, "vtt-train": train_cli.main, "vtt-caption": caption_cli.main, "vtt-eval": eval_cli.main}


@pytest.mark.parametrize("name", ["vtt-prep", "vtt-train", "vtt-caption", "vtt-eval"])
def test_every_cli_takes_h_and_version(name):
    from importlib.metadata import version
    main = _all_clis()[name]
    h = invoke(main, ["-h"])
    assert h.exit_code == 0 and h.stdout.startswith("Usage:"), h.output
    v = invoke(main, ["--version"])
    assert v.exit_code == 0 and v.stdout.strip().endswith(f"version {version('vtt')}"), v.output


def test_prep_subcommands_take_h():
    from vtt.pipeline.cli import main as prep
    for sub in prep.commands:
        res = invoke(prep, [sub, "-h"])
        assert res.exit_code == 0 and res.stdout.startswith("Usage:"), (sub, res.output)
