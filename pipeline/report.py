"""What a run did: counts, throughput, time per stage, error classes; report.json and the summary."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vtt.shards.format import REPORT_FILE, atomic_write_bytes

EXIT_OK = 0
EXIT_USAGE = 2          # bad flags, bad config, settings differ from the shards without --rebuild
EXIT_FAILED_VIDEOS = 3  # some videos failed; everything else was written
EXIT_LOCKED = 4         # another vtt-prep run holds the shards folder


@dataclass
class Plan:
    """What a run will do, by source path; `failed` are earlier failures that are tried again."""
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)   # sidecar problems found now (no ffmpeg needed)
    rebuild: bool = False
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        return {k: len(getattr(self, k)) for k in ("new", "changed", "deleted", "unchanged", "failed", "invalid")}

    def text(self) -> str:
        lines = [f"{k:>9}: {v}" for k, v in self.counts().items()]
        for k in ("new", "changed", "deleted", "failed", "invalid"):
            lines += [f"  {k} {s}" for s in getattr(self, k)[:50]]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass
class Report:
    data_dir: str
    out_dir: str
    plan: dict = field(default_factory=dict)
    videos_ok: int = 0                 # samples written this run
    videos_failed: int = 0
    videos_unchanged: int = 0
    samples_removed: int = 0
    frames: int = 0
    bytes_written: int = 0             # tar bytes of the samples written this run
    shards_written: list[str] = field(default_factory=list)
    shards_removed: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)   # stage -> wall seconds (worker stages: summed)
    failed: list[dict] = field(default_factory=list)   # {"source", "class", "reason", "stderr_tail"}
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    exit_code: int = EXIT_OK

    @property
    def wall(self) -> float:
        return self.seconds.get("total", 0.0)

    def to_json(self) -> dict:
        d = asdict(self)
        wall = self.wall or 1e-9
        d["error_classes"] = dict(sorted(Counter(f["class"] for f in self.failed).items()))
        d["videos_per_s"] = round(self.videos_ok / wall, 3)
        d["frames_per_s"] = round(self.frames / wall, 3)
        d["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        return d

    def write(self, folder: Path) -> None:
        data = json.dumps(self.to_json(), indent=1, sort_keys=True).encode() + b"\n"
        atomic_write_bytes(Path(folder) / REPORT_FILE, data)

    def summary(self) -> str:
        d = self.to_json()
        lines = [f"vtt-prep: {self.videos_ok} written, {self.videos_unchanged} unchanged, "
                 f"{self.videos_failed} failed, {self.samples_removed} removed; {self.frames} frames, "
                 f"{self.bytes_written / 1e6:.1f} MB in {self.wall:.1f} s "
                 f"({d['videos_per_s']} videos/s, {d['frames_per_s']} frames/s)"]
        if self.shards_written or self.shards_removed:
            lines.append(f"shards written: {', '.join(self.shards_written) or '-'}; "
                         f"removed: {', '.join(self.shards_removed) or '-'}")
        if d["error_classes"]:
            lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in d["error_classes"].items()))
        lines += [f"  FAILED {f['source']}: [{f['class']}] {f['reason']}" for f in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... {len(self.failed) - 20} more in {REPORT_FILE}")
        lines += [f"warning: {w}" for w in self.warnings[:20]]
        return "\n".join(lines)
