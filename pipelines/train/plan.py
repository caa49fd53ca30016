"""What every training worker needs, decided once on the driver: the flags checked, the batch
layout, where to resume from, the MLflow run and what it already has."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from pipelines.storage import is_uri
from pipelines.train.sink import LastLogged
from pipelines.train.task import PLACEMENTS, PRECISIONS, TRAIN_LOG_NAME, TrainConfig, TrainTask
from vitdit.checkpoint import list_checkpoints
from vitdit.errors import VitditError
from vitdit.lr import SCHEDULES


def batch_plan(global_batch_size: int, num_workers: int, micro_batch_size: int | None) -> tuple[int, int]:
    """(micro batch per worker, accumulation steps) keeping the global batch fixed."""
    if global_batch_size <= 0 or num_workers <= 0:
        raise VitditError(
            f"--global-batch-size {global_batch_size} and --num-workers {num_workers} must be > 0"
        )
    if global_batch_size % num_workers:
        raise VitditError(
            f"--global-batch-size {global_batch_size} is not divisible by --num-workers {num_workers}"
        )
    share = global_batch_size // num_workers
    micro = micro_batch_size or share
    if micro <= 0 or share % micro:
        raise VitditError(
            f"--micro-batch-size {micro} does not divide the per-worker share {share} "
            f"(= global batch {global_batch_size} / {num_workers} workers)"
        )
    return micro, share // micro


def check_config(cfg: TrainConfig) -> None:
    """Refuse flags the run cannot work with, naming the flag (before Ray or MLflow start)."""
    if cfg.steps <= 0:
        raise VitditError(f"--steps {cfg.steps}: must be > 0")
    if cfg.num_workers <= 0:
        raise VitditError(f"--num-workers {cfg.num_workers}: must be > 0")
    batch_plan(cfg.global_batch_size, cfg.num_workers, cfg.micro_batch_size)
    if cfg.lr_schedule not in SCHEDULES:
        raise VitditError(f"--lr-schedule {cfg.lr_schedule!r}: expected one of {SCHEDULES}")
    if cfg.precision not in PRECISIONS:
        raise VitditError(f"--precision {cfg.precision!r}: expected one of {PRECISIONS}")
    if cfg.node_wait_s <= 0:
        raise VitditError(f"--node-wait-s {cfg.node_wait_s:g}: must be > 0")
    if cfg.placement not in PLACEMENTS:
        raise VitditError(f"--placement {cfg.placement!r}: expected one of {PLACEMENTS}")
    if cfg.keep_checkpoints < 1:
        raise VitditError(
            f"--keep-checkpoints {cfg.keep_checkpoints}: must be >= 1 (restarts need the latest)"
        )
    for name in ("checkpoint_every", "log_every", "eval_every"):
        if getattr(cfg, name) <= 0:
            raise VitditError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be > 0")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise VitditError(f"--ema-decay {cfg.ema_decay}: must be in [0, 1]")


def fits_cache(num_rows: int | None, cfg: TrainConfig) -> bool:
    """Whether each worker's share of the training rows is small enough to keep in memory."""
    return num_rows is not None and num_rows / max(cfg.num_workers, 1) <= cfg.cache_rows


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What each worker needs, built once on the driver and pickled to every worker."""

    task: TrainTask
    cfg: TrainConfig  # cfg.output is absolute (workers run in another directory)
    micro: int  # rows per micro batch on each worker
    accum: int  # micro batches per optimizer step
    resume_dir: str | None  # the checkpoint the fit starts from (None: a new run)
    run_id: str | None  # the MLflow run rank 0 logs to (None: no tracking)
    tracking_uri: str | None
    last_logged: LastLogged  # the last step each metric sink had before this fit
    has_val: bool
    # Every rank decides the same way (ranks that stream and ranks that do not would desynchronise
    # Ray Data's per-epoch split).
    cache_data: bool
    preexisting_checkpoints: tuple[str, ...]  # names in the run directory before this fit
    hooks: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # TEST_HOOKS

    @property
    def output(self) -> str:
        return self.cfg.output

    @property
    def log_path(self) -> str | None:
        """train_log.jsonl in a local run directory; None for a URI (no appending line by line there)."""
        return None if is_uri(self.output) else os.path.join(self.output, TRAIN_LOG_NAME)


def build_worker_plan(
    task: TrainTask,
    cfg: TrainConfig,
    *,
    has_val: bool,
    resume_dir: str | None,
    run_id: str | None,
    tracking_uri: str | None,
    last_logged: LastLogged,
    hooks: Mapping[str, Any] | None = None,
) -> WorkerPlan:
    """The plan of a fit of ``cfg`` (already checked, ``cfg.output`` absolute)."""
    micro, accum = batch_plan(cfg.global_batch_size, cfg.num_workers, cfg.micro_batch_size)
    local = not is_uri(cfg.output)
    return WorkerPlan(
        task=task,
        cfg=cfg,
        micro=micro,
        accum=accum,
        resume_dir=resume_dir,
        run_id=run_id,
        tracking_uri=tracking_uri,
        last_logged=last_logged,
        has_val=has_val,
        cache_data=fits_cache(getattr(task, "num_train_rows", None), cfg),
        preexisting_checkpoints=tuple(os.path.basename(p) for _, p in list_checkpoints(cfg.output))
        if local
        else (),
        hooks=dict(hooks or {}),
    )
