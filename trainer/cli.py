"""`vtt-train`: flags -> TrainConfig -> loop.train(). `--num-gpus N` re-runs this command under the
deepspeed launcher; under `deepspeed`, `torchrun` or MPI each process runs it as is."""
from __future__ import annotations

import faulthandler
import os
import shlex
import subprocess
import sys
from pathlib import Path

import click

# Flags -> (section, field). Every flag left out (None) keeps the YAML/default value.
FLAG_FIELDS = {
    "kind": ("model", "kind"), "model_path": ("model", "model_path"), "lora": ("model", "lora"),
    "num_frames": ("data", "num_frames"), "frame_sampling": ("data", "frame_sampling"),
    "video_tokens": ("data", "video_tokens"), "device_memory": ("deepspeed", "device_memory_gb"),
    "gradient_checkpointing": ("model", "gradient_checkpointing"),
    "mask_history": ("model", "mask_history"), "max_length": ("model", "max_length"),
    "shards": ("data", "shards"), "eval_shards": ("data", "eval_shards"),
    "eval_fraction": ("data", "eval_fraction"), "num_workers": ("data", "num_workers"),
    "data_seed": ("data", "seed"), "on_corrupt": ("data", "on_corrupt"),
    "interleave_shards": ("data", "interleave_shards"), "data_resume": ("data", "resume"),
    "packing": ("data", "packing"),
    "lr": ("optim", "lr"), "warmup_steps": ("optim", "warmup_steps"), "weight_decay": ("optim", "weight_decay"),
    "grad_clip": ("optim", "grad_clip"),
    "ds_file": ("deepspeed", "config_file"), "zero_stage": ("deepspeed", "zero_stage"),
    "precision": ("deepspeed", "precision"), "micro_batch": ("deepspeed", "micro_batch_size"),
    "grad_accum": ("deepspeed", "grad_accum"), "offload_optimizer": ("deepspeed", "offload_optimizer"),
    "output_dir": ("run", "output_dir"), "max_steps": ("run", "max_steps"), "epochs": ("run", "epochs"),
    "save_every": ("run", "save_every"), "keep_last": ("run", "keep_last"), "eval_every": ("run", "eval_every"),
    "log_every": ("run", "log_every"), "seed": ("run", "seed"), "resume": ("run", "resume"),
    "preset": ("run", "preset"), "export": ("run", "export"), "eval_generate": ("run", "eval_generate"),
    "keep_best": ("run", "keep_best"),
    "wandb_project": ("tracking", "wandb_project"), "wandb_mode": ("tracking", "wandb_mode"),
}
LAUNCH_FLAGS = ("--num-gpus", "--num-nodes", "--hostfile", "--master-port")


def overrides_from_flags(flags: dict, sets: tuple[str, ...]) -> dict:
    from vtt.trainer.config import merge, parse_set
    tree: dict = {}
    for name, value in flags.items():
        if value is not None and name in FLAG_FIELDS:
            section, key = FLAG_FIELDS[name]
            tree.setdefault(section, {})[key] = value
    if flags.get("storage_options"):  # --storage-option key=value, repeatable
        from vtt.shards.storage import parse_options
        tree.setdefault("data", {})["storage_options"] = parse_options(flags["storage_options"])
    run = tree.get("run", {})
    if "max_steps" in run and "epochs" not in run:  # a flag replaces the YAML's length, whichever kind
        run["epochs"] = None
    elif "epochs" in run and "max_steps" not in run:
        run["max_steps"] = None
    return merge(tree, parse_set(sets))  # --set wins: it is the most specific


def launcher_command(argv: list[str], num_gpus: int, num_nodes: int | None, hostfile: str | None,
                     master_port: int | None) -> list[str]:
    """This same command under `deepspeed` (python -m deepspeed.launcher.runner), launch flags removed."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in a
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus)]
    if num_nodes:
        cmd += ["--num_nodes", str(num_nodes)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if not master_port and not hostfile and not num_nodes:
        from vtt.trainer.dist import free_port
        master_port = free_port()  # one machine: the launcher's fixed 29500 collides with any other run
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + ["--module", "vtt.trainer.cli", *rest]


HELP = """Train a LLaVA-family video model or a seq2seq (NLLB/M2M100) model on vtt shards with DeepSpeed.

\b
Examples:
  vtt-train --model llava --preset tiny --shards SHARDS --output-dir RUN --max-steps 50
  vtt-train --config configs/llava.yaml --shards SHARDS --output-dir RUN --deepspeed configs/ds_config.json
  vtt-train ... --num-gpus 4            # re-runs itself under the deepspeed launcher
  deepspeed --num_gpus 8 --module vtt.trainer.cli ...   /   torchrun --nproc_per_node 8 -m vtt.trainer.cli ...

Settings: dataclass defaults < --config YAML < flags < --set section.field=value (any field, e.g.
--set model.lora_r=64). RUN gets config.yaml and ds_config.json (what was actually used), metrics.jsonl,
train.log, checkpoints/ and final/ (the exported Hugging Face model).

Templates: model.target_template and model.source_template both default to {description}, so --model seq2seq
without a --config learns to copy the description; set the target to another sidecar field to translate
(configs/seq2seq.yaml: {description_fr}; or --set model.target_template={description_fr}).

Exit status: 0 done; 1 a vtt error (one line on stderr); 2 bad flags or settings, an --output-dir or shards
folder that cannot be used, or a shards URL that cannot be reached (checked before any work).
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", "kind", type=click.Choice(["llava", "seq2seq", "qwen_vl"]), help="Model kind.")
@click.option("--model-path", help="Hub id (from the local cache) or checkpoint folder.")
@click.option("--preset", type=click.Choice(["tiny"]), help="Build a random tiny model into RUN/preset-<model> "
              "and train it (overrides --model-path).")
@click.option("--shards", help="Shards folder written by vtt-prep (index.json + tars): a path or a URL "
              "(s3://bucket/prefix needs the s3 extra; gs:// etc. with their fsspec filesystem installed).")
@click.option("--eval-shards", help="Held-out shards folder (path or URL) for the eval loss.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option for URL folders, repeatable (endpoint_url=..., profile=..., anon=true, "
              "client_kwargs.region_name=...); credentials otherwise come from AWS_* variables, profiles, roles.")
@click.option("--eval-fraction", type=float, help="Or: hold out this fraction of keys of --shards.")
@click.option("--output-dir", "-o", help="Run folder (configs, logs, checkpoints, final model).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with the sections "
              "model/data/optim/deepspeed/run/tracking (see configs/llava.yaml).")
@click.option("--deepspeed", "ds_file", type=click.Path(dir_okay=False), help="External DeepSpeed JSON; "
              "\"auto\" values are filled from the settings. Default: generated from the settings.")
@click.option("--zero-stage", type=click.IntRange(0, 3), help="ZeRO stage [default: one process 0 (fp32) or 1 (bf16), several processes 2].")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), help="[default: bf16]; fp32 only when asked.")
@click.option("--micro-batch", callback=lambda c, p, v: v if v in (None, "auto") else int(v) if v.isdigit() else
              _bad(p, v), help="Micro batch per GPU, or auto: the fastest that fits the device (with "
              "--set model.gradient_checkpointing=auto also choosing checkpointing) [default: 4].")
@click.option("--device-memory", type=float, metavar="GB", help="Device memory to plan for where torch.cuda "
              "cannot tell (CPU runs, --plan for another machine).")
@click.option("--plan", "plan", is_flag=True, help="Print the estimated peak memory per device (weights, "
              "gradients, optimizer, activations with and without checkpointing, video tokens) and exit.")
@click.option("--grad-accum", type=int, help="Gradient accumulation steps [default: 1].")
@click.option("--offload-optimizer/--no-offload-optimizer", default=None, help="ZeRO-Offload optimizer to CPU.")
@click.option("--lr", type=float, help="Peak learning rate [default: 1e-4].")
@click.option("--warmup-steps", type=int, help="Linear warmup steps [default: 3% of the steps].")
@click.option("--weight-decay", type=float)
@click.option("--grad-clip", type=float, help="Max grad norm, 0 = off [default: 1.0].")
@click.option("--max-steps", type=int, help="Optimizer steps [default: --epochs 1 from the index counts].")
@click.option("--epochs", type=float)
@click.option("--save-every", type=int, help="Checkpoint every N steps [default: 500]; also one at the end (--set run.save_final=false: none).")
@click.option("--keep-last", type=int, help="Checkpoints kept [default: 2]; 0 = all.")
@click.option("--eval-every", type=int, help="Eval loss every N steps (needs --eval-shards/--eval-fraction).")
@click.option("--eval-generate/--no-eval-generate", default=None, help="At each eval also answer the eval set "
              "(as vtt-eval: exact match, BLEU, chrF into metrics.jsonl and RUN/eval/step_N/).")
@click.option("--keep-best", type=click.Choice(["eval_loss", "exact_match", "bleu", "chrf"]),
              help="Keep the best checkpoint by this eval metric beside the last --keep-last (checkpoints/best.json).")
@click.option("--log-every", type=int, help="metrics.jsonl line every N steps [default: 10].")
@click.option("--seed", type=int, help="Model/dropout seed [default: 0].")
@click.option("--data-seed", type=int, help="Shard/sample order seed [default: 0].")
@click.option("--resume", is_flag=False, flag_value="latest", default=None,
              help="Resume from RUN's latest checkpoint (bare flag) or from a checkpoint folder.")
@click.option("--lora/--no-lora", default=None, help="LoRA (peft) on the language model.")
@click.option("--num-frames", type=int, help="Frames per sample read from the shards' stored ones, when they "
              "hold more [default: all].")
@click.option("--frame-sampling", type=click.Choice(["uniform", "random"]), help="With --num-frames: evenly "
              "spaced, or drawn per epoch from (data seed, epoch, sample key) [default: uniform].")
@click.option("--video-tokens", type=int, help="Video-token budget per sample: caps --num-frames to the most "
              "frames whose video tokens fit.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--mask-history/--no-mask-history", default=None,
              help="Conversations: loss on the last assistant turn only [default: every assistant turn].")
@click.option("--max-length", type=int, help="Tokens per sample, video included; longer ones are dropped and "
              "counted, or cut (--set model.overflow=truncate_history) [default: the model's positions].")
@click.option("--packing/--no-packing", default=None, help="Padding-free: a micro batch's samples in one row, "
              "attention kept inside each sample (llava, qwen_vl) [default: off].")
@click.option("--num-workers", type=int, help="DataLoader workers per rank [default: 0].")
@click.option("--on-corrupt", type=click.Choice(["skip", "stop"]), help="Corrupt samples [default: skip].")
@click.option("--interleave-shards", type=int, help="Shards each data stream reads at once [default: 4].")
@click.option("--data-resume", type=click.Choice(["exact", "next_epoch"]),
              help="Resume whose epoch cannot continue exactly: refuse, or start the next epoch [default: exact].")
@click.option("--export/--no-export", default=None, help="Write RUN/final [default: on].")
@click.option("--wandb-project", help="W&B project (global rank 0 logs).")
@click.option("--wandb-mode", type=click.Choice(["online", "offline", "disabled"]),
              help="[default: online with --wandb-project, else disabled].")
@click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE", help="Set any config field.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
@click.option("--num-gpus", type=int, help="Start N processes per node with the deepspeed launcher.")
@click.option("--num-nodes", type=int, help="With --num-gpus: nodes from --hostfile.")
@click.option("--hostfile", help="With --num-gpus: deepspeed hostfile for multi-node runs.")
@click.option("--master-port", type=int, help="With --num-gpus: rendezvous port (default: a free one on a single "
              "machine, the launcher's 29500 with --hostfile/--num-nodes).")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, hidden=True)
@click.version_option(package_name="vtt")
def main(config_file, sets, print_config, plan, num_gpus, num_nodes, hostfile, master_port, local_rank, **flags):
    enable_faulthandler()
    if num_gpus:
        cmd = launcher_command(sys.argv[1:], num_gpus, num_nodes, hostfile, master_port)
        click.echo("vtt-train: " + shlex.join(cmd), err=True)
        sys.exit(subprocess.call(cmd))
    from vtt.trainer.config import ConfigError, dump_yaml, load_config
    try:
        cfg = load_config(config_file, overrides_from_flags(flags, sets))
    except (ConfigError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    if not (plan or print_config):
        check_paths(cfg)  # before the planner builds anything: a wrong path costs nothing
    if plan or needs_auto(cfg):
        cfg = resolve_plan(cfg, plan)
    if print_config:
        click.echo(dump_yaml(cfg), nl=False)
        return
    run(cfg, local_rank, created=not Path(cfg.run.output_dir).exists())


def _bad(param, value):
    raise click.BadParameter(f"{value!r} is neither a number nor 'auto'", param=param)


def needs_auto(cfg) -> bool:
    from vtt.trainer.memory import needs_resolution
    return needs_resolution(cfg)


def resolve_plan(cfg, show: bool):
    """`auto` settings made concrete from the memory estimate; --plan prints it and exits 0."""
    from vtt.trainer.config import ConfigError
    from vtt.trainer.memory import PlanError, plan_text, resolve_auto
    from vtt.trainer.plan import ensure_preset
    try:
        ensure_preset(cfg)  # --preset tiny: the model folder the plan reads
        res = resolve_auto(cfg)
    except (ConfigError, PlanError, ValueError) as e:
        click.echo(f"vtt-train: error: {e}", err=True)
        sys.exit(1)
    if show:
        click.echo(plan_text(res))
        sys.exit(0)
    if int(os.environ.get("RANK", 0)) == 0:
        e = res.estimate
        click.echo(f"vtt-train: micro batch {e.micro_batch}, gradient checkpointing "
                   f"{'on' if e.gradient_checkpointing else 'off'}, {e.frames} frames: estimated peak "
                   f"{e.total / 2**30:.1f} GiB per device" + "".join(f"; {x}" for x in res.lines), err=True)
    return res.cfg


def enable_faulthandler() -> None:
    """A rank that crashes in native code prints every thread's Python stack (not when stderr is no file,
    as under click's CliRunner)."""
    try:
        faulthandler.enable()
    except (ValueError, OSError, AttributeError):
        pass


def check_paths(cfg) -> None:
    """The paths on the command line, before anything is imported, built or written (a second, not the model's
    load): the run folder can be made, and every shards folder (path or URL) has a readable index.json (one
    small read each). One line naming the path and the problem, exit status 2."""
    from vtt.shards.format import ShardFormatError
    from vtt.shards.index import read_index
    try:
        check_run_folder(Path(cfg.run.output_dir))
        for folder in dict.fromkeys(f for f in (cfg.data.shards, cfg.data.eval_shards) if f):
            read_index(folder, cfg.data.storage_options)  # StorageError (a URL) is a ShardFormatError
    except (ShardFormatError, NotADirectoryError, PermissionError) as e:
        click.echo(f"vtt-train: error: {e}", err=True)
        sys.exit(2)


def check_run_folder(out: Path) -> None:
    """--output-dir must be a folder (new, or an earlier run's) that this user can write, or be makeable."""
    if out.exists():
        if not out.is_dir():
            raise NotADirectoryError(f"{out}: is a file; --output-dir must be a folder (a new one or an earlier "
                                     "run's)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"{out}: run folder is not writable")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{out}: cannot make the run folder there, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: cannot make the run folder there, {parent} is not writable")


def run(cfg, local_rank: int | None, created: bool = False) -> None:
    """train() with vtt's known errors turned into one clear line and exit status 1. A run folder this command
    created is removed again when the run fails before writing its config (nothing of a run is in it yet;
    one process only: under a launcher the ranks would race)."""
    from vtt.trainer import loop
    try:
        result = loop.train(cfg, local_rank=local_rank)
    except known_errors() as e:
        from vtt.shards.storage import StorageError
        rank = os.environ.get("RANK", "0")
        single = os.environ.get("WORLD_SIZE", "1") == "1"
        click.echo(f"{'vtt-train' if single else f'vtt-train (rank {rank})'}: error: {e}", err=True)
        run_dir = Path(cfg.run.output_dir)
        if created and single and not (run_dir / "config.yaml").exists():
            remove_run_folder(run_dir)
        sys.exit(2 if isinstance(e, StorageError) else 1)
    if int(os.environ.get("RANK", 0)) == 0:
        last = result.losses.get(result.steps)
        click.echo(f"vtt-train: {result.steps} steps in {result.wall_s:.1f}s, final loss "
                   f"{last if last is None else round(last, 4)}; run folder {result.run_dir}"
                   + (f"; model in {result.export_dir}" if result.export_dir else ""), err=True)
    shutdown()
    finish(0)


def remove_run_folder(run_dir: Path) -> None:
    import logging
    import shutil
    vtt_log = logging.getLogger("vtt")
    for h in list(vtt_log.handlers):  # train.log's handler would reopen the file on the next record
        if getattr(h, "_vtt_run", None) == str(run_dir):
            vtt_log.removeHandler(h)
            h.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def known_errors() -> tuple[type[BaseException], ...]:
    from vtt.shards.format import ShardFormatError
    from vtt.trainer.adapters import SampleError
    from vtt.trainer.checkpoint import CheckpointError
    from vtt.trainer.config import ConfigError
    from vtt.trainer.data import CorruptSampleError
    from vtt.trainer.loop import NonFiniteLossError
    from vtt.trainer.tracking import TrackingError
    return (ShardFormatError, SampleError, CheckpointError, ConfigError, CorruptSampleError, NonFiniteLossError,
            TrackingError)


def shutdown() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish(code: int) -> None:
    """End a finished rank's process: flush, then os._exit, skipping the interpreter's finalisation.

    Why: DeepSpeed keeps references to its process groups (engine, ZeRO optimizer, deepspeed.comm), so
    after destroy_process_group their gloo/NCCL worker threads still run when Python finalises, and
    tearing them down there can abort the process (SIGABRT, "terminate called without an active
    exception"; seen in CI once, a two-rank ZeRO-3 resume, the launcher then exits 250): a complete run
    reported as a failed job. Nothing left matters by now: checkpoints, metrics, the export and W&B are
    closed before train() returns, and the log handlers and std streams are flushed here."""
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
