"""Checkpoints that survive kills: only complete checkpoints resume (every rank's files, then vtt's marker),
`latest` is a hint, a torn metrics line is dropped, and frozen weights (LoRA base) stay out of checkpoints.

The crash tests SIGKILL a rank at an exact step of the save protocol (VTT_TRAIN_CRASH_AT, trainer/run/faults.py)
in a real two-process run (`--num-gpus 2`: the deepspeed launcher on CPU)."""
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import REPO, make_train_shards, metrics, vtt_train  # noqa: E402

from vtt.trainer.run.checkpoint import (STATE_FILE, CheckpointError, CheckpointManager, incomplete_reason,  # noqa: E402
                                        tag_for)
from vtt.trainer.run.tracking import truncate_metrics  # noqa: E402

S2S = ["--model", "seq2seq", "--preset", "tiny", "--micro-batch", "2", "--log-every", "1", "--lr", "3e-3",
       "--warmup-steps", "1", "--no-export", "--keep-last", "0", "--set", "model.tgt_lang=fra_Latn"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_train_shards(tmp_path_factory.mktemp("shards") / "train", n=24, per_shard=6)


def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A tag folder laid out as CheckpointManager.save leaves it (the marker lists the files and sizes)."""
    path = folder / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    if complete:
        files = {"mp_rank_00_model_states.pt": step}
        (path / STATE_FILE).write_text(json.dumps({"step": step, "files": files}))
    return path


def test_only_complete_checkpoints_are_found_kept_and_counted(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1)
    for step in (2, 4, 6):
        fake_checkpoint(m.dir, step)
    fake_checkpoint(m.dir, 8, complete=False)  # killed mid-save: every rank's files may be there, no marker
    (m.dir / "latest").write_text(tag_for(8))  # what DeepSpeed's rank 0 wrote before the other ranks finished
    assert "no vtt_state.json" in incomplete_reason(m.dir / tag_for(8))
    assert m.find("latest") == (m.dir, tag_for(6))  # the newest complete one, not what `latest` names
    assert m.find(str(tmp_path)) == (m.dir, tag_for(6))  # a run folder
    assert m.find(str(m.dir)) == (m.dir, tag_for(6))  # a checkpoints folder
    assert m.find(str(m.dir / tag_for(4))) == (m.dir, tag_for(4))  # a tag folder
    with pytest.raises(CheckpointError, match="step_00000008: not a complete checkpoint: no vtt_state.json"):
        m.find(str(m.dir / tag_for(8)))
    (m.dir / tag_for(6) / "mp_rank_00_model_states.pt").write_bytes(b"x")  # a file shorter than recorded
    assert "not 6 bytes" in incomplete_reason(m.dir / tag_for(6))
    assert m.find("latest") == (m.dir, tag_for(4))
    assert m.prune() == [tag_for(6), tag_for(8)]  # crash debris; the newest keep_last=2 complete ones stay
    assert m.tags() == [tag_for(2), tag_for(4)]
    fake_checkpoint(m.dir, 10)
    assert m.prune() == [tag_for(2)] and m.tags() == [tag_for(4), tag_for(10)]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        m.find(str(tmp_path / "nope"))
    (tmp_path / "other" / "step_x").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint in"):
        m.find(str(tmp_path / "other" / "step_x"))
    assert CheckpointManager(tmp_path / "fresh", 2, 0, 1).find("latest") is None


def test_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_kept(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)]
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + '\n{"step": 6, "lo')
    truncate_metrics(tmp_path, 4)
    assert p.read_text().splitlines() == lines[:2] + ["{not json"] + lines[2:4]


# ------------------------------------------------------------------ real runs

def test_resume_after_a_torn_metrics_line(shards, tmp_path):
    """One process: killed while writing a metrics line after its step-4 checkpoint; --resume continues."""
    run = tmp_path / "run"
    vtt_train(*S2S, "--shards", shards, "--output-dir", run, "--max-steps", 4, "--save-every", 2)
    full = metrics(run)[0]
    shutil.rmtree(run / "checkpoints" / tag_for(4))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # no newline: the kill came mid-write
    vtt_train(*S2S, "--shards", shards, "--output-dir", run, "--max-steps", 4, "--save-every", 2, "--resume")
    again = metrics(run)[0]
    assert [x["step"] for x in again] == [1, 2, 3, 4]
    assert [x["loss"] for x in again] == pytest.approx([x["loss"] for x in full], rel=1e-5)
    assert "dropping its torn last line" in (run / "train.log").read_text()


LLAVA = ["--model", "llava", "--preset", "tiny", "--micro-batch", "2", "--log-every", "1", "--lr", "2e-3",
         "--warmup-steps", "1", "--no-export", "--keep-last", "0", "--max-steps", 4, "--save-every", 2]


def model_states(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / tag_for(step) / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)


def test_lora_checkpoint_holds_only_trainable_tensors_and_resumes_exactly(shards, tmp_path):
    """LoRA: the model-states file holds the adapters + projector only (the frozen base reloads from the model
    path at resume), it is far smaller than a full run's, and a resume repeats the uninterrupted losses."""
    from vtt.trainer.models.registry import get_adapter
    from vtt.trainer.models.model_config import ModelConfig
    lora, full = tmp_path / "lora", tmp_path / "full"
    vtt_train(*LLAVA, "--shards", shards, "--output-dir", lora, "--lora", "--set", "model.lora_r=4")
    vtt_train(*LLAVA, "--shards", shards, "--output-dir", full)
    torch.manual_seed(0)
    model = get_adapter(ModelConfig(kind="llava", model_path=str(lora / "preset-llava"), lora=True,
                                    lora_r=4)).load_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params = {n for n, _ in model.named_parameters()}
    saved = model_states(lora, 4)["module"]
    assert {k for k in saved if k in params} == trainable and any(".lora_A." in k for k in trainable)
    assert len(trainable) < len(params) // 2
    sizes = {r.name: (r / "checkpoints" / tag_for(4) / "mp_rank_00_model_states.pt").stat().st_size
             for r in (lora, full)}
    assert sizes["lora"] * 5 < sizes["full"], sizes
    assert json.loads((lora / "checkpoints" / tag_for(4) / STATE_FILE).read_text())["frozen_excluded"] is True
    shutil.rmtree(lora / "checkpoints" / tag_for(4))
    before = metrics(lora)[0]
    vtt_train(*LLAVA, "--shards", shards, "--output-dir", lora, "--lora", "--set", "model.lora_r=4", "--resume")
    after = metrics(lora)[0]
    assert "resumed from" in (lora / "train.log").read_text() and [x["step"] for x in after] == [1, 2, 3, 4]
    for a, b in zip(before[2:], after[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)  # trained (B starts at zero)


def test_a_changed_frozen_base_is_named_at_resume(shards, tmp_path, caplog):
    """A checkpoint without its frozen weights records where they reload from; resume warns if that changed."""
    import os
    run = tmp_path / "run"
    vtt_train(*LLAVA, "--shards", shards, "--output-dir", run, "--lora", "--max-steps", 2)
    path = run / "checkpoints" / tag_for(2)
    source = json.loads((path / STATE_FILE).read_text())["frozen_source"]
    assert source["folder"] == str((run / "preset-llava").resolve()) and "model.safetensors" in source["weights"]
    m = CheckpointManager(run, 0, 0, 1, model_path=str(run / "preset-llava"))
    m._check_frozen_source(path)
    assert "changed since" not in caplog.text
    os.utime(run / "preset-llava" / "model.safetensors", ns=(0, 0))  # rewritten in place, say
    m._check_frozen_source(path)
    assert "changed since the checkpoint was written" in caplog.text


# ------------------------------------------------------------------ kill tests, two processes

TWO = [*S2S, "--num-gpus", 2, "--max-steps", 6, "--save-every", 2, "--deepspeed", REPO / "configs" / "ds_zero3.json"]


def port() -> int:
    """A free rendezvous port: the launcher's default 29500 may be taken by another run on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    vtt_train(*TWO, "--shards", shards, "--output-dir", run, "--master-port", port(), timeout=400)
    return metrics(run)[0]


# (crash point:which save@rank, the checkpoint a resume must take, resume and compare the losses?)
KILLS = [
    pytest.param("save-begin:2@1", 2, False, marks=pytest.mark.slow, id="save-begin"),
    pytest.param("rank-files:2@1", 2, True, id="rank-files"),  # all DeepSpeed files there, rank 1 not done
    pytest.param("rank-done:2@1", 2, False, marks=pytest.mark.slow, id="rank-done"),
    pytest.param("marker:2@0", 4, True, marks=pytest.mark.slow, id="marker"),  # complete, `latest` still names step 2
    pytest.param("latest:2@0", 4, False, marks=pytest.mark.slow, id="latest"),
]


@pytest.mark.parametrize("point,resumes_from,resume", KILLS)
def test_kill_during_a_save_resumes_from_a_complete_checkpoint(point, resumes_from, resume, shards, uninterrupted,
                                                                tmp_path, monkeypatch):
    """Two ranks, ZeRO-3 (each rank writes its own model and optimizer partition): one rank is SIGKILLed at an
    exact step of the step-4 save. Resume takes the newest complete checkpoint whatever `latest` says, and
    the resumed run repeats the uninterrupted losses with each step logged once."""
    run = tmp_path / "run"
    monkeypatch.setenv("VTT_TRAIN_CRASH_AT", point)
    p = vtt_train(*TWO, "--shards", shards, "--output-dir", run, "--master-port", port(), timeout=400, check=False)
    monkeypatch.delenv("VTT_TRAIN_CRASH_AT")
    assert p.returncode != 0, p.stderr[-2000:]
    assert [x["step"] for x in metrics(run)[0]] == [1, 2, 3, 4]
    ckpts = run / "checkpoints"
    if resumes_from == 2 and (ckpts / tag_for(4)).is_dir():
        (ckpts / "latest").write_text(tag_for(4))  # as DeepSpeed's rank 0 wrote it before the others finished
    assert CheckpointManager(run, 0, 0, 2).find("latest") == (ckpts, tag_for(resumes_from))
    if point.startswith("rank-files"):  # the torn case: every DeepSpeed file is there, only rank 1's done is not
        assert len(list((ckpts / tag_for(4)).glob("*optim_states.pt"))) == 2
        assert not (ckpts / tag_for(4) / STATE_FILE).exists()
    if not resume:
        return
    vtt_train(*TWO, "--shards", shards, "--output-dir", run, "--resume", "--master-port", port(), timeout=400)
    after = metrics(run)[0]
    assert [x["step"] for x in after] == list(range(1, 7))
    for a, b in zip(uninterrupted, after):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
    assert f"resumed from {ckpts / tag_for(resumes_from)}" in (run / "train.log").read_text()
    assert all(incomplete_reason(ckpts / tag_for(s)) is None for s in (2, 4, 6))
