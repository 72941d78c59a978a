"""PrepConfig (extract) and CompactConfig: every vtt-prep setting, its flag and default, validated without I/O;
`preflight` checks what they need of the file system and the network."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import click
from vtt.shards.folder import OutFolder
from vtt.shards.ledger import has_ledger
from vtt.shards.settings import ConfigError, setting
from vtt.shards.storage import StorageError, is_url, parse_options

from .annotations import check_annotation_file
from .discover_remote import check_data_url
from .engine import ENGINES
from .frames import FrameSpec

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class KeepURL:
    """Mixed into a click.Path type: a URL (s3://bucket/videos, any fsspec scheme) is kept as a string, since
    Path would fold its '//'; anything else is converted as the path type does."""

    def convert(self, value, param, ctx):
        return str(value) if is_url(value) else super().convert(value, param, ctx)


class AnnotationFile(KeepURL, click.Path):
    """An annotation file: a local path, or a URL kept as a string."""


def local_folder(value, what: str) -> Path:
    """`value` as a local Path, for the folders that must be local (sample-data's output); Path("s3://b/p")
    would silently become a local folder "s3:/b/p"."""
    if is_url(value):
        raise ConfigError(f"{value}: {what} must be a local folder")
    return Path(value)


def folder(value) -> Path | str:
    """A folder setting: a local Path, or a URL string without its trailing slash (s3://bucket/prefix)."""
    return str(value).rstrip("/") if is_url(value) else Path(value)


def storage_dict(pairs: tuple[str, ...]) -> dict:
    """The fsspec storage options of `--storage-option key=value` pairs; a malformed pair is a ConfigError."""
    try:
        return parse_options(pairs)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_out_folder(out, options: dict, check: bool = False):
    """The shards folder as an OutFolder. With `check`, before any work: a local path that is a file, or a
    URL that cannot be reached (scheme, bucket, credentials, endpoint: a few requests), is a ConfigError
    naming it."""
    if not is_url(out):
        _check_local_out(out)
    try:
        result = OutFolder(out, options)
        if check:
            result.check()
        return result
    except StorageError as e:
        raise ConfigError(str(e)) from e


def _check_local_out(out: Path) -> None:
    """A local shards folder that is, or would be made below, a file is a ConfigError (a stat per level;
    whether it can be written is found out by creating it, OutFolder.prepare)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"shards folder {out} exists and is not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"shards folder {out}: {parent} is a file, not a folder")
            return


def usable_cpus() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_bytes(value: str | int) -> int:
    """'1GB', '500MB', '64MiB', '1000' -> bytes (decimal units as disk vendors and `ls -h --si`)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value).upper())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ConfigError(f"shard size {value!r}: expected bytes like 1000, 500MB, 1GB or 64MiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def parse_size(value: str | int | tuple) -> tuple[int, int]:
    """'336' -> (336, 336); '640x360' -> (640, 360) as (width, height)."""
    if isinstance(value, tuple):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(value))
    if not m:
        raise ConfigError(f"size {value!r}: expected N or WxH, e.g. 336 or 640x360")
    w = int(m.group(1))
    return (w, int(m.group(2)) if m.group(2) else w)


SHARD_SIZE = 10**9
SHARD_MAX_SAMPLES = 10_000
# Retired shards (replaced by a rewrite, compact or rebuild) stay on disk this long for trainers that
# still read an older index.json; the next extract/compact after that deletes them. 0: at once.
RETENTION_HOURS = 72.0


def check_retention(hours: float) -> None:
    if not hours >= 0:
        raise ConfigError(f"retention_hours {hours}: must be >= 0 (0 deletes replaced shards at once)")


def check_shard_limits(shard_size: int, shard_max_samples: int) -> None:
    if shard_size < 4096:
        raise ConfigError(f"shard_size {shard_size}: must be at least 4096 bytes")
    if shard_max_samples < 1:
        raise ConfigError(f"shard_max_samples {shard_max_samples}: must be >= 1")


def check_engine(engine: str, ray_address: str | None) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if ray_address is not None and engine != "ray":
        raise ConfigError(f"--ray-address {ray_address}: needs --engine ray")
    if ray_address is not None and not re.fullmatch(r"auto|(ray://)?[^\s:/]+:\d{1,5}", ray_address):
        raise ConfigError(f"ray address {ray_address!r}: expected auto, HOST:PORT (the head's GCS port, "
                          f"6379 by default) or ray://HOST:10001 (Ray Client)")


# The extraction settings (the flags that decide the frames): a rerun takes those not given from the
# shards folder (PrepConfig.from_folder); a given one that contradicts it is refused (settings_conflict).
EXTRACTION_SETTINGS = ("num_frames", "fps", "max_frames", "size", "resize", "image_format", "jpeg_quality",
                       "short_clip", "pick")


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(name: str, value) -> str:
    """`--size 64x64`, `--num-frames 4`: a setting as the flag that asks for it."""
    if name == "size":
        w, h = value
        value = w if w == h else f"{w}x{h}"
    return f"{flag_of(name)} {value:g}" if isinstance(value, float) else f"{flag_of(name)} {value}"


def settings_conflict(folder: dict, wanted: dict) -> str:
    """One line naming each setting where the shards folder's settings (`folder`) and this run's (`wanted`)
    differ, with both values, and the two ways on (leave the flags out, or --rebuild)."""
    keys = [k for k in EXTRACTION_SETTINGS if folder.get(k) != wanted.get(k)]
    keys += sorted(k for k in set(folder) | set(wanted) if k not in EXTRACTION_SETTINGS and folder.get(k) != wanted.get(k))
    side = lambda d: ", ".join(shown(k, d[k]) for k in keys if d.get(k) is not None) or "other settings"  # noqa: E731
    return (f"the shards folder was made with {side(folder)}; this run asks for {side(wanted)}: leave those "
            f"flags out to keep the folder's settings, or add --rebuild to re-extract every video with the new ones")


def _bytes_text(n: int) -> str:
    """10**9 -> '1GB' (the largest decimal unit that divides it), as --shard-size is typed."""
    for unit in ("TB", "GB", "MB", "KB"):
        if n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


def _size_text(size: tuple[int, int]) -> str:
    return shown("size", size).partition(" ")[2]


# The flags both extract and compact take: one declaration each (a function, as a dataclass field is one
# class's own).
def shard_size_setting():
    return setting(SHARD_SIZE, "--shard-size", "Max bytes per shard (1GB, 500MB, 64MiB).", type=str,
                   show=_bytes_text)


def shard_max_samples_setting():
    return setting(SHARD_MAX_SAMPLES, "--shard-max-samples", "Max samples per shard.")


def retention_setting():
    return setting(RETENTION_HOURS, "--retention-hours",
                   "Shards replaced by a rewrite, compact or rebuild stay on disk (listed as retired in the ledger, "
                   "not in index.json) for trainers still reading an older index; a later extract/compact deletes "
                   "those retired longer ago than this. 0 deletes them at once.")


def storage_options_setting():
    # `--storage-option key=value` pairs: fsspec options for every URL folder of the run
    return setting((), "--storage-option", dest="storage_options", multiple=True, metavar="KEY=VALUE",
                   help="fsspec storage option for a URL folder (repeatable), e.g. endpoint_url=http://host:9000, "
                        "key=..., secret=..., client_kwargs.region_name=eu-west-1; credentials and endpoint also "
                        "come from AWS_* variables (AWS_ENDPOINT_URL), profiles and instance roles.")


def break_lock_setting():
    return setting(False, "--break-lock",
                   "A URL shards folder only: take over the lock of a run that died (its heartbeat is older than "
                   "2 minutes). A live run's lock is never taken. Local folders need no such flag: their lock "
                   "goes away with its process.", is_flag=True)


def dry_run_setting(what: str):
    return setting(False, "--dry-run", what, is_flag=True)


@dataclass(frozen=True)
class PrepConfig:
    """Every `vtt-prep extract` setting, validated without I/O (preflight() checks what needs the world).
    Each field with a flag declares it here: name, help and the default `vtt-prep extract --help` shows."""
    data_dir: Path                              # or a URL string (s3://bucket/videos, any fsspec scheme)
    out_dir: Path                               # or a URL string (s3://bucket/shards)
    num_frames: int = setting(8, "--num-frames", "Frames per video, uniformly spaced over its real duration.")
    fps: float | None = setting(None, "--fps", "Fixed-rate mode: frames per second (overrides --num-frames).",
                                default_text="none")
    max_frames: int = setting(64, "--max-frames", "Cap on frames in --fps mode.")
    size: tuple[int, int] = setting((336, 336), "--size", "Frame size: N (square) or WxH.", type=str,
                                    show=_size_text)  # (width, height)
    resize: str = setting("crop", "--resize", type=click.Choice(["crop", "pad", "stretch"]))
    image_format: str = setting("jpg", "--image-format", type=click.Choice(["jpg", "png"]))
    jpeg_quality: int = setting(90, "--jpeg-quality", type=click.IntRange(1, 100))
    short_clip: str = setting("repeat", "--short-clip", "Clips with fewer frames than requested: repeat frames "
                              "(with a warning) or fail.", type=click.Choice(["repeat", "fail"]))
    pick: str = setting("fast", "--pick", "on_screen: the frame displayed at each target time. fast: that frame or "
                        "the next one (within one frame), whichever lets the decoder skip non-reference frames "
                        "(~1.5x less decoding).", type=click.Choice(["fast", "on_screen"]))
    shard_size: int = shard_size_setting()      # bytes per tar, cut before a sample would exceed it
    shard_max_samples: int = shard_max_samples_setting()
    workers: int = setting(default_factory=usable_cpus, name="--workers", help="Worker processes.",
                           default_text="all cores")
    timeout: float = setting(120.0, "--timeout", "Seconds per ffmpeg/ffprobe call.")
    video_timeout: float = setting(600.0, "--video-timeout", "Seconds for all of one video's ffmpeg/ffprobe calls "
                                   "together; past it the video fails with error class video_timeout.")
    ffmpeg: str = setting(default_factory=lambda: os.environ.get("VTT_FFMPEG") or "ffmpeg", name="--ffmpeg",
                          help="ffmpeg binary.", default_text="$VTT_FFMPEG or ffmpeg on PATH")
    ffprobe: str = setting(default_factory=lambda: os.environ.get("VTT_FFPROBE") or "ffprobe", name="--ffprobe",
                           help="ffprobe binary.", default_text="$VTT_FFPROBE or ffprobe on PATH")
    allow_missing_sidecar: bool = setting(False, "--allow-missing-sidecar",
                                          "Accept videos without sidecar (id from the path).", is_flag=True)
    # annotation files (JSON list, JSONL, CSV/TSV): entries, not sidecars
    annotations: tuple = setting((), "--annotations", multiple=True, type=AnnotationFile(dir_okay=False,
                                 path_type=Path), help="Annotation file (JSON list, JSONL, CSV/TSV; repeatable; a "
                                 "local file or a URL such as s3://bucket/ann.jsonl): one sample per entry instead "
                                 "of sidecars; video paths relative to DATA_DIR (a local folder or a URL).")
    storage_options: tuple[str, ...] = storage_options_setting()
    break_lock: bool = break_lock_setting()     # take over a URL folder's lock whose heartbeat went stale
    video_column: str = setting("video", "--video-column", "CSV/TSV annotations: the video column.")
    caption_column: str = setting("caption", "--caption-column",
                                  "CSV/TSV annotations: the caption column (the sample's description).")
    rebuild: bool = setting(False, "--rebuild", "Re-extract everything (needed when settings changed); the old "
                            "shards stay valid until the new set is complete.", is_flag=True)
    retry_failed: bool = setting(False, "--retry-failed", "Retry earlier failures even when neither file, sidecar, "
                                 "settings, ffmpeg nor a larger timeout gives a reason to.", is_flag=True)
    retention_hours: float = retention_setting()
    dry_run: bool = dry_run_setting("Print the plan (new/changed/deleted/unchanged/failed); touch nothing.")
    quiet: bool = setting(False, "--quiet", "No progress bar.", short="-q", is_flag=True)
    engine: str = setting("local", "--engine", "Where the per-video work runs: worker processes here, or Ray tasks "
                          "on a Ray cluster (pip install -e .[ray]); the shards are the same bytes either way.",
                          type=click.Choice(["local", "ray"]))
    ray_address: str | None = setting(None, "--ray-address", "--engine ray: auto (the cluster `ray start` runs "
                                      "here), HOST:6379 or ray://HOST:10001.",
                                      default_text="start a local Ray with --workers CPUs")
    # the EXTRACTION_SETTINGS the user gave (flags); on a rerun the others come from the shards folder.
    # None: every one is as given (a config built in code means what it says)
    given: frozenset | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - normalising a frozen field
        if self.given is not None:
            set_("given", frozenset(self.given))
            if not self.given <= set(EXTRACTION_SETTINGS):
                raise ConfigError(f"given: not extraction settings: {sorted(self.given - set(EXTRACTION_SETTINGS))}")
        set_("storage_options", tuple(self.storage_options))
        self.storage()  # a malformed pair fails here
        set_("data_dir", folder(self.data_dir))
        set_("out_dir", folder(self.out_dir))
        set_("size", parse_size(self.size))
        set_("shard_size", parse_bytes(self.shard_size))
        set_("annotations", tuple(str(p).rstrip("/") if is_url(p) else Path(p) for p in self.annotations))
        check_shard_limits(self.shard_size, self.shard_max_samples)
        if self.workers < 1:
            raise ConfigError(f"workers {self.workers}: must be >= 1")
        if self.timeout <= 0:
            raise ConfigError(f"timeout {self.timeout}: must be > 0 seconds")
        if not self.video_timeout > 0:
            raise ConfigError(f"video_timeout {self.video_timeout}: must be > 0 seconds")
        check_retention(self.retention_hours)
        check_engine(self.engine, self.ray_address)
        self.frame_spec()  # FrameSpec validates the extraction settings; fail here, not in a worker

    def storage(self) -> dict:
        return storage_dict(self.storage_options)

    def out_folder(self, check: bool = False):
        """The shards folder as a shards/folder.py OutFolder (with the storage options); `check`: see
        check_out_folder."""
        return check_out_folder(self.out_dir, self.storage(), check=check)

    def check_data_url(self) -> None:
        """A URL data folder that cannot be listed, or a URL annotation file that is not there, is a
        ConfigError naming it (network: a few requests each)."""
        if is_url(self.data_dir):
            try:
                check_data_url(self.data_dir, self.storage())
            except StorageError as e:
                raise ConfigError(str(e)) from e
        for p in self.annotations:
            if is_url(p):
                check_annotation_file(p, self.storage())

    def frame_spec(self):
        try:
            return FrameSpec(num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames,
                             size=self.size, resize=self.resize, image_format=self.image_format,
                             jpeg_quality=self.jpeg_quality, timeout_s=self.timeout,
                             video_timeout_s=self.video_timeout, ffmpeg=self.ffmpeg,
                             ffprobe=self.ffprobe, short_clip=self.short_clip, pick=self.pick)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from e

    def from_folder(self, folder: dict) -> "PrepConfig":
        """This config with every extraction setting the user did not give taken from `folder` (the
        settings the shards folder was made with), so a rerun needs no flags again. A given --num-frames
        counts as asking for its mode (no --fps). No I/O: the taken values are validated by FrameSpec."""
        if not folder or self.given is None:
            return self
        given = self.given | ({"fps"} if "num_frames" in self.given else set())
        take = {k: tuple(v) if k == "size" else v for k, v in folder.items()
                if k in EXTRACTION_SETTINGS and k not in given}
        take = {k: v for k, v in take.items() if getattr(self, k) != v}
        return dataclasses.replace(self, **take) if take else self

    def output_settings(self) -> dict:
        """The settings that decide sample content (FrameSpec's own list): stored in ledger/index/meta."""
        return self.frame_spec().settings()

    def settings_hash(self) -> str:
        blob = json.dumps(self.output_settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class CompactConfig:
    """`vtt-prep compact`: merge the shards below `min_fill` of both limits into full ones."""
    out_dir: Path                               # or a URL string (s3://bucket/shards)
    shard_size: int = shard_size_setting()
    shard_max_samples: int = shard_max_samples_setting()
    retention_hours: float = retention_setting()
    storage_options: tuple[str, ...] = storage_options_setting()
    break_lock: bool = break_lock_setting()
    min_fill: float = setting(0.5, "--min-fill", "Merge the shards holding less than this fraction of both limits.")
    dry_run: bool = dry_run_setting("Print which shards would merge; touch nothing.")

    def __post_init__(self):
        object.__setattr__(self, "out_dir", folder(self.out_dir))
        object.__setattr__(self, "storage_options", tuple(self.storage_options))
        object.__setattr__(self, "shard_size", parse_bytes(self.shard_size))
        self.storage()  # a malformed pair fails here
        check_shard_limits(self.shard_size, self.shard_max_samples)
        if not 0 < self.min_fill <= 1:
            raise ConfigError(f"min_fill {self.min_fill}: must be in (0, 1]")
        check_retention(self.retention_hours)

    def storage(self) -> dict:
        return storage_dict(self.storage_options)

    def out_folder(self, check: bool = False):
        return check_out_folder(self.out_dir, self.storage(), check=check)


def preflight(cfg: PrepConfig) -> None:
    """What `cfg` needs of the world, checked before any work (run_extract calls it first): local annotation
    files and the data folder exist (a stat each), a URL data folder can be listed and URL annotation files
    are there (a few requests each), the shards folder is a folder or can be made, or its URL reachable.
    A problem is a ConfigError naming the path. Last: the checks that talk to the network."""
    for p in cfg.annotations:
        if not is_url(p):
            check_annotation_file(p, {})  # a URL one is checked with the network checks, last
    if not is_url(cfg.data_dir) and not cfg.data_dir.is_dir():
        raise ConfigError(f"data folder {cfg.data_dir} does not exist or is not a folder")
    cfg.check_data_url()
    cfg.out_folder(check=True)


def preflight_compact(cfg: CompactConfig) -> None:
    """The shards folder can be reached (see check_out_folder) and holds a ledger: a ConfigError otherwise."""
    if not has_ledger(cfg.out_folder(check=True)):
        raise ConfigError(f"{cfg.out_dir}: no ledger (_ledger/ or ledger.json): not a vtt-prep shards folder")
