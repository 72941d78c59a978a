"""Run tracking on global rank 0: RUN/metrics.jsonl (always) and Weights & Biases (optional).

W&B never prompts and never blocks a run: online mode needs a key up front (checked before training), and an
online init that fails (no network) falls back to offline with a warning. The W&B run id lives in
RUN/wandb_run_id so that a resumed run continues the same W&B run.
"""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from vtt.shards.format import atomic_write_bytes
from vtt.trainer.config import TrackingConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id"
INIT_TIMEOUT_S = 60


class TrackingError(RuntimeError):
    pass


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(_wandb_host()) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def preflight(cfg: TrackingConfig) -> None:
    """Every rank, before any process group exists: a missing key stops all ranks alike (no hang)."""
    if cfg.mode == "online" and not has_wandb_key():
        raise TrackingError("W&B online mode needs an API key (WANDB_API_KEY or `wandb login`) and none is set: "
                            "log in, or pass --wandb-mode offline (sync later with `wandb sync`) or disabled")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def truncate_metrics(run_dir: str | Path, after_step: int) -> None:
    """On resume: drop lines of the interrupted run past the checkpoint, so steps are not logged twice.

    A kill mid-write leaves a torn last line: it is dropped (with a warning). An unreadable line elsewhere is
    kept as it is (nothing already written is lost) and named in a warning. The rewrite is atomic.
    Cost: one read and one write of the file, once per resume."""
    p = Path(run_dir) / METRICS_FILE
    if not p.is_file():
        return
    lines = [line for line in p.read_text(errors="replace").splitlines() if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                log.warning("%s: dropping its torn last line (the run was killed while writing it): %.80r", p, line)
            else:
                log.warning("%s line %d is not JSON; kept as it is: %.80r", p, i + 1, line)
                kept.append(line)
            continue
        if not isinstance(record, dict) or record.get("step", 0) <= after_step:
            kept.append(line)
    atomic_write_bytes(p, "".join(line + "\n" for line in kept).encode())


class Tracker:
    """Rank 0 writes; other ranks get a Tracker that does nothing, so callers need no rank checks."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, rank: int, config: dict,
                 resume_step: int | None = None):
        self.cfg, self.dir, self.active = cfg, Path(run_dir), rank == 0
        self.wandb_run = None
        if not self.active:
            return
        if resume_step is not None:
            truncate_metrics(self.dir, resume_step)
        self._metrics = open(self.dir / METRICS_FILE, "a", buffering=1)
        if cfg.mode != "disabled":
            self.wandb_run = self._init_wandb(config, resume_step is not None)

    def _run_id(self, resuming: bool) -> str:
        p = self.dir / RUN_ID_FILE
        if p.is_file() and resuming:
            return p.read_text().strip()
        run_id = secrets.token_hex(4)  # W&B ids: short, lowercase alphanumeric
        p.write_text(run_id + "\n")
        return run_id

    def _init_wandb(self, config: dict, resuming: bool):
        if os.environ.get("WANDB_MODE", None) == "":
            del os.environ["WANDB_MODE"]  # wandb rejects an empty WANDB_MODE outright
        # optional: wandb
        import wandb
        run_id = self._run_id(resuming)
        kwargs = dict(project=self.cfg.wandb_project or "vtt", entity=self.cfg.wandb_entity,
                      name=self.cfg.run_name, tags=list(self.cfg.tags) or None, config=config, id=run_id,
                      resume="allow", dir=str(self.dir),
                      settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, silent=True, console="off"))
        try:
            return wandb.init(mode=self.cfg.mode, **kwargs)
        except Exception as e:  # wandb raises its own error types for network/auth problems
            if self.cfg.mode != "online":
                raise TrackingError(f"W&B {self.cfg.mode} init failed: {e}") from e
            log.warning("W&B online init failed (%s: %s); logging offline to %s instead (`wandb sync` later)",
                        type(e).__name__, e, self.dir / "wandb")
            return wandb.init(mode="offline", **kwargs)

    def log(self, record: dict) -> None:
        """One metrics.jsonl line (INTERFACES.md format) and the same values to W&B."""
        if not self.active:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self._metrics.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None},
                               step=record["step"])

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self) -> None:
        if not self.active:
            return
        self._metrics.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
