"""bf16 by torch autocast (deepspeed.autocast), the one-process default of a bf16 full fine-tune: the real DeepSpeed
engine computes what a plain PyTorch loop computes, trains, resumes and exports fp32 weights. Each DeepSpeed run
is its own process (DeepSpeed caches its process group per process)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import PY, REPO, make_prep_shards, metrics, train_env, vtt_train  # noqa: E402


def test_vtt_step_is_the_plain_loops_step():
    """benchmarks/bench_step.py, tiny seq2seq bf16: vtt's step (ZeRO-0, torch_autocast) and the plain loop (fp32
    weights + autocast) give the same first loss on the same batch."""
    def first_losses():
        p = subprocess.run([PY, str(REPO / "benchmarks" / "bench_step.py"), "--cases", "seq2seq", "--precision",
                            "bf16", "--rounds", "1", "--steps-per-round", "1"], cwd=REPO, env=train_env(),
                           capture_output=True, text=True, timeout=300)
        line = [x for x in p.stdout.splitlines() if x.startswith("BENCH_STEP ")]
        assert line, p.stderr[-3000:]
        return json.loads(line[0].split(" ", 1)[1])
    r = first_losses()
    assert r["zero_stage"] == 0 and r["precision"] == "bf16"
    assert r["first_loss_vtt"] == pytest.approx(r["first_loss_plain"], rel=1e-6)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_prep_shards(tmp_path_factory.mktemp("prep"))


def test_autocast_run_trains_resumes_and_exports_fp32(shards, tmp_path):
    from safetensors import safe_open
    train, _, _ = shards
    run = tmp_path / "run"
    args = ["--model", "seq2seq", "--preset", "tiny", "--shards", train, "--output-dir", run, "--max-steps", 6,
            "--micro-batch", 4, "--lr", "2e-3", "--warmup-steps", 1, "--log-every", 1, "--save-every", 3,
            "--keep-last", 0, "--set", "model.src_lang=eng_Latn"]
    vtt_train(*args)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 0
    assert "autocast: true" in (run / "config.yaml").read_text()
    got = metrics(run)[0]
    assert [x["step"] for x in got] == list(range(1, 7)) and got[-1]["loss"] < got[0]["loss"]
    assert all(x["grad_norm"] > 0 for x in got)  # vtt clips (and logs the norm) on ZeRO-0
    with safe_open(str(next((run / "final").glob("*.safetensors"))), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}  # the fp32 master weights
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("final", "step_00000006"))
    (crashed / "checkpoints" / "latest").write_text("step_00000003")
    vtt_train(*[crashed if a == run else a for a in args], "--resume")
    assert "resumed from" in (crashed / "train.log").read_text()
    for a, b in zip(got[3:], metrics(crashed)[0][3:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
