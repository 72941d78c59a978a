"""`vtt-prep`: thin click CLI; each command builds a config and calls one function."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from vtt.shards.format import ShardFormatError

from .config import (EXTRACTION_SETTINGS, RETENTION_HOURS, SHARD_MAX_SAMPLES, CompactConfig, ConfigError, PrepConfig,
                     local_folder, shown)
from .report import EXIT_FAILED_VIDEOS, EXIT_LOCKED, EXIT_OK, EXIT_USAGE

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
        return super().convert(value, param, ctx)


class KeepURL:
    """Mixed into a click.Path type: a URL (s3://bucket/videos, any fsspec scheme) is kept as a string, since
    Path would fold its '//'; anything else is converted as the path type does."""

    def convert(self, value, param, ctx):
        from vtt.shards.storage import is_url
        return str(value) if is_url(value) else super().convert(value, param, ctx)


class DataFolder(KeepURL, LocalFolder):
    """A data or shards folder: a local folder, or a URL kept as a string."""


class AnnotationFile(KeepURL, click.Path):
    """An annotation file: a local path, or a URL kept as a string."""


def _fail(message: str, code: int = EXIT_USAGE):
    click.echo(f"vtt-prep: error: {message}", err=True)
    sys.exit(code)


def default_of(name: str):
    """PrepConfig's default for a setting: the one place defaults live."""
    return PrepConfig.__dataclass_fields__[name].default


def setting(flag: str, **kw):
    """An extraction setting's option: no click default (PrepConfig holds the defaults, shown in --help), so
    a flag the user left out stays unset and a rerun takes it from the shards folder (PrepConfig.given)."""
    name = flag[2:].replace("-", "_")
    default = default_of(name)
    text = "none" if default is None else shown(name, default).partition(" ")[2]
    kw["help"] = f"{kw.get('help', '')}  [default: {text}; a rerun: as the shards were made]".lstrip()
    return click.option(flag, default=None, **kw)


def shard_limits(command):
    """--shard-size and --shard-max-samples, the same for extract and compact."""
    command = click.option("--shard-max-samples", type=int, default=SHARD_MAX_SAMPLES, show_default=True,
                           help="Max samples per shard.")(command)
    return click.option("--shard-size", default="1GB", show_default=True,
                        help="Max bytes per shard (1GB, 500MB, 64MiB).")(command)


def storage_options(command):
    """--storage-option, the same for every command that takes a URL folder."""
    return click.option(
        "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
        help="fsspec storage option for a URL folder (repeatable), e.g. endpoint_url=http://host:9000, "
             "key=..., secret=..., client_kwargs.region_name=eu-west-1; credentials and endpoint also "
             "come from AWS_* variables (AWS_ENDPOINT_URL), profiles and instance roles.")(command)


def break_lock(command):
    """--break-lock, the same for extract and compact."""
    return click.option(
        "--break-lock", is_flag=True,
        help="A URL shards folder only: take over the lock of a run that died (its heartbeat is older than "
             "2 minutes). A live run's lock is never taken. Local folders need no such flag: their lock "
             "goes away with its process.")(command)


def retention(command):
    """--retention-hours, the same for extract and compact."""
    return click.option("--retention-hours", type=float, default=RETENTION_HOURS, show_default=True,
                        help="Shards replaced by a rewrite, compact or rebuild stay on disk (listed as retired "
                             "in the ledger, not in index.json) for trainers still reading an older index; "
                             "a later extract/compact deletes those retired longer ago than this. "
                             "0 deletes them at once.")(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vtt")
def main():
    """vtt-prep: videos + JSON sidecars -> exact frames (ffmpeg) -> WebDataset tar shards."""


@main.command(epilog=EXIT_CODES)
@click.argument("data_dir", type=DataFolder())
@click.argument("out_dir", type=DataFolder())
@setting("--num-frames", type=int, help="Frames per video, uniformly spaced over its real duration.")
@setting("--fps", type=float, help="Fixed-rate mode: frames per second (overrides --num-frames).")
@setting("--max-frames", type=int, help="Cap on frames in --fps mode.")
@setting("--size", help="Frame size: N (square) or WxH.")
@setting("--resize", type=click.Choice(["crop", "pad", "stretch"]))
@setting("--image-format", type=click.Choice(["jpg", "png"]))
@setting("--jpeg-quality", type=click.IntRange(1, 100))
@setting("--short-clip", type=click.Choice(["repeat", "fail"]),
         help="Clips with fewer frames than requested: repeat frames (with a warning) or fail.")
@setting("--pick", type=click.Choice(["fast", "on_screen"]),
         help="on_screen: the frame displayed at each target time. fast: that frame or the next one "
              "(within one frame), whichever lets the decoder skip non-reference frames (~1.5x less decoding).")
@shard_limits
@click.option("--workers", type=int, default=None, help="Worker processes [default: all cores].")
@click.option("--timeout", type=float, default=default_of("timeout"), show_default=True, help="Seconds per ffmpeg/ffprobe call.")
@click.option("--video-timeout", type=float, default=default_of("video_timeout"), show_default=True,
              help="Seconds for all of one video's ffmpeg/ffprobe calls together; past it the video fails "
                   "with error class video_timeout.")
@click.option("--ffmpeg", default=None, help="ffmpeg binary [default: $VTT_FFMPEG or ffmpeg on PATH].")
@click.option("--ffprobe", default=None, help="ffprobe binary [default: $VTT_FFPROBE or ffprobe on PATH].")
@click.option("--allow-missing-sidecar", is_flag=True, help="Accept videos without sidecar (id from the path).")
@click.option("--annotations", multiple=True, type=AnnotationFile(dir_okay=False, path_type=Path),
              help="Annotation file (JSON list, JSONL, CSV/TSV; repeatable; a local file or a URL such as "
                   "s3://bucket/ann.jsonl): one sample per entry instead of sidecars; video paths relative "
                   "to DATA_DIR (a local folder or a URL).")
@storage_options
@break_lock
@click.option("--video-column", default=default_of("video_column"), show_default=True, help="CSV/TSV annotations: the video column.")
@click.option("--caption-column", default=default_of("caption_column"), show_default=True,
              help="CSV/TSV annotations: the caption column (the sample's description).")
@click.option("--rebuild", is_flag=True, help="Re-extract everything (needed when settings changed); the old "
              "shards stay valid until the new set is complete.")
@click.option("--retry-failed", is_flag=True, help="Retry earlier failures even when neither file, sidecar, "
              "settings, ffmpeg nor a larger timeout gives a reason to.")
@retention
@click.option("--dry-run", is_flag=True, help="Print the plan (new/changed/deleted/unchanged/failed); touch nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default=default_of("engine"), show_default=True,
              help="Where the per-video work runs: worker processes here, or Ray tasks on a Ray cluster "
                   "(pip install -e .[ray]); the shards are the same bytes either way.")
@click.option("--ray-address", default=None, help="--engine ray: auto (the cluster `ray start` runs here), "
              "HOST:6379 or ray://HOST:10001 [default: start a local Ray with --workers CPUs].")
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
    from .run import LockBusy, run_extract
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        cfg = PrepConfig(**kwargs, given=frozenset(k for k in EXTRACTION_SETTINGS if k in kwargs))
        report = run_extract(cfg)
    except LockBusy as e:
        _fail(str(e), EXIT_LOCKED)
    except (ConfigError, ShardFormatError) as e:
        _fail(str(e))
    if cfg.dry_run:
        from .rerun_plan import RerunPlan as Plan
        click.echo(Plan(**report.plan).text())
        return
    click.echo(report.summary())
    sys.exit(report.exit_code)


@main.command()
@click.argument("shards", type=DataFolder())
@shard_limits
@retention
@storage_options
@break_lock
@click.option("--min-fill", type=float, default=0.5, show_default=True,
              help="Merge the shards holding less than this fraction of both limits.")
@click.option("--dry-run", is_flag=True, help="Print which shards would merge; touch nothing.")
def compact(shards, **kwargs):
    """Merge the small shards that incremental runs leave behind into full ones.

    Samples are copied byte for byte into new shard numbers; ledger and index switch to them in one
    commit, then the old files are retired (kept --retention-hours for running trainers; kill -9 at
    any moment loses nothing). Exit 4 if another vtt-prep run holds the folder.
    """
    from .compact import compact_shards
    from .run import LockBusy
    try:
        result = compact_shards(CompactConfig(out_dir=shards, **kwargs))
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
    from .config import storage_dict
    from .verify import status_text
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
    from .config import storage_dict
    from .verify import verify_shards
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
    from .sample_data import make_sample_data  # lazy: only this command needs it
    result = make_sample_data(out, n_train=n_train, n_heldout=n_heldout, seed=seed)
    click.echo(f"sample data in {out}: {len(result.clips)} clips "
               f"(train: {result.train_dir}, heldout: {result.heldout_dir})")


if __name__ == "__main__":
    main()
