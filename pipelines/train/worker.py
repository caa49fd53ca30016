"""The loop on each Ray Train worker: set up from the driver's ``WorkerPlan``, then train, log,
validate and checkpoint step by step (the parts live in plan, restore, step, sink and save)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from pipelines.train.data import Background, EpochIterator, ValidationBatches, start_warm_up
from pipelines.train.model_setup import make_optimizer, prepare_model, record_precision, settle_precision
from pipelines.train.plan import WorkerPlan
from pipelines.train.restore import Restored, restore_worker
from pipelines.train.save import finish, save_and_report, stop_nonfinite
from pipelines.train.sink import MetricSink, Throughput, train_metrics
from pipelines.train.step import StepOutcome, StepParts, autocast, train_step
from pipelines.train.task import TrainTask
from vitdit.ema import create_ema
from vitdit.mfu import peak_flops

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Worker:
    """One worker's training state after set-up."""

    plan: WorkerPlan
    parts: StepParts
    start_step: int
    sink: MetricSink
    val_batches: ValidationBatches | None
    warm_up: Background | None  # rank 0's start-up thread, joined at the first validation
    flops_per_sample: float
    peak: float  # one device's peak FLOP/s at the run's precision (rank 0 only; 0 elsewhere)

    @property
    def rank(self) -> int:
        return self.parts.rank


def worker_loop(loop_config: dict[str, Any]) -> None:
    """The ``TorchTrainer`` function: ``loop_config["plan"]`` is the driver's ``WorkerPlan``."""
    worker = open_worker(loop_config["plan"])
    step = run_steps(worker)
    if step is not None and worker.rank == 0:
        p = worker.parts
        finish(worker.plan.task, p.raw, p.ema, worker.plan.output, step, worker.sink)


def open_worker(plan: WorkerPlan) -> Worker:
    """Device, data shards, model, optimizer and EMA, the checkpoint to continue from, precision,
    DDP, the metric sink and rank 0's background warm-up."""
    import ray.train
    import ray.train.torch

    from pipelines.runtime import set_torch_threads

    cfg, task = plan.cfg, plan.task
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        set_torch_threads(cfg.cpus_per_worker)
    else:  # TF32 tensor cores for fp32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # The shards first: rank 0's first request for the train shard makes Ray Train start Ray Data's
    # split coordinator, an actor in a new process, which then comes up while the model, the
    # optimizer (whose first construction imports torch._dynamo) and the checkpoint load
    # (benchmarks/RESULTS.md, "CPU: training start-up").
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if rank == 0 and plan.has_val else None

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts)
    raw = task.build_model().to(device)
    ema = create_ema(raw) if rank == 0 else None
    optimizer = make_optimizer(raw, cfg.lr, cfg.weight_decay, device)
    restored = restore_worker(plan, raw, ema, optimizer, world, rank)
    data = EpochIterator(
        shard,
        plan.micro,
        cfg.seed,
        restored.epoch,
        restored.skip,
        device,
        shuffle_buffer=max(cfg.shuffle_buffer, 4 * plan.micro),
        cache=plan.cache_data,
    )
    precision, probe_report = settle_precision(task, raw, data.peek, cfg, device, rank, world)
    model = prepare_model(raw, precision, cfg, device, world)
    parts = StepParts(
        task, model, raw, optimizer, ema, data, device, plan.accum, rank, world, precision == "bf16"
    )
    flops_per_sample = task.flops_per_sample(raw)
    peak = peak_flops(device, precision, cfg.peak_tflops) if rank == 0 else 0.0

    sink = _open_sink(plan, rank, restored)
    if rank == 0:
        record_precision(plan.output, precision, cfg.precision, probe_report, sink.logger)
    val_batches = ValidationBatches(val_shard, plan.micro, cfg.cache_rows) if val_shard is not None else None
    # Rank 0 reads a small validation set and imports what the sample grid needs in the background
    # while training starts, instead of stalling the first evaluation on them; the thread competes
    # with the first steps for the CPU (benchmarks/RESULTS.md, "CPU: training start-up").
    warm_up = start_warm_up(task, val_batches) if rank == 0 else None
    return Worker(plan, parts, restored.step, sink, val_batches, warm_up, flops_per_sample, peak)


def _open_sink(plan: WorkerPlan, rank: int, restored: Restored) -> MetricSink:
    """Rank 0's metric sink (MLflow when the driver opened a run, the local log file); inert elsewhere."""
    if rank != 0:
        return MetricSink(None, None, plan.last_logged)
    logger = None
    if plan.run_id:
        from pipelines.train.mlflow_logger import AsyncRunLogger

        logger = AsyncRunLogger(plan.tracking_uri, plan.run_id)
    sink = MetricSink(logger, plan.log_path, plan.last_logged)
    if restored.restarted:
        sink.catch_up_after_restart(plan.run_id, restored.step)
    return sink


def run_steps(worker: Worker) -> int | None:
    """Train from ``worker.start_step`` to ``--steps``; the last step, or None when a non-finite
    step stopped the run (every rank then returns None)."""
    plan, parts, cfg = worker.plan, worker.parts, worker.plan.cfg
    throughput = Throughput()
    step = worker.start_step
    parts.raw.train()
    while step < cfg.steps:
        out = train_step(parts, cfg, step + 1, inject_nan=plan.hooks.get("inject_nan_at_step") == step + 1)
        if out.nonfinite:
            stop_nonfinite(plan.output, out.step, out.loss, out.grad_norm, rank=parts.rank, sink=worker.sink)
            return None
        step = out.step
        throughput.add_step(out.data_wait)
        last = step == cfg.steps
        if parts.rank == 0 and (step % cfg.log_every == 0 or last):
            _log_train_metrics(worker, out, throughput)
        if parts.rank == 0 and (step % cfg.eval_every == 0 or last):
            t_eval = time.perf_counter()
            _evaluate(worker, step)
            throughput.exclude(time.perf_counter() - t_eval)  # validation is not training throughput
        if step % cfg.checkpoint_every == 0 or last:
            save_and_report(
                plan, step, rank=parts.rank, world=parts.world, raw=parts.raw, ema=parts.ema,
                optimizer=parts.optimizer, data=parts.data, sink=worker.sink,
            )  # fmt: skip
        _kill_if_asked(plan.hooks, step, parts.rank)
    return step


def _log_train_metrics(worker: Worker, out: StepOutcome, throughput: Throughput) -> None:
    """Rank 0: the train metrics of the window that ends at ``out.step``, then a new window."""
    parts, cfg = worker.parts, worker.plan.cfg
    elapsed = throughput.elapsed()
    metrics = train_metrics(
        loss=out.loss,
        lr=out.lr,
        grad_norm=out.grad_norm,
        extras=out.extras,
        steps=throughput.steps,
        elapsed=elapsed,
        data_wait=throughput.data_wait,
        global_batch_size=cfg.global_batch_size,
        flops_per_sample=worker.flops_per_sample,
        world=parts.world,
        peak_flops=worker.peak,
        epoch=parts.data.epoch,
    )
    worker.sink.log(out.step, metrics)
    log.info("step %d loss %.5f lr %.2e %.1f img/s", out.step, out.loss, out.lr, metrics["train/img_per_s"])
    throughput.restart()


def _evaluate(worker: Worker, step: int) -> None:
    """Rank 0: validation metrics and the task's image (DiT: a sample grid) of ``step``."""
    if worker.warm_up is not None:
        worker.warm_up.result()  # re-raises a failed validation read here, as a direct read would
        worker.warm_up = None
    evaluate(worker.plan.task, worker.parts, step, worker.val_batches, worker.sink)


def evaluate(
    task: TrainTask, parts: StepParts, step: int, val_batches: ValidationBatches | None, sink: MetricSink
) -> None:
    """``task.validate`` and ``task.visualize`` in eval mode without gradients, logged at ``step``."""
    raw: nn.Module = parts.raw
    raw.eval()
    try:
        with torch.no_grad(), autocast(parts.device, parts.use_autocast):
            metrics = task.validate(raw, parts.ema, val_batches) if val_batches is not None else {}
            image = task.visualize(parts.ema, step)
    finally:
        raw.train()
    if metrics:
        log.info("step %d %s", step, " ".join(f"{k} {v:.5f}" for k, v in metrics.items()))
        sink.log(step, metrics)
    if image is not None:
        sink.log_image(image, key="samples", step=step)


def _kill_if_asked(hooks: Mapping[str, Any], step: int, rank: int) -> None:
    """Test hook: rank 0 SIGKILLs its own process after ``kill_after_step``'s checkpoint, once."""
    if hooks.get("kill_after_step") != step or rank != 0:
        return
    marker = hooks.get("kill_after_step_marker")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
