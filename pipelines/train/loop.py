"""One trainer for every model kind: Ray Train DDP, checkpoints, EMA, MLflow, fault tolerance.

Interface (shared with pipelines/train/{vit,vae}.py; changes are listed here first):

- ``TrainConfig``: the flags of every ``vitdit train`` command.
- ``TrainTask``: subclass per model kind (datasets, build_model, model_config, loss, validate,
  visualize, flops_per_sample, finalize, batch_columns).
- ``run_training(task, cfg) -> TrainResult``: the driver (MLflow run, ``TorchTrainer.fit``, summary).

Additions to the interface as first agreed (nothing was removed or renamed):

- ``run_training(task, cfg, _test_hooks=None)``: test-only fault injection (``TEST_HOOKS``).
- ``NonFiniteLossError`` (a VitditError: exit 2) is what the driver raises on a NaN/inf step.
- The task object is pickled to the workers; test tasks in ``tests/`` must be shipped by value
  (``ray.cloudpickle.register_pickle_by_value``, see ``tests/_train_utils.py``).
- ``TrainResult.last_checkpoint`` is the real ``<output>/checkpoint_<step>`` directory. What Ray
  Train records is a small pointer checkpoint (``vitdit_checkpoint.json`` → that directory): Ray
  only registers checkpoints under its own run directory and would otherwise copy every one.
- Rank 0 also appends its logged metrics to ``<output>/train_log.jsonl`` (each step once, across
  restarts and --resume); ``finalize``'s summary goes to ``<output>/summary.json``.

Where each part lives (every name above stays importable from here):

- ``task.py``: TrainConfig, TrainTask, TrainResult, NonFiniteLossError, the run directory's files.
- ``plan.py``: flag checks, the batch plan, ``WorkerPlan`` (what each worker needs, built here).
- ``restore.py``: which checkpoint a fit or a restarted worker continues from, and loading it.
- ``data.py``: training batches over epochs, validation batches, rank 0's warm-up thread.
- ``model_setup.py``: optimizer, precision (measured on a CPU), grad checkpointing, compile, DDP.
- ``step.py``: one optimizer step. ``sink.py``: metrics to train_log.jsonl and MLflow, once each.
- ``save.py``: checkpoints, retention, ``ray.train.report``, the summary, the non-finite stop.
- ``worker.py``: the loop on each worker. This module: the driver.

How a step works (every worker)::

    for each of `accum` micro batches:   (no_sync on all but the last, so DDP all-reduces once)
        loss = task.loss(model, batch, generator) under autocast; (loss / accum).backward()
    all-reduce [loss, non-finite flag]   → every rank agrees to stop on NaN/inf (none hangs)
    clip grads, AdamW step, EMA update (rank 0)
    every log_every: rank 0 → MLflow; every eval_every: rank 0 validates (+ DiT sample grid)
    every checkpoint_every and at the end: rank 0 writes checkpoint_<step>/ atomically, every rank
    calls ray.train.report(..., checkpoint=...) (rank 0's checkpoint, None elsewhere)

Determinism: the data order of an epoch is a pure function of (seed, epoch) (local shuffle seeded by
both; block order preserved), and the RNG of every step is seeded from (seed, step, rank). So a run
resumed from checkpoint_<s> (which records the data epoch and the batches of it consumed) repeats
the uninterrupted run's losses exactly with 1 worker.

A NaN/inf loss or gradient norm at step k: no update is applied, rank 0 writes
``<output>/nonfinite.json``, every rank reports it and returns normally (so ``FailureConfig`` does
not retry), and the driver raises :class:`NonFiniteLossError` naming k.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import uuid
from typing import Any

from pipelines.storage import is_uri, join, read_json
from pipelines.train.data import Background, EpochIterator, ValidationBatches, epoch_seed, start_warm_up
from pipelines.train.model_setup import (
    enable_grad_checkpointing,
    make_optimizer,
    prepare_for_precision,
    probe_precision,
    resolve_precision,
)
from pipelines.train.plan import WorkerPlan, batch_plan, build_worker_plan, check_config, fits_cache
from pipelines.train.restore import choose_resume_dir, resume_config
from pipelines.train.save import make_config_json
from pipelines.train.sink import LastLogged, backfill_on_resume, last_step_in_log, logged_rows
from pipelines.train.step import step_seed
from pipelines.train.task import (
    NONFINITE_MARKER,
    POINTER_NAME,
    PRECISION_NAME,
    PRECISIONS,
    SUMMARY_NAME,
    TEST_HOOKS,
    TRAIN_LOG_NAME,
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
    TrainTask,
)
from pipelines.train.worker import worker_loop
from vitdit.checkpoint import list_checkpoints
from vitdit.errors import VitditError

__all__ = [
    "NONFINITE_MARKER",
    "POINTER_NAME",
    "PRECISIONS",
    "PRECISION_NAME",
    "SUMMARY_NAME",
    "TEST_HOOKS",
    "TRAIN_LOG_NAME",
    "EpochIterator",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "TrainTask",
    "ValidationBatches",
    "WorkerPlan",
    "batch_plan",
    "enable_grad_checkpointing",
    "epoch_seed",
    "make_config_json",
    "make_optimizer",
    "prepare_for_precision",
    "probe_precision",
    "resolve_precision",
    "run_training",
    "step_seed",
]

# The names these parts had while they lived in this module (tests import some of them).
_Background = Background
_ValidationBatches = ValidationBatches
_EpochIterator = EpochIterator
_start_warm_up = start_warm_up
_logged_rows = logged_rows
_last_step_in_log = last_step_in_log
_check_config = check_config
_fits_cache = fits_cache
_worker_loop = worker_loop

log = logging.getLogger(__name__)


def run_training(task: TrainTask, cfg: TrainConfig, _test_hooks: dict[str, Any] | None = None) -> TrainResult:
    """Driver: check flags, open the MLflow run, ``TorchTrainer.fit``, print where things are."""
    from pipelines.train.mlflow_logger import RunHandle

    check_config(cfg)
    _start_ray(cfg)
    cfg = dataclasses.replace(cfg, output=cfg.output if is_uri(cfg.output) else os.path.abspath(cfg.output))
    resume_dir = choose_resume_dir(cfg.resume, cfg.output)
    resumed_config = resume_config(resume_dir, task.kind)
    _clear_run_dir(cfg.output)
    datasets = _task_datasets(task)

    # MLflow: the driver creates (or, on --resume, reopens) the run; rank 0 logs during fit.
    handle = RunHandle(cfg.tracking_uri, cfg.experiment or f"vitdit-{task.kind}")
    run_id, last_logged = _open_mlflow_run(handle, task, cfg, resume_dir, resumed_config)
    plan = build_worker_plan(
        task,
        cfg,
        has_val="val" in datasets,
        resume_dir=resume_dir,
        run_id=run_id,
        tracking_uri=None if run_id is None else handle.tracking_uri,
        last_logged=last_logged,
        hooks=_test_hooks,
    )
    try:
        result = _make_trainer(plan, datasets).fit()
    except BaseException as e:
        handle.end("FAILED")
        _raise_if_no_room(e, cfg)
        raise
    _raise_if_nonfinite(cfg.output, result, handle)
    handle.end("FINISHED")
    return _result(plan, result)


def _start_ray(cfg: TrainConfig) -> None:
    """Connect to (or start) Ray and check that the cluster can hold the workers at all."""
    from pipelines.runtime import check_resources, init_ray

    init_ray(cfg.address)
    # Ray Train would otherwise retry its worker-group start forever on a cluster that cannot fit it.
    check_resources(
        f"--num-workers {cfg.num_workers} × --cpus-per-worker {cfg.cpus_per_worker:g}",
        {
            "CPU": cfg.num_workers * cfg.cpus_per_worker,
            **({"GPU": float(cfg.num_workers)} if cfg.use_gpu else {}),
        },
    )


def _clear_run_dir(output: str) -> None:
    """A local run directory exists, without the marker of an earlier non-finite stop."""
    if is_uri(output):
        return
    os.makedirs(output, exist_ok=True)
    marker = os.path.join(output, NONFINITE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)


def _task_datasets(task: TrainTask) -> dict[str, Any]:
    """The task's Ray datasets, narrowed to the columns it trains on."""
    datasets = task.datasets()
    columns = task.batch_columns()
    if columns:
        datasets = {k: ds.select_columns(columns) for k, ds in datasets.items()}
    if "train" not in datasets:
        raise VitditError(f"{type(task).__name__}.datasets() returned no 'train' data set")
    return datasets


def _open_mlflow_run(
    handle, task: TrainTask, cfg: TrainConfig, resume_dir: str | None, resumed_config: dict[str, Any]
) -> tuple[str | None, LastLogged]:
    """Create the MLflow run, or reopen the resumed run's own (same tracking URI); log the params
    and backfill the steps the stopped run had not sent. Returns (run id, what each sink has)."""
    prev = resumed_config.get("mlflow") or {}
    reopen = prev.get("run_id") if prev.get("tracking_uri") == handle.tracking_uri else None
    run_id = handle.start(run_name=os.path.basename(cfg.output.rstrip("/")), resume_run_id=reopen)
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume",)}
    params.update({f"model.{k}": v for k, v in _flat(task.model_config()).items()})
    handle.log_params(params)
    last_logged = backfill_on_resume(
        handle,
        None if is_uri(cfg.output) else os.path.join(cfg.output, TRAIN_LOG_NAME),
        resumed=bool(resume_dir),
        reopened=bool(reopen) and run_id == reopen,
        checkpoint_step=int(resumed_config.get("step") or 0),
    )
    if resume_dir:
        handle.set_tag("resumed_from", resume_dir)
    return run_id, last_logged


def _make_trainer(plan: WorkerPlan, datasets: dict[str, Any]):
    """The ``TorchTrainer`` of a plan: its workers run ``worker_loop``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = plan.cfg
    execution = ray.train.DataConfig.default_ingest_options()
    execution.preserve_order = True  # the data order is a function of (seed, epoch): exact resume
    return TorchTrainer(
        worker_loop,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
            placement_strategy=cfg.placement.upper(),  # PACK (Ray's default) or SPREAD
        ),
        run_config=ray.train.RunConfig(
            name=f"{plan.task.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            **_ray_storage(join(cfg.output, "_ray")),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.max_failures,
                # Each failed start of the worker group (no room for it, e.g. a lost node not yet
                # replaced) is a controller failure, retried forever by default: --node-wait-s bounds it.
                controller_failure_limit=max(1, math.ceil(cfg.node_wait_s / _worker_group_start_timeout_s())),
            ),
            # Retention is ours (last K + every M-th); Ray's num_to_keep would delete the M-th ones.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=execution),
    )


def _ray_storage(storage: str) -> dict[str, Any]:
    """RunConfig's storage for Ray Train's own files: a local path, or for object storage the path inside
    vitdit's filesystem (``pipelines.storage.filesystem``: bounded S3 timeouts), not Ray's default one
    (pyarrow's defaults: 100 s for one call against an endpoint that never answers)."""
    if not is_uri(storage):
        return {"storage_path": storage}
    from pipelines.storage import filesystem

    fs, path = filesystem(storage)
    return {"storage_path": path, "storage_filesystem": fs}


def _worker_group_start_timeout_s() -> float:
    """Ray Train's wait for a worker group's resources per start attempt (its env var, default 60 s)."""
    return float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))


def _raise_if_no_room(error: BaseException, cfg: TrainConfig) -> None:
    """VitditError (how to resume) when fit gave up because the workers found no room to restart."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError"):
            last = list_checkpoints(cfg.output) if not is_uri(cfg.output) else []
            raise VitditError(
                f"training stopped: the cluster had no room for --num-workers {cfg.num_workers} × "
                f"--cpus-per-worker {cfg.cpus_per_worker:g}{' + 1 GPU' if cfg.use_gpu else ''} for "
                f"--node-wait-s {cfg.node_wait_s:g} s after losing a worker (a node gone and not "
                f"replaced); last checkpoint: {last[-1][1] if last else cfg.output}. Once the cluster "
                f"has room again, run the same command with --resume {cfg.output}"
            ) from None
        e = getattr(e, "controller_failure", None) or e.__cause__ or e.__context__


def _raise_if_nonfinite(output: str, result, handle) -> None:
    """NonFiniteLossError (the MLflow run marked FAILED) when a worker stopped at a NaN/inf step."""
    nonfinite = read_json(join(output, NONFINITE_MARKER))
    if nonfinite is None and result.metrics and "nonfinite_step" in result.metrics:
        nonfinite = {"step": result.metrics["nonfinite_step"]}
    if nonfinite is None:
        return
    handle.end("FAILED")
    last = list_checkpoints(output) if not is_uri(output) else []
    raise NonFiniteLossError(
        f"non-finite loss at step {nonfinite['step']}: training stopped on every worker; "
        f"last good checkpoint: {last[-1][1] if last else 'none'}"
    )


def _result(plan: WorkerPlan, result) -> TrainResult:
    """What the fit left behind, printed for the user too."""
    output = plan.output
    checkpoints = [p for _, p in list_checkpoints(output)] if not is_uri(output) else []
    last_ckpt = checkpoints[-1] if checkpoints else None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            with open(os.path.join(d, POINTER_NAME)) as f:
                last_ckpt = json.load(f)["path"]
    summary = read_json(join(output, SUMMARY_NAME)) or {}
    final_step = int(summary.get("final_step", plan.cfg.steps))
    res = TrainResult(output, final_step, checkpoints, last_ckpt, plan.run_id, plan.tracking_uri, summary)
    print(f"checkpoints: {output} (latest: {last_ckpt})")
    print(
        f"mlflow run: {plan.run_id} at {plan.tracking_uri}"
        if plan.run_id
        else "mlflow run: none (tracking unreachable)"
    )
    return res


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
