"""Checkpoints and the reports to Ray Train: rank 0 writes ``checkpoint_<step>/`` (and applies the
retention), every rank calls ``ray.train.report`` as often as the others; the end of a run (summary)
and its stop on a non-finite step."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import torch.nn as nn

from pipelines.storage import copy_dir, is_uri, join, write_json
from pipelines.train.sink import MetricSink
from pipelines.train.task import NONFINITE_MARKER, POINTER_NAME, SUMMARY_NAME, TrainConfig, TrainTask
from vitdit.checkpoint import (
    CONFIG_KEYS,
    apply_retention,
    capture_rng_state,
    checkpoint_name,
    save_checkpoint,
)

log = logging.getLogger(__name__)


def make_config_json(
    task_config: dict[str, Any], kind: str, step: int, mlflow: dict[str, Any]
) -> dict[str, Any]:
    """config.json: every CONFIG_KEYS entry (None where it does not apply) plus the task's."""
    import vitdit

    out: dict[str, Any] = {k: None for k in CONFIG_KEYS}
    out.update(task_config)
    out.update({"kind": kind, "step": step, "mlflow": mlflow, "vitdit_version": vitdit.__version__})
    return out


def make_train_state(
    step: int,
    *,
    data_epoch: int,
    data_batches_in_epoch: int,
    world: int,
    micro: int,
    cfg: TrainConfig,
    optimizer,
) -> dict[str, Any]:
    """train_state.pt: what a resumed run needs besides the weights (optimizer, RNG, data position,
    the batch layout that position is valid for)."""
    return {
        "step": step,
        "data_epoch": data_epoch,
        "data_batches_in_epoch": data_batches_in_epoch,
        "num_workers": world,
        "micro_batch_size": micro,
        "global_batch_size": cfg.global_batch_size,
        "seed": cfg.seed,
        "optimizer": optimizer.state_dict(),
        "lr_schedule": {
            "schedule": cfg.lr_schedule,
            "base_lr": cfg.lr,
            "warmup_steps": cfg.warmup_steps,
            "total_steps": cfg.steps,
            "last_lr": optimizer.param_groups[0]["lr"],
        },
        "rng": capture_rng_state(),
    }


def write_checkpoint(
    output: str,
    step: int,
    config: dict[str, Any],
    model_state: dict[str, Any],
    ema_state: dict[str, Any],
    train_state: dict[str, Any],
    cfg: TrainConfig,
) -> str:
    """Write ``<output>/checkpoint_<step>`` (atomically; through a local copy for a URI) and apply
    the retention (last ``keep_checkpoints`` plus every ``keep_every``-th) to a local run directory.
    Returns the checkpoint's path or URI."""
    name = checkpoint_name(step)
    if is_uri(output):
        local = save_checkpoint(
            os.path.join(tempfile.mkdtemp(prefix="vitdit-ckpt-"), name),
            config,
            model_state,
            ema_state,
            train_state,
        )
        target = f"{output.rstrip('/')}/{name}"
        copy_dir(local, target)
        shutil.rmtree(os.path.dirname(local), ignore_errors=True)
        return target
    target = save_checkpoint(os.path.join(output, name), config, model_state, ema_state, train_state)
    deleted = apply_retention(output, cfg.keep_checkpoints, cfg.keep_every)
    if deleted:
        log.info("retention deleted %s", ", ".join(os.path.basename(d) for d in deleted))
    return target


def write_pointer(target: str, step: int) -> str:
    """A new directory holding ``vitdit_checkpoint.json`` → ``target``: what Ray Train records.

    Ray only registers checkpoints under its own run directory (and would copy ours there): a
    pointer to the checkpoint is reported instead, the pattern Ray's error message suggests.
    """
    pointer_dir = tempfile.mkdtemp(prefix="vitdit-pointer-")
    write_json(os.path.join(pointer_dir, POINTER_NAME), {"path": target, "step": step})
    return pointer_dir


def save_and_report(
    plan,
    step: int,
    *,
    rank: int,
    world: int,
    raw: nn.Module,
    ema: nn.Module | None,
    optimizer,
    data,
    sink: MetricSink,
) -> None:
    """Rank 0 writes checkpoint_<step> and tags it in MLflow; every rank reports (rank 0 with the
    checkpoint), so all ranks call ``ray.train.report`` equally often."""
    import ray.train
    from ray.train import Checkpoint

    ckpt = None
    if rank == 0:
        task: TrainTask = plan.task
        mlflow_info = {"tracking_uri": plan.tracking_uri, "run_id": plan.run_id}
        config = make_config_json(task.model_config(), task.kind, step, mlflow_info)
        train_state = make_train_state(
            step,
            data_epoch=data.epoch,
            data_batches_in_epoch=data.batches_in_epoch,
            world=world,
            micro=plan.micro,
            cfg=plan.cfg,
            optimizer=optimizer,
        )
        target = write_checkpoint(
            plan.output, step, config, raw.state_dict(), ema.state_dict(), train_state, plan.cfg
        )
        sink.set_tag(f"checkpoint.{step:08d}", target)
        sink.set_tag("checkpoint.latest", target)
        ckpt = Checkpoint.from_directory(write_pointer(target, step))
    ray.train.report(
        {"step": step},
        checkpoint=ckpt,
        checkpoint_dir_name=checkpoint_name(step),
        delete_local_checkpoint_after_upload=True,
    )


def stop_nonfinite(
    output: str, step: int, loss: float, grad_norm: float | None, *, rank: int, sink: MetricSink
) -> None:
    """End a run at a non-finite step: rank 0 writes ``nonfinite.json`` (the driver raises from it)
    and every rank reports once more and returns normally, so ``FailureConfig`` does not retry what
    a restart cannot fix."""
    import ray.train

    if rank == 0:
        write_json(
            join(output, NONFINITE_MARKER), {"step": step, "loss": str(loss), "grad_norm": str(grad_norm)}
        )
        sink.set_tag("stopped", f"non-finite loss at step {step}")
        sink.close()
    ray.train.report({"nonfinite_step": step})


def finish(task: TrainTask, raw: nn.Module, ema: nn.Module, output: str, step: int, sink: MetricSink) -> None:
    """Rank 0 after the last step: the task's ``finalize``, ``summary.json``, the MLflow flush."""
    import time

    t_end = time.perf_counter()
    summary = task.finalize(raw, ema, output) or {}
    write_json(join(output, SUMMARY_NAME), {"final_step": step, **summary})
    sink.close()
    log.info("rank 0 finished at step %d (finalize, MLflow flush: %.1f s)", step, time.perf_counter() - t_end)
