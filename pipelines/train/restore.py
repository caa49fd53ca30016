"""Where a run continues from, and loading it: model, optimizer, EMA, RNG and the data position.

Two choices are made. The driver picks the checkpoint a fit starts from (``choose_resume_dir``):
``--resume``, else the latest checkpoint already in the run directory, else none. A worker that Ray
Train restarted within the fit picks the newest of what Ray hands it and what this fit wrote
(``restart_checkpoint``), falling back to the driver's choice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from pipelines import storage
from pipelines.storage import copy_dir, is_uri
from pipelines.train.task import POINTER_NAME
from vitdit.checkpoint import (
    CONFIG_NAME,
    Checkpoint,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    read_config,
    resolve_checkpoint_dir,
    restore_rng_state,
)
from vitdit.errors import VitditError

log = logging.getLogger(__name__)


def choose_resume_dir(resume: str | None, output: str) -> str | None:
    """The checkpoint a fit starts from: ``--resume`` (a checkpoint, or a run directory's latest),
    else the latest checkpoint in a local ``output``, else None (a new run).

    Raises VitditError when ``--resume`` names neither a checkpoint nor a run directory with one.
    """
    if resume and _remote(resume):
        if storage.exists(storage.join(resume, CONFIG_NAME)):
            return resume.rstrip("/")
        found = list_checkpoints_any(resume)
        if not found:
            raise VitditError(f"--resume {resume}: neither a checkpoint nor a run directory with checkpoints")
        return found[-1][1]
    if resume:
        return resolve_checkpoint_dir(resume)
    if _remote(output):
        found = list_checkpoints_any(output)
        if found:
            log.info("--output %s holds checkpoints: continuing from %s", output, found[-1][1])
            return found[-1][1]
        return None
    local = output.removeprefix("file://")
    if list_checkpoints(local):
        # Re-running the same command after a crash or a kill finishes the job: a run directory
        # that already holds checkpoints is continued from its latest one.
        resume_dir = resolve_checkpoint_dir(local)
        log.info("--output %s holds checkpoints: continuing from %s", output, resume_dir)
        return resume_dir
    return None


def _remote(path: str) -> bool:
    return is_uri(path) and not path.startswith("file://")


def list_checkpoints_any(run_dir: str) -> list[tuple[int, str]]:
    """``list_checkpoints`` for a local run directory or a run URI (``s3://.../run``): complete
    checkpoints (config.json present: it is written last) as (step, path), oldest first."""
    if not _remote(run_dir):
        return list_checkpoints(run_dir.removeprefix("file://"))
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(run_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        raise VitditError(f"{run_dir}: cannot list ({storage.storage_error(e)})") from e
    found = []
    for info in infos:
        step = checkpoint_step(info.base_name) if info.type == pafs.FileType.Directory else None
        path = storage.join(run_dir, info.base_name)
        if step is not None and storage.exists(storage.join(path, CONFIG_NAME)):
            found.append((step, path))
    return sorted(found)


def _local_checkpoint(path: str) -> str:
    """A checkpoint on object storage as a local directory (downloaded once per node)."""
    return storage.local_dir(path) if _remote(path) else path


def resume_config(resume_dir: str | None, kind: str) -> dict[str, Any]:
    """config.json of the checkpoint resumed from ({} for a new run); refuses another model kind."""
    if not resume_dir:
        return {}
    config = load_checkpoint(_local_checkpoint(resume_dir)).config
    if config.get("kind") != kind:
        raise VitditError(
            f"resuming from {resume_dir}: a {config.get('kind')} checkpoint, not {kind} (choose another --output)"
        )
    return config


def checkpoints_of_this_fit(output: str, preexisting: Iterable[str]) -> list[str]:
    """Checkpoints in a local run directory that were not there when this fit started."""
    if is_uri(output):
        return []
    before = set(preexisting)
    return [p for _, p in list_checkpoints(output) if os.path.basename(p) not in before]


def pointed_checkpoint(ray_ckpt) -> str:
    """The checkpoint directory a reported Ray checkpoint points to (a local copy for URIs)."""
    with ray_ckpt.as_directory() as d:
        with open(os.path.join(d, POINTER_NAME)) as f:
            target = json.load(f)["path"]
    if is_uri(target):
        local = os.path.join(tempfile.mkdtemp(prefix="vitdit-restore-"), os.path.basename(target.rstrip("/")))
        copy_dir(target, local)
        return local
    return target


def restart_checkpoint(pointed: str | None, own: list[str], resume_dir: str | None) -> str | None:
    """The checkpoint a worker loads: the newest of Ray's (``pointed``) and this fit's own, else the
    one the fit started from, else None.

    A worker killed right after ``ray.train.report`` may die before Ray's controller collects that
    report, so a restart can get an older checkpoint (or none) from Ray: the newest checkpoint this
    fit wrote in the run directory wins over it.
    """
    candidates = ([pointed] if pointed is not None else []) + list(own)
    if not candidates and resume_dir:
        # --resume s3://...: each worker fetches it on its own node (the driver's copy is not there).
        candidates.append(_local_checkpoint(resume_dir))
    if not candidates:
        return None
    return max(candidates, key=lambda c: int(read_config(c).get("step") or 0))


@dataclasses.dataclass(frozen=True)
class Restored:
    """Where a worker starts: the step done, the data epoch and the batches of it consumed."""

    step: int = 0
    epoch: int = 0
    skip: int = 0
    restarted: bool = False  # a restart within this fit (not the fit's first start)


def data_position(train_state: dict[str, Any], world: int, micro: int) -> tuple[int, int, int]:
    """(step, data epoch, batches of it to skip) to continue a checkpoint's ``train_state`` with.

    Another batch layout (workers or micro batch) cannot replay the partial epoch: the next epoch
    starts instead.
    """
    step = int(train_state["step"])
    epoch, skip = int(train_state.get("data_epoch", 0)), int(train_state.get("data_batches_in_epoch", 0))
    if train_state.get("num_workers") not in (None, world) or train_state.get("micro_batch_size") not in (
        None,
        micro,
    ):
        return step, epoch + 1, 0
    return step, epoch, skip


def load_training_state(state: Checkpoint, raw: nn.Module, ema: nn.Module | None, optimizer) -> None:
    """Weights, EMA (the weights when the checkpoint has none), optimizer and RNG from ``state``."""
    raw.load_state_dict(state.model_state)
    if ema is not None:
        ema.load_state_dict(state.ema_state if state.ema_state is not None else state.model_state)
    optimizer.load_state_dict(state.train_state["optimizer"])
    if "rng" in state.train_state:
        restore_rng_state(state.train_state["rng"])


def restore_worker(plan, raw: nn.Module, ema: nn.Module | None, optimizer, world: int, rank: int) -> Restored:
    """Worker: load the checkpoint to continue from into ``raw``, ``ema`` and ``optimizer``.

    ``plan`` is the fit's ``WorkerPlan``: its ``output``, ``preexisting_checkpoints``,
    ``resume_dir`` and ``micro`` decide the choice.
    """
    import ray.train

    ray_ckpt = ray.train.get_checkpoint()
    own = checkpoints_of_this_fit(plan.output, plan.preexisting_checkpoints)
    restarted = ray_ckpt is not None or bool(own)
    pointed = pointed_checkpoint(ray_ckpt) if ray_ckpt is not None else None
    chosen = restart_checkpoint(pointed, own, plan.resume_dir)
    if chosen is None:
        return Restored(restarted=restarted)
    state = load_checkpoint(chosen)
    load_training_state(state, raw, ema, optimizer)
    step, epoch, skip = data_position(state.train_state, world, plan.micro)
    log.info("rank %d resumed at step %d (epoch %d, %d batches in)", rank, step, epoch, skip)
    return Restored(step=step, epoch=epoch, skip=skip, restarted=restarted)
