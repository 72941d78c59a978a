"""`vtt-train`: flags -> TrainConfig -> loop.train(). `--num-gpus N` re-runs this command under the
deepspeed launcher; under `deepspeed`, `torchrun` or MPI each process runs it as is."""
from __future__ import annotations

import faulthandler
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
from vtt.shards.conversation import SampleError
from vtt.shards.format import ShardFormatError
from vtt.shards.settings import ConfigError, make_options
from vtt.shards.storage import StorageError

LAUNCH_FLAGS = ("--num-gpus", "--num-nodes", "--hostfile", "--master-port")


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
        # heavy: torch; vtt-train -h stays light
        from vtt.trainer.run.dist import free_port
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


class TrainCommand(click.Command):
    """vtt-train's command: the options of the config fields (vtt.trainer.config.FLAGS) are made when first
    asked for, as reading their fields' types and defaults imports the model and data sections (torch, ~2 s):
    `import vtt.trainer.cli` stays light. They go after --config, in the table's order."""

    def get_params(self, ctx):
        if not getattr(self, "_fields_added", False):
            # heavy: torch; vtt-train -h stays light
            from vtt.trainer.config import FLAGS, TrainConfig
            at = next(i for i, p in enumerate(self.params) if p.name == "config_file") + 1
            self.params[at:at] = make_options(list(FLAGS), TrainConfig)
            self._fields_added = True
        return super().get_params(ctx)


@click.command(cls=TrainCommand, help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with the sections "
              "model/data/optim/deepspeed/run/tracking (see configs/llava.yaml).")
@click.option("--plan", "plan", is_flag=True, help="Print the estimated peak memory per device (weights, "
              "gradients, optimizer, activations with and without checkpointing, video tokens) and exit.")
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
    if num_gpus and (plan or print_config):  # one report, here, for the world the launcher would start
        os.environ["WORLD_SIZE"] = str(num_gpus * (num_nodes or 1))
    elif num_gpus:
        cmd = launcher_command(sys.argv[1:], num_gpus, num_nodes, hostfile, master_port)
        click.echo("vtt-train: " + shlex.join(cmd), err=True)
        sys.exit(subprocess.call(cmd))
    # heavy: torch; vtt-train -h stays light
    from vtt.trainer.config import dump_yaml, load_config, overrides_from_flags, preflight
    try:
        cfg = load_config(config_file, overrides_from_flags(flags, sets))
    except (ConfigError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    try:  # before the planner builds anything: a wrong path costs nothing
        preflight(cfg, paths=not (plan or print_config))
    except ConfigError as e:
        click.echo(f"vtt-train: error: {e}", err=True)
        sys.exit(2)
    if plan or print_config:
        cfg = shown_plan(cfg, plan)
    if print_config:
        click.echo(dump_yaml(cfg), nl=False)
        return
    run(cfg, local_rank, created=not Path(cfg.run.output_dir).exists())


def shown_plan(cfg, show: bool):
    """--plan / --print-config: `auto` settings made concrete from the memory estimate, as a run would make them
    (run/loop.train resolves them itself); --plan prints the estimate and exits 0."""
    # heavy: torch; vtt-train -h stays light
    from vtt.trainer.run.memory import PlanError, needs_resolution, plan_text, resolve_auto
    from vtt.trainer.run.plan import ensure_preset
    if not (show or needs_resolution(cfg)):
        return cfg
    try:
        ensure_preset(cfg)  # --preset tiny: the model folder the plan reads
        res = resolve_auto(cfg)
    except (ConfigError, PlanError, ValueError) as e:
        click.echo(f"vtt-train: error: {e}", err=True)
        sys.exit(1)
    if show:
        click.echo(plan_text(res))
        sys.exit(0)
    return res.cfg


def enable_faulthandler() -> None:
    """A rank that crashes in native code prints every thread's Python stack (not when stderr is no file,
    as under click's CliRunner)."""
    try:
        faulthandler.enable()
    except (ValueError, OSError, AttributeError):
        pass


def run(cfg, local_rank: int | None, created: bool = False) -> None:
    """train() with vtt's known errors turned into one clear line and exit status 1. A run folder this command
    created is removed again when the run fails before writing its config (nothing of a run is in it yet;
    one process only: under a launcher the ranks would race)."""
    # heavy: torch; vtt-train -h stays light
    from vtt.trainer.run import loop
    try:
        result = loop.train(cfg, local_rank=local_rank)
    except known_errors() as e:
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
    vtt_log = logging.getLogger("vtt")
    for h in list(vtt_log.handlers):  # train.log's handler would reopen the file on the next record
        if getattr(h, "_vtt_run", None) == str(run_dir):
            vtt_log.removeHandler(h)
            h.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def known_errors() -> tuple[type[BaseException], ...]:
    # heavy: torch; vtt-train -h stays light
    from vtt.trainer.data.loader import CorruptSampleError
    from vtt.trainer.run.checkpoint import CheckpointError
    from vtt.trainer.run.loop import NonFiniteLossError
    from vtt.trainer.run.memory import PlanError
    from vtt.trainer.run.tracking import TrackingError
    return (ShardFormatError, SampleError, CheckpointError, ConfigError, CorruptSampleError, NonFiniteLossError,
            TrackingError, PlanError)


def shutdown() -> None:
    # heavy: torch; vtt-train -h stays light
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
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def overrides_from_flags(flags: dict, sets: tuple[str, ...]) -> dict:
    """vtt.trainer.config.overrides_from_flags (here for the callers that parse vtt-train's flags themselves)."""
    # heavy: torch; vtt-train -h stays light
    from vtt.trainer.config import overrides_from_flags as overrides
    return overrides(flags, sets)


if __name__ == "__main__":
    main()

