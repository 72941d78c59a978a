"""`vtt-prep compact`: merge the small shards that incremental runs leave behind into full ones.

Every rerun that adds a few videos writes a new, small shard; a year of daily runs gives hundreds of
them, and small shards mean more files to open and a coarser shuffle per shard for the trainer. The
merge uses extract's commit protocol: samples are copied unchanged (same member bytes) into new shard
numbers, the ledger (the single commit point) then switches to them and lists the old files as
retired (kept --retention-hours for trainers still reading the older index.json, then deleted by a
later extract or compact). A crash before the commit leaves the old state (the next run or compact
removes the unlisted new files). Cost: reads and writes the small shards only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from vtt.shards.folder import OutFolder
from vtt.shards.ledger import Ledger, read_ledger

from .commit import commit_ledger
from .config import CompactConfig, preflight_compact
from .faults import crash_point
from .repair import reconcile
from .retire import purge, retire
from .writer import copy_to_new_shards


@dataclass
class CompactResult:
    merged: list[str]                 # old shards whose samples moved
    written: list[str] = field(default_factory=list)
    samples: int = 0
    dry_run: bool = False
    purged: list[str] = field(default_factory=list)   # retired earlier, past retention, deleted now
    retired: list[str] = field(default_factory=list)  # merged shards kept on disk for running readers

    def text(self) -> str:
        purged = f"\ndeleted {len(self.purged)} retired shards past --retention-hours" if self.purged else ""
        if len(self.merged) < 2:
            return "nothing to compact (fewer than two shards below --min-fill)" + purged
        verb = "would merge" if self.dry_run else "merged"
        out = f"{verb} {len(self.merged)} shards ({self.samples} samples)"
        out += f" into {len(self.written)}: {', '.join(self.written)}" if self.written else ""
        out += f"; {len(self.retired)} old shards kept as retired for running trainers" if self.retired else ""
        return out + purged


def small_shards(ledger: Ledger, cfg: CompactConfig) -> list[str]:
    """Shards below min_fill of the size limit and of the sample limit (full by either is left alone)."""
    return sorted(url for url, e in ledger.shards.items()
                  if e.filesize < cfg.min_fill * cfg.shard_size and e.nsamples < cfg.min_fill * cfg.shard_max_samples)


def compact_shards(cfg: CompactConfig) -> CompactResult:
    preflight_compact(cfg)  # the folder reachable and a shards folder: a ConfigError before any work
    if cfg.dry_run:
        ledger = read_ledger(cfg.out_folder()) or Ledger()
        small = small_shards(ledger, cfg)
        return CompactResult(small, samples=sum(ledger.shards[u].nsamples for u in small), dry_run=True)
    out = cfg.out_folder()
    with out.lock(cfg.break_lock):
        ledger, _ = reconcile(out, read_ledger(out))
        purged = purge(out, ledger, cfg.retention_hours)
        small = small_shards(ledger, cfg)
        if len(small) < 2:
            return CompactResult(small, purged=purged)
        result = _merge(out, cfg, ledger, small)
        result.purged = purged
        return result


def _merge(out: OutFolder, cfg: CompactConfig, ledger: Ledger, small: list[str]) -> CompactResult:
    by_key = {r.key: r for r in ledger.ok_records() if r.shard in small}
    moved, written = copy_to_new_shards(out, small, lambda k, m: (k, m), ledger.next_shard_number(),
                                        cfg.shard_size, cfg.shard_max_samples)
    for old_key, url in moved:
        rec = by_key[old_key]
        ledger.records[rec.source] = replace(rec, shard=url)
    to_delete = retire(ledger, small, cfg.retention_hours)
    ledger.shards.update({e.url: e for e in written})
    commit_ledger(out, ledger)  # always a change here: the merged shards leave the live list
    crash_point("rewrite-committed")
    for url in to_delete:
        out.delete(url)
    return CompactResult(small, [e.url for e in written], len(moved), retired=sorted(set(small) & set(ledger.retired)))
