"""vtt-train with two processes on CPU: through `--num-gpus 2` (which runs the deepspeed launcher) and torchrun."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import REPO, make_train_shards, metrics, train_env, vtt_train  # noqa: E402


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
           "--output-dir", str(run), "--micro-batch", "2", "--max-steps", "4", "--log-every", "1", "--no-export"]
    p = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "world 2" in (run / "train.log").read_text()
    assert [x["step"] for x in metrics(run)[0]] == [1, 2, 3, 4]
