"""vtt-train end to end on CPU (DeepSpeed's CPU accelerator, gloo), tiny presets, real tars.

Every DeepSpeed run is its own process (DeepSpeed caches its process group per process)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import PY, REPO, make_prep_shards, metrics, train_env, vtt_train  # noqa: E402

from vtt.trainer.run.ds_config import bucket_elements  # noqa: E402

COMMON = ["--preset", "tiny", "--micro-batch", "2", "--log-every", "1", "--lr", "2e-3", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(train, eval, heldout videos): shards made by vtt-prep itself from its sample clips."""
    return make_prep_shards(tmp_path_factory.mktemp("prep"))


def falling(lines) -> bool:
    losses = [x["loss"] for x in lines]
    return sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05


@pytest.fixture(scope="module")
def llava_run(shards, tmp_path_factory):
    """LLaVA, generated ZeRO-2 bf16 config, one plain process: 8 steps, checkpoints at 4 and 8, eval, W&B
    offline, export; the live engine's logits on two eval samples are dumped for the round trip."""
    train, evals, _ = shards
    run = tmp_path_factory.mktemp("llava") / "run"
    args = ["--model", "llava", "--shards", train, "--eval-shards", evals, "--output-dir", run, "--max-steps", 8,
            "--grad-accum", 2, "--save-every", 4, "--eval-every", 4, "--wandb-project", "vtt-test",
            "--wandb-mode", "offline", "--zero-stage", 2, *COMMON]  # one process alone would take stage 0
    p = subprocess.run([PY, str(Path(__file__).parent / "train_helpers.py"), "train_and_dump",
                        str(run.parent / "dump.pt"), *map(str, args)], cwd=REPO, env=train_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return run, args


def test_llava_zero2_trains_logs_and_checkpoints(llava_run):
    run, _ = llava_run
    train, evals = metrics(run)
    assert [x["step"] for x in train] == list(range(1, 9))
    assert set(train[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s",
                             "data_wait_frac"}
    assert falling(train), [x["loss"] for x in train]
    assert all(x["grad_norm"] > 0 and x["tokens_per_s"] > 0 and 0 <= x["data_wait_frac"] < 1 for x in train)
    assert train[0]["lr"] < train[1]["lr"] and train[-1]["lr"] < train[1]["lr"]  # warmup, then cosine decay
    assert train[-1]["epoch"] == pytest.approx(8 * 2 * 2 / 24, abs=1e-3)  # 32 samples of 24 per epoch
    assert [x["step"] for x in evals] == [4, 8] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and ds["train_batch_size"] == 4
    assert "data_types" not in ds  # Llama's RoPE buffers stay fp32
    assert "kind: llava" in (run / "config.yaml").read_text()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004", "step_00000008"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    state = json.loads((run / "checkpoints" / "step_00000004" / "vtt_state.json").read_text())
    assert state["step"] == 4 and state["data"][0]["batch"] == 8  # 4 steps x 2 micro batches consumed
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run missing"


def test_export_reloads_with_equal_logits_and_generates(llava_run, shards):
    from transformers import AutoModelForImageTextToText

    from vtt.trainer.tools.caption import caption
    run, _ = llava_run
    dump = torch.load(run.parent / "dump.pt", weights_only=False)
    model = AutoModelForImageTextToText.from_pretrained(run / "final", dtype=torch.bfloat16).eval()
    batch = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in dump["batch"].items()}
    with torch.no_grad():
        logits = model(**batch).logits.float()
    torch.testing.assert_close(logits, dump["logits"], rtol=0, atol=1e-5)
    video = sorted(shards[2].glob("*.mp4"))[0]
    out = caption(str(run), [str(shards[1]), str(video)], limit=2, max_new_tokens=6)  # vtt-caption
    assert [k for k, _ in out] == dump["keys"] + [video.stem] and all(isinstance(t, str) for _, t in out)


def test_resume_gives_the_same_losses(llava_run, tmp_path):
    """A run killed after its step-4 checkpoint, resumed with --resume: steps 5-8 repeat the uninterrupted
    losses, metrics.jsonl has each step once, and W&B continues the same run id."""
    run, args = llava_run
    crashed = tmp_path / "run"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("final", "step_00000008"))
    (crashed / "checkpoints" / "latest").write_text("step_00000004")
    args = [str(crashed) if a == run else a for a in args]
    vtt_train(*args, "--resume")
    before, after = metrics(run)[0], metrics(crashed)[0]
    assert [x["step"] for x in after] == list(range(1, 9))
    for a, b in zip(before[4:], after[4:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert b["lr"] == pytest.approx(a["lr"])
    assert (crashed / "wandb_run_id").read_text() == (run / "wandb_run_id").read_text()
    assert "resumed from" in (crashed / "train.log").read_text()


def test_seq2seq_with_seed_deepspeed_json(shards, tmp_path):
    """The seed's ZeRO-2 bf16 JSON (micro 4, accumulation 2, the rest "auto") drives a seq2seq run that
    learns the sidecars' French descriptions from the English ones."""
    train, _, _ = shards
    run = tmp_path / "run"
    vtt_train("--model", "seq2seq", "--shards", train, "--output-dir", run, "--deepspeed",
              REPO / "configs" / "ds_config.json", "--max-steps", 6, "--log-every", 1, "--lr", 3e-3,
              "--warmup-steps", 1, "--preset", "tiny", "--no-export", "--save-every", 0,
              "--set", "model.src_lang=eng_Latn", "--set", "model.tgt_lang=fra_Latn",
              "--set", "model.target_template={description_fr}")
    ds = json.loads((run / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (4, 2, 8)
    assert ds["optimizer"]["params"]["lr"] == 3e-3 and ds["data_types"] == {"buffer_dtype": "bf16"}
    # "auto" bucket: from the trainable size, not hidden^2 (trainer/run/ds_config.py)
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["reduce_bucket_size"] == bucket_elements(
        json.loads((run / "summary.json").read_text())["trainable_params"])
    lines = metrics(run)[0]
    assert len(lines) == 6 and falling(lines), [x["loss"] for x in lines]
    assert lines[-1]["epoch"] == pytest.approx(2.0)  # 6 steps x 8 samples = 2 epochs of 24
    assert not (run / "final").exists()


NAN_SCRIPT = """
import sys, torch
from vtt.trainer import cli
from vtt.trainer.run import loop
real = loop.forward_loss
calls = []
def poisoned(engine, batch, causal):
    calls.append(1)
    loss = real(engine, batch, causal)
    return loss * float("nan") if len(calls) == 3 else loss
loop.forward_loss = poisoned
sys.argv = ["vtt-train"] + sys.argv[1:]
cli.main()
"""


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
    train, _, _ = shards
    run = tmp_path / "run"
    p = subprocess.run([PY, "-c", NAN_SCRIPT, "--model", "seq2seq", "--shards", str(train), "--output-dir", str(run),
                        "--max-steps", "6", "--save-every", "2", *COMMON], cwd=REPO, env=train_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "vtt-train: error: loss is not finite at step 3" in p.stderr
    assert "last good checkpoint: " in p.stderr and "step_00000002" in p.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert sorted(x.name for x in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert [x["step"] for x in metrics(run)[0]] == [1, 2]
    assert not (run / "final").exists()
