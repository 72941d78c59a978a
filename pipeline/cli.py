"""`vtt-prep`: thin click CLI; each command builds a config and calls one function."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from vtt.shards.format import ShardFormatError
from vtt.shards.settings import click_options, flags_of, values_of

from .compact import compact_shards
from .config import EXTRACTION_SETTINGS, CompactConfig, ConfigError, KeepURL, PrepConfig, local_folder, storage_dict
from .report import EXIT_FAILED_VIDEOS, EXIT_LOCKED, EXIT_OK, EXIT_USAGE
from .rerun_plan import RerunPlan
from .run import LockBusy, run_extract
from .sample_data import make_sample_data
from .verify import status_text, verify_shards

EXIT_CODES = f"""\b
Exit status:
  {EXIT_OK}  every video is in the shards (new, changed or unchanged)
  {EXIT_USAGE}  usage or configuration error, or the shards were made with other
     settings (add --rebuild); nothing was changed
  {EXIT_FAILED_VIDEOS}  some videos failed (listed in the summary and report.json);
     everything else was written
  {EXIT_LOCKED}  another vtt-prep run holds the shards folder
"""


class LocalFolder(click.Path):
    """A folder argument; a URL is refused here, before click turns "s3://b/p" into the local Path "s3:/b/p"."""

    def __init__(self):
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        try:
            local_folder(value, param.human_readable_name if param else "the folder")
        except ConfigError as e:
            self.fail(str(e), param, ctx)
        if Path(value).is_file():  # vtt-prep's one line, as for the other folder problems, not click's usage block
            _fail(f"{value}: {param.human_readable_name if param else 'the folder'} is a file, not a folder")
        return super().convert(value, param, ctx)


class DataFolder(KeepURL, LocalFolder):
    """A data or shards folder: a local folder, or a URL kept as a string."""


def _fail(message: str, code: int = EXIT_USAGE):
    click.echo(f"vtt-prep: error: {message}", err=True)
    sys.exit(code)


def rerun_note(field: str) -> str:
    """An extraction setting left out is the shards folder's on a rerun (PrepConfig.given), said in --help."""
    return "; a rerun: as the shards were made" if field in EXTRACTION_SETTINGS else ""


# --storage-option for the commands that only read a folder: PrepConfig's flag, declared once
storage_options = click_options(flags_of(PrepConfig, ("storage_options",)), PrepConfig)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vtt")
def main():
    """vtt-prep: videos + JSON sidecars -> exact frames (ffmpeg) -> WebDataset tar shards."""


@main.command(epilog=EXIT_CODES)
@click.argument("data_dir", type=DataFolder())
@click.argument("out_dir", type=DataFolder())
@click_options(flags_of(PrepConfig), PrepConfig, note=rerun_note)
def extract(**kwargs):
    """Extract frames from the videos under DATA_DIR into WebDataset shards in OUT_DIR.

    DATA_DIR may be a URL (s3://bucket/videos/, any installed fsspec scheme): one listing finds the
    videos and sidecars; each video is downloaded by the worker that extracts it, and an object whose
    size and ETag are unchanged is neither downloaded nor hashed on a rerun. OUT_DIR may be a URL too
    (s3://bucket/shards/): each finished shard is one upload, and the ledger's conditional create is
    the commit point, so kill -9 at any moment loses nothing there either.

    Reruns are incremental: unchanged videos cost no ffmpeg call, new ones go into new shards,
    changed and deleted ones replace/remove their samples, earlier failures are retried when their
    file, sidecar, the settings, ffmpeg or a timeout that stopped them changed (or with --retry-failed).
    Writes shard-NNNNNN.tar, index.json, _ledger/ (the commit log) and report.json.

    A rerun needs no extraction flags again: those left out (--num-frames, --size, ...) are the settings
    the shards folder was made with. A flag that contradicts them is refused (exit 2) unless --rebuild
    is given, which re-extracts every video with the new settings.
    """
    kwargs = values_of(flags_of(PrepConfig), kwargs) | {k: kwargs[k] for k in ("data_dir", "out_dir")}
    try:
        cfg = PrepConfig(**kwargs, given=frozenset(k for k in EXTRACTION_SETTINGS if k in kwargs))
        report = run_extract(cfg)
    except LockBusy as e:
        _fail(str(e), EXIT_LOCKED)
    except (ConfigError, ShardFormatError) as e:
        _fail(str(e))
    if cfg.dry_run:
        click.echo(RerunPlan(**report.plan).text())
        return
    click.echo(report.summary())
    sys.exit(report.exit_code)


@main.command()
@click.argument("shards", type=DataFolder())
@click_options(flags_of(CompactConfig), CompactConfig)
def compact(shards, **kwargs):
    """Merge the small shards that incremental runs leave behind into full ones.

    Samples are copied byte for byte into new shard numbers; ledger and index switch to them in one
    commit, then the old files are retired (kept --retention-hours for running trainers; kill -9 at
    any moment loses nothing). Exit 4 if another vtt-prep run holds the folder.
    """
    try:
        result = compact_shards(CompactConfig(out_dir=shards, **values_of(flags_of(CompactConfig), kwargs)))
    except LockBusy as e:
        _fail(str(e), EXIT_LOCKED)
    except (ConfigError, ShardFormatError) as e:
        _fail(str(e))
    click.echo(result.text())


@main.command()
@click.argument("shards", type=DataFolder())
@storage_options
def status(shards, storage_options):
    """Summarise a shards folder (a path or a URL): index, ledger (ok/failed videos), last run.

    Exit 0 when index and tars agree, 1 if they disagree, 2 when the folder cannot be reached or holds
    no index.json."""
    try:
        text, ok = status_text(shards, storage_dict(storage_options))
    except (ConfigError, ShardFormatError) as e:
        _fail(str(e))
    click.echo(text)
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("shards", type=DataFolder())
@storage_options
def verify(shards, storage_options):
    """Read every shard, check index sizes and checksums and the ledger, decode every frame.

    SHARDS may be a URL (s3://bucket/shards).

    Exit 0 when everything matches, 1 on any problem (each one printed), 2 when the folder cannot be reached
    or is not a shards folder (missing, a file, no index.json).
    """
    try:
        result = verify_shards(shards, storage_dict(storage_options))
    except (ConfigError, ShardFormatError) as e:
        _fail(str(e))
    for p in result.problems:
        click.echo(f"PROBLEM: {p}")
    for r in result.retired:
        click.echo(f"RETIRED: {r}")
    retired = f", {len(result.retired)} retired shards (not in index.json; kept for running trainers)" \
        if result.retired else ""
    click.echo(f"{'OK' if result.ok else 'FAILED'}: {result.shards} shards, {result.samples} samples, "
               f"{result.frames} frames decoded, {len(result.problems)} problems{retired}")
    sys.exit(0 if result.ok else 1)


@main.command("sample-data")
@click.argument("out", type=LocalFolder())
@click.option("--n-train", type=int, default=96, show_default=True)
@click.option("--n-heldout", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def sample_data(out, n_train, n_heldout, seed):
    """Generate synthetic captioned clips (OUT/train, OUT/heldout) with sidecars."""
    result = make_sample_data(out, n_train=n_train, n_heldout=n_heldout, seed=seed)
    click.echo(f"sample data in {out}: {len(result.clips)} clips "
               f"(train: {result.train_dir}, heldout: {result.heldout_dir})")


if __name__ == "__main__":
    main()
