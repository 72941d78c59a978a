"""vtt-train with two processes on CPU: through `--num-gpus 2` (which runs the deepspeed launcher) and torchrun."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import PY, REPO, make_train_shards, metrics, train_env, vtt_train  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_train_shards(tmp_path_factory.mktemp("shards") / "train", n=24, per_shard=6)


def test_two_processes_zero3_via_deepspeed_launcher_then_export(shards, tmp_path):
    """seq2seq, ZeRO-3 from configs/ds_zero3.json ("auto" everywhere), 2 ranks: loss falls, both ranks
    checkpoint their partitions, and the export gathers full weights that reload and generate."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    run = tmp_path / "run"
    p = vtt_train("--model", "seq2seq", "--preset", "tiny", "--shards", shards, "--output-dir", run,
                  "--deepspeed", REPO / "configs" / "ds_zero3.json", "--micro-batch", 2, "--max-steps", 6,
                  "--save-every", 3, "--log-every", 1, "--lr", 3e-3, "--warmup-steps", 1, "--num-gpus", 2,
                  "--set", "model.tgt_lang=fra_Latn", timeout=400)
    assert "deepspeed.launcher.runner --num_gpus 2" in p.stderr
    assert "world 2" in (run / "train.log").read_text()
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["zero_optimization"]["stage"] == 3
    lines = metrics(run)[0]
    assert [x["step"] for x in lines] == list(range(1, 7))
    assert lines[-1]["epoch"] == pytest.approx(6 * 4 / 24)  # both ranks' samples count once
    losses = [x["loss"] for x in lines]
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.1, losses
    ckpt = run / "checkpoints" / "step_00000006"
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    assert len(json.loads((ckpt / "vtt_state.json").read_text())["data"]) == 2  # each rank's data position
    model = AutoModelForSeq2SeqLM.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.generation_config.forced_bos_token_id == tok.convert_tokens_to_ids("fra_Latn")
    preset = AutoModelForSeq2SeqLM.from_pretrained(run / "preset-seq2seq")
    w = "model.encoder.layers.0.fc1.weight"
    assert not torch.equal(model.state_dict()[w].float(), preset.state_dict()[w].float())  # trained, gathered
    out = model.generate(**tok(["a red square moving left"], return_tensors="pt"), max_new_tokens=5)
    assert out.shape[0] == 1 and out.shape[1] > 1


@pytest.mark.slow
def test_two_processes_llava_zero2_via_torchrun(tmp_path, shards):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "vtt.trainer.cli", "--model", "llava", "--preset", "tiny", "--shards", str(shards),
           "--output-dir", str(run), "--micro-batch", "2", "--max-steps", "4", "--log-every", "1", "--no-export",
           "--zero-stage", "2"]
    p = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "world 2" in (run / "train.log").read_text()
    assert [x["step"] for x in metrics(run)[0]] == [1, 2, 3, 4]


def test_two_processes_hold_replicas_and_resume_exactly(shards, tmp_path):
    """No ZeRO stage named, two ranks whose devices can each hold the whole tiny model: vtt takes the
    one-process settings (bf16 full fine-tune: ZeRO-0 by autocast; run/memory.chooses_replica), trains,
    checkpoints, and a run resumed from step 3 logs the same losses as the one that went on."""
    run = tmp_path / "run"
    args = ["--model", "seq2seq", "--preset", "tiny", "--shards", shards, "--output-dir", run, "--micro-batch", 2,
            "--max-steps", 6, "--save-every", 3, "--keep-last", 0, "--log-every", 1, "--lr", 3e-3,
            "--warmup-steps", 1, "--num-gpus", 2, "--no-export", "--set", "model.tgt_lang=fra_Latn"]
    vtt_train(*args, timeout=400)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 0 and ds["torch_autocast"]["enabled"] and ds["train_batch_size"] == 4
    got = metrics(run)[0]
    assert [x["step"] for x in got] == list(range(1, 7)) and got[-1]["loss"] < got[0]["loss"]
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("step_00000006"))
    (crashed / "checkpoints" / "latest").write_text("step_00000003")
    vtt_train(*[crashed if a == run else a for a in args], "--resume", timeout=400)
    for a, b in zip(got[3:], metrics(crashed)[0][3:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)


def test_two_rank_step_benchmark_computes_what_ddp_computes():
    """benchmarks/bench_step.py --world 2: on each case's first batch, vtt's DeepSpeed step over two ranks
    (the stage it picks) and a plain DistributedDataParallel loop give the same global per-token loss."""
    p = subprocess.run([PY, str(REPO / "benchmarks" / "bench_step.py"), "--world", "2", "--precision", "bf16",
                        "--rounds", "1", "--steps-per-round", "1"], cwd=REPO, env=train_env(), capture_output=True,
                       text=True, timeout=400)
    lines = [json.loads(x.split(" ", 1)[1]) for x in p.stdout.splitlines() if x.startswith("BENCH_STEP ")]
    assert len(lines) == 2, p.stderr[-3000:]
    by_case = {r["case"]: r for r in lines}
    assert (by_case["seq2seq"]["zero_stage"], by_case["llava_lora"]["zero_stage"]) == (0, 1)
    for r in lines:
        assert r["world_size"] == 2 and r["ratio_plain_over_vtt"] > 0
        assert r["first_loss_vtt"] == pytest.approx(r["first_loss_plain"], rel=1e-5), r
