"""vtt-train settings: YAML + flags -> TrainConfig, DeepSpeed config generation / "auto" filling / contradictions,
LR schedule, checkpoint bookkeeping, tracking, and the errors that must come before any training starts."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import REPO, make_train_shards  # noqa: E402

from vtt.trainer.run import ds_config as dsc  # noqa: E402
from vtt.trainer.cli import launcher_command, main, overrides_from_flags  # noqa: E402
from vtt.trainer.config import (ConfigError, DeepSpeedSettings, OptimConfig, TrackingConfig, load_config,  # noqa: E402
                                parse_set)
from vtt.trainer.run.tracking import Tracker, TrackingError, preflight, truncate_metrics  # noqa: E402

CONFIGS = REPO / "configs"


def cfg_tree(tmp_path, **sections):
    tree = {"model": {"kind": "llava"}, "data": {"shards": str(tmp_path / "shards")},
            "run": {"output_dir": str(tmp_path / "run"), "preset": "tiny"}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


# ------------------------------------------------------------------ TrainConfig

@pytest.mark.parametrize("name,kind", [("llava.yaml", "llava"), ("seq2seq.yaml", "seq2seq")])
def test_shipped_yaml_loads_and_flags_override(tmp_path, name, kind):
    over = overrides_from_flags({"shards": "S", "output_dir": str(tmp_path), "max_steps": 7, "lr": 3e-4,
                                 "micro_batch": None}, ("model.lora_r=64",) if kind == "llava" else ())
    cfg = load_config(CONFIGS / name, over)
    assert cfg.model.kind == kind and cfg.data.shards == "S"
    assert cfg.run.max_steps == 7 and cfg.run.epochs is None  # the flag replaced the YAML's epochs
    assert cfg.optim.lr == 3e-4
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.precision == "bf16"
    if kind == "llava":
        assert cfg.model.lora and cfg.model.lora_r == 64
        assert cfg.model.load_dtype == "bfloat16"  # a 7B model never passes through fp32 on the host
    else:
        assert cfg.model.src_lang == "eng_Latn" and cfg.deepspeed.micro_batch_size == 16


def test_preset_points_model_path_at_run_folder(tmp_path):
    cfg = load_config(CONFIGS / "llava.yaml", {"data": {"shards": "S"},
                                                "run": {"output_dir": str(tmp_path), "preset": "tiny"}})
    assert cfg.model.model_path == str(tmp_path / "preset-llava")


@pytest.mark.parametrize("tree_update,match", [
    ({"model": {"lora_rank": 8}}, r"unknown key\(s\) model\.lora_rank; model has: kind, model_path"),
    ({"optimizer": {"lr": 1}}, r"unknown config section\(s\) \['optimizer'\]"),
    ({"optim": {"lr": "fast"}}, r"optim\.lr: expected float, got str 'fast'"),
    ({"optim": {"betas": [0.9]}}, r"optim\.betas: expected 2 values"),
    ({"run": {"max_steps": 5, "epochs": 1}}, r"max_steps or run\.epochs, not both"),
    ({"deepspeed": {"precision": "fp16"}}, r"fp16 is not offered"),
    ({"deepspeed": {"zero_stage": 4}}, r"zero_stage must be 0, 1, 2 or 3"),
    ({"deepspeed": {"offload_param": True, "zero_stage": 2}}, r"offload_param needs zero_stage 3"),
    ({"model": {"kind": "gpt"}}, r"model kind 'gpt' is not one of"),
    ({"tracking": {"wandb_mode": "sometimes"}}, r"wandb_mode must be one of"),
    ({"run": {"eval_every": 10}}, r"eval_every needs an eval set"),
])
def test_bad_settings_are_named(tmp_path, tree_update, match):
    from vtt.trainer.config import config_from_dict, merge
    with pytest.raises(ConfigError, match=match):
        config_from_dict(merge(cfg_tree(tmp_path), tree_update))


def test_set_parses_yaml_values_and_rejects_bad_syntax():
    from vtt.trainer.config import config_from_dict, merge
    over = parse_set(["model.lora=true", "optim.betas=[0.9, 0.95]", "run.resume=", "model.lora_r=8",
                      "model.target_template={description_fr}", "model.num_frames=null"])
    cfg = config_from_dict(merge(cfg_tree(Path("/tmp/x")), over))
    assert cfg.model.lora is True and cfg.model.lora_r == 8 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.run.resume is None and cfg.model.num_frames is None
    assert cfg.model.target_template == "{description_fr}"  # a template, not a YAML mapping
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_set(["lora=true"])
    with pytest.raises(ConfigError, match=r"model\.lora_r: expected int, got str 'many'"):
        config_from_dict(merge(cfg_tree(Path("/tmp/x")), parse_set(["model.lora_r=many"])))


def test_lr_schedule_warmup_then_cosine():
    o = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    f = [o.lr_factor(s, 20) for s in range(20)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warmup, never 0
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # cosine decay is monotonic
    assert 0.1 <= f[-1] < 0.12  # ends near the floor
    assert OptimConfig(schedule="constant", warmup_steps=0).lr_factor(10, 20) == 1.0


# ------------------------------------------------------------------ DeepSpeed config

def test_generated_config_per_model_kind():
    s, o = DeepSpeedSettings(micro_batch_size=2, grad_accum=3), OptimConfig(lr=1e-3, weight_decay=0.1)
    r = dsc.resolve(s, world_size=4)
    assert (r.zero_stage, r.precision, r.global_batch) == (2, "bf16", 24)
    llava = dsc.build(s, o, 4, hidden_size=64, cast_buffers=False, total_steps=10, bf16_supported=True,
                      device="cuda")
    assert llava["train_batch_size"] == 24 and llava["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert llava["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert llava["optimizer"]["params"]["torch_adam"] is True and "data_types" not in llava  # RoPE stays fp32
    s2s = dsc.build(s, o, 4, 32, cast_buffers=True, total_steps=10, bf16_supported=True, device="cuda")
    assert s2s["data_types"] == {"buffer_dtype": "bf16"}
    z3 = dsc.build(DeepSpeedSettings(zero_stage=3, offload_param=True, offload_optimizer=True), o, 1, 64,
                   False, 10, True, "cuda")
    zo = z3["zero_optimization"]
    assert zo["stage3_gather_16bit_weights_on_model_save"] and zo["offload_param"]["device"] == "cpu"
    assert z3["zero_force_ds_cpu_optimizer"] is False  # torch AdamW with offload: nothing to compile


def test_settings_chosen_per_case():
    """One process takes ZeRO-0 unless a stage is asked for (or offload needs one); gradient buckets come from the
    trainable size (a tiny model: one bucket; NLLB-600M: ~4 instead of ~600; never above DeepSpeed's 5e8);
    torch AdamW is fused on CUDA and multi-tensor elsewhere, left alone with offload."""
    o = OptimConfig()
    assert dsc.resolve(DeepSpeedSettings(), world_size=1).zero_stage == 1  # bf16: BF16_Optimizer
    assert dsc.resolve(DeepSpeedSettings(precision="fp32"), world_size=1).zero_stage == 0
    bf16 = dsc.build(DeepSpeedSettings(), o, 1, 64, False, 10, True, "cuda")
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"} and bf16["bf16"]["check_grad_overflow"] is False
    assert dsc.resolve(DeepSpeedSettings(), world_size=2).zero_stage == 2
    assert dsc.resolve(DeepSpeedSettings(zero_stage=2), world_size=1).zero_stage == 2
    assert dsc.resolve(DeepSpeedSettings(offload_optimizer=True), world_size=1).zero_stage == 2
    assert dsc.bucket_elements(171_000) == 2**20 and dsc.bucket_elements(615_000_000) == 153_750_000
    assert dsc.bucket_elements(7_000_000_000) == 500_000_000
    s = DeepSpeedSettings(zero_stage=2)
    gpu = dsc.build(s, o, 2, 1024, False, 10, True, "cuda", trainable=615_000_000)
    z = gpu["zero_optimization"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == 153_750_000
    assert gpu["optimizer"]["params"]["fused"] is True and "foreach" not in gpu["optimizer"]["params"]
    cpu = dsc.build(s, o, 2, 1024, False, 10, True, "cpu")
    assert cpu["zero_optimization"]["reduce_bucket_size"] == 1024 * 1024  # plan time: placeholder
    assert cpu["optimizer"]["params"]["foreach"] is True and "fused" not in cpu["optimizer"]["params"]
    off = dsc.build(DeepSpeedSettings(zero_stage=2, offload_optimizer=True), o, 1, 64, False, 10, True, "cuda")
    assert "fused" not in off["optimizer"]["params"] and "foreach" not in off["optimizer"]["params"]
    ext = dsc.build(DeepSpeedSettings(config_file=str(CONFIGS / "ds_config.json")), o, 1, 32, True, 10, True,
                    "cuda", trainable=10_000_000)
    assert ext["zero_optimization"]["reduce_bucket_size"] == 2_500_000  # "auto" filled
    assert ext["zero_optimization"]["allgather_bucket_size"] == 500_000_000  # a concrete value is kept


def test_seed_config_auto_values_are_filled(tmp_path):
    seed = json.loads((CONFIGS / "ds_config.json").read_text())
    assert seed["zero_optimization"]["stage"] == 2 and seed["bf16"]["enabled"] is True
    assert (seed["train_micro_batch_size_per_gpu"], seed["gradient_accumulation_steps"]) == (4, 2)
    s = DeepSpeedSettings(config_file=str(CONFIGS / "ds_config.json"))
    o = OptimConfig(lr=5e-4, betas=(0.9, 0.95), weight_decay=0.05, grad_clip=0.5)
    cfg = dsc.build(s, o, 3, hidden_size=32, cast_buffers=True, total_steps=100, bf16_supported=True,
                    device="cuda")
    assert cfg["train_batch_size"] == 3 * 4 * 2 and cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"] == {"lr": 5e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05,
                                          "torch_adam": True, "fused": True}  # CUDA: fused torch AdamW
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    assert cfg["data_types"] == {"buffer_dtype": "bf16"} and dsc.remaining_auto(cfg) == []


def test_external_scheduler_and_zero3_autos(tmp_path):
    ext = json.loads((CONFIGS / "ds_zero3.json").read_text())
    ext["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                            "warmup_num_steps": "auto", "total_num_steps": "auto"}}
    p = tmp_path / "z3.json"
    p.write_text(json.dumps(ext))
    s = DeepSpeedSettings(config_file=str(p), micro_batch_size=2, precision="fp32")
    cfg = dsc.build(s, OptimConfig(lr=1e-3, warmup_steps=5), 2, 100, False, 50, False, "cpu")
    assert cfg["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 5,
                                          "total_num_steps": 50}
    z = cfg["zero_optimization"]
    assert (z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (9000, 1000)
    assert cfg["bf16"]["enabled"] is False and cfg["train_batch_size"] == 4


@pytest.mark.parametrize("ext,settings,world,bf16_ok,match", [
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}, {}, 2, True,
     r"train_batch_size=10 but world size 2 x micro batch 2 x gradient accumulation 2 = 8"),
    ({"train_micro_batch_size_per_gpu": 4}, {"micro_batch_size": 2}, 1, True,
     r"sets train_micro_batch_size_per_gpu=4 but the vtt settings say 2"),
    ({"bf16": {"enabled": True}}, {}, 1, False, r"no bf16 support .*--precision fp32"),
    ({"fp16": {"enabled": True}}, {}, 1, True, r"fp16 is not supported"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, {}, 1, True, r"optimizer\.params\.lr=0\.1 but vtt"),
    ({"data_types": {"buffer_dtype": "bf16"}}, {}, 1, True, r"spoil positions"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, {}, 1, True,
     r"offload_param needs ZeRO stage 3"),
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, {}, 1, True, r"cannot fill.*sub_group_size"),
])
def test_contradictions_stop_before_training(tmp_path, ext, settings, world, bf16_ok, match):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ext))
    s = DeepSpeedSettings(config_file=str(p), **settings)
    with pytest.raises(dsc.DeepSpeedConfigError, match=match):
        dsc.build(s, OptimConfig(), world, 64, cast_buffers=False, total_steps=10, bf16_supported=bf16_ok,
                  device="cpu")


# ------------------------------------------------------------------ checkpoints, launcher, tracking

def test_launcher_command_reruns_itself_without_launch_flags():
    cmd = launcher_command(["--model", "llava", "--num-gpus", "4", "--hostfile=hf", "--shards", "S"], 4, 2, "hf",
                           29600)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[3:] == ["--num_gpus", "4", "--num_nodes", "2", "--hostfile", "hf", "--master_port", "29600",
                       "--module", "vtt.trainer.cli", "--model", "llava", "--shards", "S"]
    one_node = launcher_command(["--num-gpus", "2"], 2, None, None, None)  # never the fixed 29500 here
    port = int(one_node[one_node.index("--master_port") + 1])
    assert port != 29500  # a free port from the OS's ephemeral range
    assert "--master_port" not in launcher_command([], 2, 2, "hf", None)  # multi-node: the launcher's own


def test_metrics_truncated_on_resume(tmp_path):
    lines = [{"step": s, "loss": 1.0} for s in range(1, 7)] + [{"step": 4, "eval_loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    truncate_metrics(tmp_path, 4)
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in kept] == [1, 2, 3, 4, 4]


def test_wandb_online_without_key_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(TrackingError, match="--wandb-mode offline"):
        preflight(TrackingConfig(wandb_project="p", wandb_mode="online"))
    preflight(TrackingConfig(wandb_project="p", wandb_mode="offline"))  # no key needed


def test_wandb_offline_run_id_survives_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "")  # wandb itself rejects an empty mode; the Tracker must not
    cfg = TrackingConfig(wandb_project="vtt-test", wandb_mode="offline")
    t = Tracker(cfg, tmp_path, rank=0, config={"a": 1})
    t.log({"step": 1, "loss": 2.0, "lr": float("nan")})
    t.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    t = Tracker(cfg, tmp_path, rank=0, config={"a": 1}, resume_step=1)
    t.log({"step": 2, "loss": 1.5})
    t.close()
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.0, "lr": None}, {"step": 2, "loss": 1.5}]
    assert Tracker(cfg, tmp_path / "r1", rank=1, config={}).wandb_run is None  # only global rank 0 logs


def test_help_lists_the_flags():
    from click.testing import CliRunner
    out = CliRunner().invoke(main, ["--help"]).output
    for flag in ("--model", "--shards", "--output-dir", "--config", "--deepspeed", "--max-steps", "--save-every",
                 "--resume", "--preset", "--num-gpus", "--wandb-project", "--wandb-mode", "--set"):
        assert flag in out


# ------------------------------------------------------------------ errors before training (no DeepSpeed engine)

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from vtt.trainer.models.presets import build_tiny
    root = tmp_path_factory.mktemp("models")
    return {k: str(build_tiny(k, root / k)) for k in ("llava", "seq2seq")}


@pytest.fixture
def world1(monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)


def prepare(tmp_path, tiny_models, kind="llava", shards=None, **sections):
    from vtt.trainer.run import loop
    from vtt.trainer.models.registry import get_adapter
    from vtt.trainer.config import config_from_dict, merge
    tree = merge({"model": {"kind": kind, "model_path": tiny_models[kind]},
                  "data": {"shards": str(shards or tmp_path / "shards")},
                  "run": {"output_dir": str(tmp_path / "run"), "max_steps": 2},
                  "deepspeed": {"micro_batch_size": 2}}, sections)
    cfg = config_from_dict(tree)
    adapter = get_adapter(cfg.model)
    return loop.prepare(loop.data_config_for(cfg, adapter), loop.dist_env(), adapter)


def test_prepare_accepts_good_data(tmp_path, tiny_models, world1):
    shards = make_train_shards(tmp_path / "shards", n=8, per_shard=4)
    plan = prepare(tmp_path, tiny_models, "seq2seq", shards, model={"src_lang": "eng_Latn"})
    # bf16 full fine-tune on one process: torch autocast over fp32 weights, ZeRO-0, buffers left fp32
    assert plan.total_steps == 2 and plan.resolved.autocast and plan.cfg.deepspeed.autocast is True
    assert plan.ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "data_types" not in plan.ds
    assert plan.ds["bf16"] == {"enabled": False} and plan.ds["zero_optimization"] == {"stage": 0}
    assert plan.cfg.data.decode_frames is False  # text-only model: frames never decoded
    plan = prepare(tmp_path, tiny_models, "seq2seq", shards, model={"src_lang": "eng_Latn"},
                   deepspeed={"autocast": False})  # DeepSpeed's bf16: M2M100's buffers cast, BF16_Optimizer
    assert plan.ds["data_types"] == {"buffer_dtype": "bf16", "grad_accum_dtype": "fp32"} and not plan.resolved.autocast
    lora = prepare(tmp_path, tiny_models, "llava", shards, model={"lora": True})
    assert not lora.resolved.autocast and lora.resolved.zero_stage == 1 and "torch_autocast" not in lora.ds


def test_autocast_chosen_per_case(tmp_path):
    """bf16 by torch autocast: the default for a full fine-tune on one process (bench_ops: BF16_Optimizer's
    per-tensor kernels); LoRA, several processes, offload, a ZeRO stage asked for or a JSON of one's own keep
    DeepSpeed's bf16; contradictions stop before training."""
    def resolve(world=1, full=True, ext=None, **s):
        return dsc.resolve(DeepSpeedSettings(**s), world_size=world, ext=ext, full_finetune=full)
    r = resolve()
    assert r.autocast and r.zero_stage == 0 and r.precision == "bf16"
    for case in (resolve(full=False), resolve(world=2), resolve(offload_optimizer=True), resolve(zero_stage=1),
                 resolve(precision="fp32"), resolve(ext={"bf16": {"enabled": True}}), resolve(autocast=False)):
        assert not case.autocast and (case.zero_stage, case.precision) != (0, "bf16")
    assert resolve(full=False, autocast=True).autocast  # asked for: LoRA too
    ds = dsc.generate(r, DeepSpeedSettings(), OptimConfig(), 1024, cast_buffers=True, device="cuda")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and ds["bf16"] == {"enabled": False}
    assert "data_types" not in ds and ds["optimizer"]["params"]["fused"] is True
    for bad in ({"precision": "fp32"}, {"zero_stage": 2}, {"offload_optimizer": True}):
        with pytest.raises(ConfigError, match="deepspeed.autocast"):
            DeepSpeedSettings(autocast=True, **bad)
    ext = tmp_path / "ds.json"
    ext.write_text('{"train_micro_batch_size_per_gpu": 2}')
    with pytest.raises(dsc.DeepSpeedConfigError, match="torch_autocast"):
        resolve(ext={}, autocast=True, config_file=str(ext))


def test_epochs_from_index_counts(tmp_path, tiny_models, world1):
    shards = make_train_shards(tmp_path / "shards", n=20, per_shard=8)
    plan = prepare(tmp_path, tiny_models, "llava", shards, run={"max_steps": None, "epochs": 1.5},
                   deepspeed={"micro_batch_size": 3, "grad_accum": 2})
    assert plan.micro_per_epoch == 6 and plan.total_steps == 5  # 20 // 3 = 6 micro batches; ceil(1.5 * 6 / 2)
    with pytest.raises(dsc.DeepSpeedConfigError, match="fewer than gradient accumulation 8"):
        prepare(tmp_path, tiny_models, "llava", shards, deepspeed={"micro_batch_size": 3, "grad_accum": 8})


def test_missing_and_empty_shards_folder(tmp_path, tiny_models, world1):
    from vtt.shards.format import ShardFormatError
    with pytest.raises(ShardFormatError, match="does not exist"):
        prepare(tmp_path, tiny_models, shards=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardFormatError, match="no index"):
        prepare(tmp_path, tiny_models, shards=tmp_path / "empty")


def test_index_that_disagrees_with_tars(tmp_path, tiny_models, world1):
    from vtt.shards.format import ShardFormatError
    shards = make_train_shards(tmp_path / "shards", n=8, per_shard=4)
    with open(shards / "shard-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    (shards / "shard-000000.tar").unlink()
    with pytest.raises(ShardFormatError, match=r"disagrees with the tars(.|\n)*000000\.tar: listed in index\.json "
                                               r"but missing(.|\n)*000001\.tar: \d+ bytes on disk"):
        prepare(tmp_path, tiny_models, shards=shards)


def test_model_that_does_not_match_the_data(tmp_path, tiny_models, world1):
    from vtt.shards.conversation import SampleError
    shards = make_train_shards(tmp_path / "shards", n=8, per_shard=4)
    with pytest.raises(SampleError, match=r"needs field 'description_fr', which the sample lacks"):
        prepare(tmp_path, tiny_models, "seq2seq", shards, model={"target_template": "{description_fr}"})
    with pytest.raises(SampleError, match=r"needs field 'summary'"):
        prepare(tmp_path, tiny_models, "llava", shards, model={"target_template": "{summary}"})


def test_seed_deepspeed_json_vs_flags(tmp_path, tiny_models, world1):
    shards = make_train_shards(tmp_path / "shards", n=24, per_shard=8)
    with pytest.raises(dsc.DeepSpeedConfigError, match="train_micro_batch_size_per_gpu=4 but the vtt settings say 2"):
        prepare(tmp_path, tiny_models, shards=shards, deepspeed={"config_file": str(CONFIGS / "ds_config.json")})
    plan = prepare(tmp_path, tiny_models, shards=shards,
                   deepspeed={"config_file": str(CONFIGS / "ds_config.json"), "micro_batch_size": None})
    assert plan.resolved.global_batch == 8 and plan.cfg.deepspeed.grad_accum == 2


def test_cli_reports_errors_in_one_line(tmp_path):
    from click.testing import CliRunner
    res = CliRunner().invoke(main, ["--model", "llava", "--preset", "tiny", "--shards", str(tmp_path / "none"),
                                    "--output-dir", str(tmp_path / "run"), "--max-steps", "1"],
                             env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert res.exit_code == 2, res.output  # a path on the command line that is not there: before any work
    assert "vtt-train: error:" in res.output and "shards folder does not exist" in res.output
    res = CliRunner().invoke(main, ["--model", "llava", "--shards", "S", "--output-dir", str(tmp_path),
                                    "--set", "run.max_step=3"])
    assert res.exit_code == 2 and "unknown key(s) run.max_step" in res.output


@pytest.mark.parametrize("name,stage", [("ds_config.json", 2), ("ds_zero3.json", 3), ("ds_zero2_offload.json", 2)])
def test_every_shipped_deepspeed_json_fills_completely(name, stage):
    s = DeepSpeedSettings(config_file=str(CONFIGS / name), micro_batch_size=None if name == "ds_config.json" else 2)
    cfg = dsc.build(s, OptimConfig(), 8, hidden_size=4096, cast_buffers=False, total_steps=1000,
                    bf16_supported=True, device="cuda")
    assert dsc.remaining_auto(cfg) == [] and cfg["zero_optimization"]["stage"] == stage
    assert cfg["bf16"]["enabled"] is True and cfg["optimizer"]["params"]["torch_adam"] is True
    if "offload" in name:
        assert cfg["zero_force_ds_cpu_optimizer"] is False


def test_conversation_flags_map_onto_model_config(tmp_path):
    from click.testing import CliRunner
    args = ["--model", "llava", "--preset", "tiny", "--shards", "S", "--output-dir", str(tmp_path), "--print-config"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    assert "mask_history: false" in plain.output
    res = CliRunner().invoke(main, args + ["--mask-history", "--max-length", "512"])
    assert res.exit_code == 0, res.output
    assert "mask_history: true" in res.output and "max_length: 512" in res.output
