"""What a run did: counts, throughput, time per stage, error classes; report.json and the summary."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from vtt.shards.folder import out_folder
from vtt.shards.format import REPORT_FILE

EXIT_OK = 0
EXIT_USAGE = 2          # bad flags, bad config, settings differ from the shards without --rebuild
EXIT_FAILED_VIDEOS = 3  # some videos failed; everything else was written
EXIT_LOCKED = 4         # another vtt-prep run holds the shards folder


SAMPLE_WARNINGS_LISTED = 1000   # per-sample warnings listed in report.json; all of them are counted


def warning_kind(text: str) -> str:
    """What a sample warning says without its figures ("sidecar duration N s, probe says N s"): the key its
    count goes under. Cut at the first ';', ' (' or ', e.g.' (what follows is detail)."""
    head = re.split(r";| \(|, e\.g\.", text, maxsplit=1)[0]
    return re.sub(r"-?\d+(?:\.\d+)?", "N", head).strip()


@dataclass
class Report:
    data_dir: str
    out_dir: str
    plan: dict = field(default_factory=dict)
    videos_ok: int = 0                 # samples written this run
    videos_failed: int = 0             # failed this run
    videos_failed_unchanged: int = 0   # earlier failures not retried (nothing changed); also in `failed`
    videos_unchanged: int = 0
    samples_removed: int = 0
    frames: int = 0
    bytes_written: int = 0             # tar bytes of the samples written this run
    shards_written: list[str] = field(default_factory=list)
    shards_removed: list[str] = field(default_factory=list)   # taken out of index.json this run
    shards_retired: list[str] = field(default_factory=list)   # of those, kept on disk for running readers
    shards_purged: list[str] = field(default_factory=list)    # retired earlier, deleted this run
    seconds: dict = field(default_factory=dict)   # stage -> wall seconds (worker stages: summed)
    # {"source", "class", "reason", "stderr_tail"}; earlier failures not retried add "unchanged": True
    failed: list[dict] = field(default_factory=list)
    # the run's own notes (repairs, ffmpeg versions), then "<source>: <warning>" for each warning a sample
    # written this run carries (sidecar vs probe, damaged, short or truncated clips; the first
    # SAMPLE_WARNINGS_LISTED), also in the sample's vtt.warnings; warning_counts counts them all by kind
    warnings: list[str] = field(default_factory=list)
    warning_counts: dict = field(default_factory=dict)
    dry_run: bool = False
    exit_code: int = EXIT_OK

    def sample_warnings(self, source: str, warnings: list[str]) -> None:
        """Count (and list, up to SAMPLE_WARNINGS_LISTED) the warnings of one sample written this run."""
        for w in warnings:
            kind = warning_kind(w)
            self.warning_counts[kind] = self.warning_counts.get(kind, 0) + 1
            if sum(self.warning_counts.values()) <= SAMPLE_WARNINGS_LISTED:
                self.warnings.append(f"{source}: {w}")

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

    def _kept(self) -> str:
        n = self.videos_failed_unchanged
        return f" (+{n} earlier failures unchanged, not retried; --retry-failed)" if n else ""

    def write(self, folder) -> None:
        """report.json in the shards folder (a path or an OutFolder): one atomic write or PUT."""
        data = json.dumps(self.to_json(), indent=1, sort_keys=True).encode() + b"\n"
        out_folder(folder).put_bytes(REPORT_FILE, data)

    def summary(self) -> str:
        d = self.to_json()
        lines = [f"vtt-prep: {self.videos_ok} written, {self.videos_unchanged} unchanged, "
                 f"{self.videos_failed} failed{self._kept()}, {self.samples_removed} removed; {self.frames} frames, "
                 f"{self.bytes_written / 1e6:.1f} MB in {self.wall:.1f} s "
                 f"({d['videos_per_s']} videos/s, {d['frames_per_s']} frames/s)"]
        if self.shards_written or self.shards_removed:
            lines.append(f"shards written: {', '.join(self.shards_written) or '-'}; "
                         f"removed: {', '.join(self.shards_removed) or '-'}"
                         + (f" ({len(self.shards_retired)} kept as retired for running trainers)"
                            if self.shards_retired else ""))
        if self.shards_purged:
            lines.append(f"retired shards deleted (past --retention-hours): {', '.join(self.shards_purged)}")
        if d["error_classes"]:
            lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in d["error_classes"].items()))
        lines += [f"  FAILED {f['source']}: [{f['class']}] {f['reason']}"
                  + (" (earlier failure, unchanged)" if f.get("unchanged") else "") for f in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... {len(self.failed) - 20} more in {REPORT_FILE}")
        if self.warning_counts:
            n = sum(self.warning_counts.values())
            lines.append(f"warnings in the samples written: {n} (listed in {REPORT_FILE}, and each in its "
                         f"sample's vtt.warnings)")
            lines += [f"  {v} x {k}" for k, v in sorted(self.warning_counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        lines += [f"warning: {w}" for w in self.warnings[:20]]
        if len(self.warnings) > 20:
            lines.append(f"  ... {len(self.warnings) - 20} more warnings in {REPORT_FILE}")
        return "\n".join(lines)
