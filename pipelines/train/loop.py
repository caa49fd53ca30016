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

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from pipelines.storage import copy_dir, is_uri, join, read_json, write_json
from vitdit.checkpoint import (
    CONFIG_KEYS,
    apply_retention,
    capture_rng_state,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    read_config,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
)
from vitdit.ema import create_ema, unwrap_model, update_ema
from vitdit.errors import VitditError
from vitdit.lr import SCHEDULES, lr_at
from vitdit.mfu import peak_flops

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
NONFINITE_MARKER = "nonfinite.json"
SUMMARY_NAME = "summary.json"
TRAIN_LOG_NAME = "train_log.jsonl"
POINTER_NAME = "vitdit_checkpoint.json"  # what a Ray Train checkpoint of this loop holds


class NonFiniteLossError(VitditError):
    """Training stopped at a step whose loss or gradient norm was NaN or infinite."""


@dataclasses.dataclass
class TrainConfig:
    """Flags shared by every ``vitdit train`` command."""

    output: str = dataclasses.field(metadata={"help": "run directory or URI; checkpoints go under it"})
    steps: int = dataclasses.field(default=1000, metadata={"help": "optimizer steps"})
    global_batch_size: int = dataclasses.field(
        default=256, metadata={"help": "samples per optimizer step, over all workers"}
    )
    lr: float = dataclasses.field(default=1e-4, metadata={"help": "AdamW learning rate after the warm-up"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = dataclasses.field(
        default=0, metadata={"help": "steps of linear warm-up from 0 to --lr"}
    )
    lr_schedule: str = dataclasses.field(
        default="constant",
        metadata={
            "choices": list(SCHEDULES),
            "help": "after the warm-up: constant, or cosine decay to 0 at --steps",
        },
    )
    grad_clip: float = dataclasses.field(
        default=1.0, metadata={"help": "max gradient norm; 0 turns clipping off"}
    )
    ema_decay: float = dataclasses.field(
        default=0.9999,
        metadata={"help": "decay of the weights' moving average (ema.safetensors), updated every step"},
    )
    num_workers: int = dataclasses.field(default=1, metadata={"help": "Ray Train workers (data-parallel)"})
    use_gpu: bool = dataclasses.field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: float = dataclasses.field(
        default=1.0, metadata={"help": "CPUs per worker, also its torch threads"}
    )
    micro_batch_size: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "per-worker micro batch; gradient accumulation when smaller than the worker's share"
        },
    )
    precision: str = dataclasses.field(
        default="auto",
        metadata={
            "choices": list(PRECISIONS),
            "help": "auto: bf16 on GPUs that support it; on a CPU the faster of fp32 and bf16, "
            "measured by a few real training steps at start (cached per CPU model and torch version)",
        },
    )
    compile: bool = dataclasses.field(default=False, metadata={"help": "torch.compile the model"})
    grad_checkpointing: bool = dataclasses.field(
        default=False, metadata={"help": "recompute transformer blocks in backward to save memory"}
    )
    checkpoint_every: int = dataclasses.field(
        default=500, metadata={"help": "steps between checkpoints (the last step always writes one)"}
    )
    keep_checkpoints: int = dataclasses.field(default=2, metadata={"help": "keep the last K checkpoints"})
    keep_every: int = dataclasses.field(
        default=0, metadata={"help": "also keep every M-th step's checkpoint"}
    )
    max_failures: int = dataclasses.field(
        default=1, metadata={"help": "worker failures Ray Train recovers from"}
    )
    resume: str | None = dataclasses.field(
        default=None, metadata={"help": "checkpoint directory (or run directory: its latest) to continue"}
    )
    shuffle_buffer: int = dataclasses.field(
        default=4096,
        metadata={
            "help": "rows each worker holds for its seeded local shuffle; data sets are often written "
            "in class order, so a buffer of a few batches gives one-class batches"
        },
    )
    cache_rows: int = dataclasses.field(
        default=20_000,
        metadata={
            "help": "keep a worker's training rows in its memory (one pass, then a seeded permutation "
            "per epoch) when its share is at most this many rows; larger data sets stream from Ray "
            "Data every epoch"
        },
    )
    log_every: int = dataclasses.field(default=10, metadata={"help": "steps between logged metrics"})
    eval_every: int = dataclasses.field(
        default=100, metadata={"help": "validation loss (+ DiT sample grid) cadence"}
    )
    tracking_uri: str | None = dataclasses.field(
        default=None, metadata={"help": "MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"}
    )
    experiment: str | None = dataclasses.field(
        default=None, metadata={"help": "MLflow experiment (default: vitdit-<kind>)"}
    )
    seed: int = dataclasses.field(
        default=0, metadata={"help": "seed of the initialisation, the data order and the noise"}
    )
    address: str | None = dataclasses.field(
        default=None, metadata={"help": "Ray cluster address (default: $RAY_ADDRESS, else a local cluster)"}
    )
    peak_tflops: float | None = dataclasses.field(
        default=None, metadata={"help": "peak TFLOP/s for MFU (default: GPU table or measured CPU matmul)"}
    )


# Test-only knobs, not flags (run_training(..., _test_hooks={...})), so --help stays honest:
# "inject_nan_at_step": k → the loss of step k is NaN on every rank;
# "kill_after_step": k with "kill_after_step_marker": path → rank 0 SIGKILLs its own process after
# step k's checkpoint, once (the marker file records that it happened).
TEST_HOOKS = ("inject_nan_at_step", "kill_after_step", "kill_after_step_marker")


class TrainTask:
    """What differs between model kinds. Subclasses live in pipelines/train/{dit,vit,vae}.py.

    The task object is pickled to every worker: keep it to plain attributes (paths, configs), build
    models and open data in the methods.
    """

    kind: str = "base"

    def datasets(self) -> dict[str, Any]:
        """Driver side: {"train": ray.data.Dataset, optionally "val": ...}, rows ready for ``loss``."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """Worker side: the model, randomly initialised (the same seed on every rank)."""
        raise NotImplementedError

    def model_config(self) -> dict[str, Any]:
        """JSON for config.json: model_name, model_config, class_names, dataset, vae, diffusion..."""
        raise NotImplementedError

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one micro batch (a mean over its samples) and extra scalars to log
        (bare names: the loop logs them as ``train/<name>``)."""
        raise NotImplementedError

    def validate(self, model: nn.Module, ema_model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Rank 0: validation metrics such as {"val/loss": ...}."""
        return {}

    def visualize(self, ema_model: nn.Module, step: int) -> Any:
        """Rank 0: a PIL image to log (DiT: a fixed-seed sample grid), or None."""
        return None

    def warm_up(self) -> None:
        """Rank 0, in a background thread at start-up: load what ``visualize`` needs (DiT: the VAE).

        Runs while the first training batches are fetched; the first evaluation waits for it.
        """

    def flops_per_sample(self, model: nn.Module) -> float:
        """Training FLOPs per sample (≈ 6 × forward MACs)."""
        fn = getattr(unwrap_model(model), "forward_macs", None)
        return 6.0 * float(fn()) if fn else 0.0

    def finalize(self, model: nn.Module, ema_model: nn.Module, output_dir: str) -> dict[str, Any]:
        """Rank 0 after the last step; returns extra summary entries."""
        return {}

    def batch_columns(self) -> list[str] | None:
        """Columns ``iter_torch_batches`` converts (None = all)."""
        return None


@dataclasses.dataclass
class TrainResult:
    """What a finished run left behind."""

    output: str
    final_step: int
    checkpoints: list[str]
    last_checkpoint: str | None
    run_id: str | None
    tracking_uri: str | None
    summary: dict[str, Any]


# --- pure helpers (unit-tested without Ray) -------------------------------------------------------


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW with torch's fused kernel on CPU and CUDA, the multi-tensor one elsewhere.

    Fused is one pass over each parameter instead of one per arithmetic step: several times faster
    than the multi-tensor kernel on CPUs (benchmarks/RESULTS.md, "later runs" of train_step.py).
    A resumed run takes the ``fused`` flag from the checkpoint's optimizer state,
    so a run continues with the kernel it started with.
    """
    if device.type in ("cpu", "cuda"):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


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


def resolve_precision(precision: str, device: torch.device) -> str | None:
    """The precision to train at, or None when "auto" on a CPU must be measured (``probe_precision``).

    On CUDA, "auto" is bf16 where the GPU supports it (tensor cores run bf16 at twice TF32's rate);
    on a CPU no flag tells which is faster, so the trainer times both (``vitdit.precision``).
    """
    if precision not in PRECISIONS:
        raise VitditError(f"--precision {precision!r}: expected one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return None


def prepare_for_precision(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """What a precision trains with besides autocast: on a CPU, bf16 takes the math attention path
    (torch's fused SDPA has a slow bf16 backward on CPU; docs/facts.md)."""
    if precision == "bf16" and device.type == "cpu":
        from vitdit.models.layers import set_attn_impl

        set_attn_impl(model, "math")
    return model


def probe_precision(
    task: TrainTask, raw: nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Rank 0's ``vitdit.precision.probe`` of real training steps of copies of ``raw`` on ``batch``.

    Each candidate trains its own deep copy (the run's weights, optimizer and RNG are untouched);
    every step starts from the same seeds, so the first steps' losses are comparable.
    """
    import copy

    from vitdit.precision import probe

    def make_step(precision: str) -> Callable[[], float]:
        model = prepare_for_precision(copy.deepcopy(raw), precision, device)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        model.train()
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)

        def step() -> float:
            torch.manual_seed(cfg.seed)
            generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, _ = task.loss(model, batch, generator)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach().float())

        return step

    micro = len(next(iter(batch.values())))
    workload = f"{task.kind}:{type(unwrap_model(raw)).__name__}:{_param_count(raw)}:micro {micro}"
    return probe(make_step, workload)


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def enable_grad_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each of ``model.blocks`` in backward (state-dict keys unchanged)."""
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(unwrap_model(model), "blocks", None)
    if blocks is None:
        raise VitditError(f"{type(model).__name__} has no .blocks to checkpoint")
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return model


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of (run seed, step, rank): makes each step's noise independent of history."""
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919_777) % (2**63 - 1)


def _fits_cache(num_rows: int | None, cfg: TrainConfig) -> bool:
    """Whether each worker's share of the training rows is small enough to keep in memory."""
    return num_rows is not None and num_rows / max(cfg.num_workers, 1) <= cfg.cache_rows


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 31_337) % (2**32)


def make_config_json(
    task_config: dict[str, Any], kind: str, step: int, mlflow: dict[str, Any]
) -> dict[str, Any]:
    """config.json: every CONFIG_KEYS entry (None where it does not apply) plus the task's."""
    import vitdit

    out: dict[str, Any] = {k: None for k in CONFIG_KEYS}
    out.update(task_config)
    out.update({"kind": kind, "step": step, "mlflow": mlflow, "vitdit_version": vitdit.__version__})
    return out


# --- the loop on each worker ----------------------------------------------------------------------


class _EpochIterator:
    """Micro batches of the train shard over epochs; resumes at (epoch, batches consumed)."""

    def __init__(
        self, shard, micro: int, seed: int, epoch: int, skip: int, device, shuffle_buffer: int, cache: bool
    ):
        self.shard, self.micro, self.seed, self.device = shard, micro, seed, device
        self.shuffle_buffer = shuffle_buffer
        self.epoch = epoch
        self.batches_in_epoch = 0
        # Small data sets: one pass into memory, then a permutation seeded by (seed, epoch) every
        # epoch. Streaming a few batches per epoch spends most of the step waiting on Ray Data to
        # start each epoch's execution (benchmarks/RESULTS.md, "CPU: training start-up").
        # The cache is filled without a shuffle, in Ray Data's preserved block order, so the order
        # of every epoch is a pure function of (seed, epoch) and a resume is exact.
        self.cache = self._fill_cache() if cache else None
        self._it = self._open()
        self._peeked: dict[str, torch.Tensor] | None = None
        for _ in range(skip):  # the part of this epoch consumed before the checkpoint
            self.next()

    def peek(self) -> dict[str, torch.Tensor]:
        """The batch the next ``next()`` returns, without consuming it."""
        if self._peeked is None:
            self._peeked = self.next()
        return self._peeked

    def _fill_cache(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in self.shard.iter_torch_batches(batch_size=max(self.micro, 256)):
            for k, v in batch.items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items()}

    def _cached_epoch(self) -> Iterator:
        n = len(next(iter(self.cache.values()))) if self.cache else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        for start in range(0, n - self.micro + 1, self.micro):  # drop_last, as when streaming
            idx = order[start : start + self.micro]
            yield {k: v[idx].to(self.device) for k, v in self.cache.items()}

    def _open(self) -> Iterator:
        self.batches_in_epoch = 0
        if self.cache is not None:
            return self._cached_epoch()
        return iter(
            self.shard.iter_torch_batches(
                batch_size=self.micro,
                drop_last=True,
                local_shuffle_buffer_size=self.shuffle_buffer,
                local_shuffle_seed=epoch_seed(self.seed, self.epoch),
                device=self.device,
            )
        )

    def next(self) -> dict[str, torch.Tensor]:
        if self._peeked is not None:  # already counted in batches_in_epoch when it was fetched
            batch, self._peeked = self._peeked, None
            return batch
        try:
            batch = next(self._it)
        except StopIteration:
            if self.batches_in_epoch == 0:
                raise self._too_small() from None
            self.epoch += 1  # a new epoch: a new order, seeded by (seed, epoch)
            self._it = self._open()
            try:
                batch = next(self._it)
            except StopIteration:
                raise self._too_small() from None
        self.batches_in_epoch += 1
        return batch

    def _too_small(self) -> VitditError:
        return VitditError(
            f"the training data yields no batch of {self.micro} rows per worker: use a smaller "
            "--global-batch-size or --micro-batch-size, or fewer workers"
        )


def _checkpoints_of_this_fit(output: str, preexisting: list[str]) -> list[str]:
    """Checkpoints in a local run directory that were not there when this fit started."""
    if is_uri(output):
        return []
    return [p for _, p in list_checkpoints(output) if os.path.basename(p) not in set(preexisting)]


def _log_file_rows(path: str | None) -> Iterator[dict[str, Any]]:
    """The rows of train_log.jsonl (none when there is no file), skipping a line cut by SIGKILL."""
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def _logged_rows(path: str | None, after: int, upto: int) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) rows of train_log.jsonl with ``after < step <= upto``, in file order.

    A worker killed mid-run loses the metrics its MLflow thread had not sent yet; its log file,
    written synchronously, still has them. A run continued from a checkpoint at ``upto`` never
    re-does those steps, so they are sent to MLflow from here ("backfill").
    """
    rows = []
    for row in _log_file_rows(path) if upto > after else ():
        step = int(row.pop("step", -1))
        if after < step <= upto:
            rows.append((step, {k: v for k, v in row.items() if isinstance(v, int | float)}))
    return rows


def _last_step_in_log(path: str | None) -> int:
    """The highest train-metrics step in train_log.jsonl, -1 when none."""
    return max((int(row["step"]) for row in _log_file_rows(path) if "train/loss" in row), default=-1)


def _pointed_checkpoint(ray_ckpt) -> str:
    """The checkpoint directory a reported Ray checkpoint points to (a local copy for URIs)."""
    with ray_ckpt.as_directory() as d:
        with open(os.path.join(d, POINTER_NAME)) as f:
            target = json.load(f)["path"]
    if is_uri(target):
        local = os.path.join(tempfile.mkdtemp(prefix="vitdit-restore-"), os.path.basename(target.rstrip("/")))
        copy_dir(target, local)
        return local
    return target


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from pipelines.runtime import set_torch_threads

    task: TrainTask = loop_config["task"]
    cfg: TrainConfig = loop_config["cfg"]
    hooks: dict[str, Any] = loop_config.get("hooks") or {}
    output: str = loop_config["output"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        set_torch_threads(cfg.cpus_per_worker)
    else:  # TF32 tensor cores for fp32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = resolve_precision(cfg.precision, device)  # None: measured below, on a real batch
    micro, accum = batch_plan(cfg.global_batch_size, world, cfg.micro_batch_size)
    # The shards first: rank 0's first request for the train shard makes Ray Train start Ray Data's
    # split coordinator, an actor in a new process, which then comes up while the model, the
    # optimizer (whose first construction imports torch._dynamo) and the checkpoint load
    # (benchmarks/RESULTS.md, "CPU: training start-up").
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if rank == 0 and loop_config.get("has_val") else None

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts)
    raw = task.build_model().to(device)
    ema = create_ema(raw) if rank == 0 else None
    optimizer = make_optimizer(raw, cfg.lr, cfg.weight_decay, device)

    # Resume: Ray's own restart within this fit first, else --resume.
    start_step, epoch, skip = 0, 0, 0
    state = None
    ray_ckpt = ray.train.get_checkpoint()
    # A worker killed right after ray.train.report may die before Ray's controller collects that
    # report, so a restart can get an older checkpoint (or none) from Ray: the newest checkpoint
    # this fit wrote in the run directory wins over it.
    own = _checkpoints_of_this_fit(output, loop_config.get("preexisting_checkpoints", []))
    restarted = ray_ckpt is not None or bool(own)
    candidates = []
    if ray_ckpt is not None:
        candidates.append(_pointed_checkpoint(ray_ckpt))
    candidates += own
    if not candidates and loop_config.get("resume_dir"):
        candidates.append(loop_config["resume_dir"])
    if candidates:
        state = load_checkpoint(max(candidates, key=lambda c: int(read_config(c).get("step") or 0)))
    if state is not None:
        raw.load_state_dict(state.model_state)
        if ema is not None:
            ema.load_state_dict(state.ema_state if state.ema_state is not None else state.model_state)
        ts = state.train_state
        optimizer.load_state_dict(ts["optimizer"])
        start_step = int(ts["step"])
        epoch, skip = int(ts.get("data_epoch", 0)), int(ts.get("data_batches_in_epoch", 0))
        if ts.get("num_workers") not in (None, world) or ts.get("micro_batch_size") not in (None, micro):
            skip = 0  # another batch layout: the partial epoch cannot be replayed; start the next one
            epoch += 1
        if "rng" in ts:
            restore_rng_state(ts["rng"])
        log.info("rank %d resumed at step %d (epoch %d, %d batches in)", rank, start_step, epoch, skip)

    data = _EpochIterator(
        shard,
        micro,
        cfg.seed,
        epoch,
        skip,
        device,
        shuffle_buffer=max(cfg.shuffle_buffer, 4 * micro),
        cache=bool(loop_config.get("cache_data")),
    )
    probe_report = None
    if precision is None:  # "auto" on a CPU: rank 0 times each candidate, every rank takes its answer
        if rank == 0:
            probe_report = probe_precision(task, raw, data.peek(), cfg, device)
            log.info(
                "precision auto -> %s (%s; probe %s s%s)", probe_report["precision"],
                probe_report["reason"], probe_report.get("seconds"), ", cached" if probe_report["cached"] else "",
            )  # fmt: skip
        choice = [probe_report["precision"] if probe_report else None]
        if world > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
        precision = choice[0]
    prepare_for_precision(raw, precision, device)
    if cfg.grad_checkpointing:  # after the probe: a deep copy would keep calling raw's blocks
        enable_grad_checkpointing(raw)

    model = raw
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    params = [p for p in raw.parameters() if p.requires_grad]

    flops_per_sample = task.flops_per_sample(raw)
    peak = peak_flops(device, precision, cfg.peak_tflops) if rank == 0 else 0.0

    logger = None
    if rank == 0 and loop_config.get("run_id"):
        from pipelines.train.mlflow_logger import AsyncRunLogger

        logger = AsyncRunLogger(loop_config["tracking_uri"], loop_config["run_id"])
    # The last step each sink already has: {"mlflow": n, "file": n}. The two can differ: a worker
    # killed mid-run loses the metrics its logger thread had not sent yet, while its log file has them.
    logged = dict(loop_config.get("last_logged") or {"mlflow": -1, "file": -1})
    log_path = os.path.join(output, TRAIN_LOG_NAME) if rank == 0 and not is_uri(output) else None
    if rank == 0 and restarted:
        # A restart within this fit: steps after the checkpoint were logged before the failure and
        # are about to be re-done; each sink gets each step once.
        logged["file"] = max(logged["file"], _last_step_in_log(log_path))
        if logger is not None:
            try:
                history = logger.client.get_metric_history(loop_config["run_id"], "train/loss")
                logged["mlflow"] = max([logged["mlflow"], *(m.step for m in history)])
                for step_k, row in _logged_rows(log_path, logged["mlflow"], start_step):
                    logger.log_metrics(row, step_k)  # lost with the killed worker's queue
                logged["mlflow"] = max(logged["mlflow"], start_step if log_path else -1)
            except Exception as e:
                logged["mlflow"] = max(logged["mlflow"], logged["file"])  # never twice
                log.warning(
                    "cannot read the MLflow history (%s): steps up to %d may be missing there",
                    e, logged["mlflow"],
                )  # fmt: skip

    if rank == 0:
        _record_precision(output, precision, cfg.precision, probe_report, logger)
    val_batches = None
    if val_shard is not None:
        val_batches = _ValidationBatches(val_shard, micro, cfg.cache_rows)
    # Rank 0 reads a small validation set and imports what the sample grid needs in the background
    # while training starts, instead of stalling the first evaluation on them; the thread competes
    # with the first steps for the CPU (benchmarks/RESULTS.md, "CPU: training start-up").
    warm_up = _start_warm_up(task, val_batches) if rank == 0 else None
    autocast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    use_autocast = precision == "bf16"
    mlflow_info = {"tracking_uri": loop_config.get("tracking_uri"), "run_id": loop_config.get("run_id")}

    def save(step_done: int) -> None:
        """Rank 0 writes checkpoint_<step>; every rank reports (rank 0 with the checkpoint)."""
        from ray.train import Checkpoint

        ckpt = None
        if rank == 0:
            config = make_config_json(task.model_config(), task.kind, step_done, mlflow_info)
            train_state = {
                "step": step_done,
                "data_epoch": data.epoch,
                "data_batches_in_epoch": data.batches_in_epoch,
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
            name = checkpoint_name(step_done)
            if is_uri(output):
                local = save_checkpoint(
                    os.path.join(tempfile.mkdtemp(prefix="vitdit-ckpt-"), name),
                    config,
                    raw.state_dict(),
                    ema.state_dict(),
                    train_state,
                )
                target = f"{output.rstrip('/')}/{name}"
                copy_dir(local, target)
                shutil.rmtree(os.path.dirname(local), ignore_errors=True)
            else:
                target = save_checkpoint(
                    os.path.join(output, name), config, raw.state_dict(), ema.state_dict(), train_state
                )
                deleted = apply_retention(output, cfg.keep_checkpoints, cfg.keep_every)
                if deleted:
                    log.info("retention deleted %s", ", ".join(os.path.basename(d) for d in deleted))
            if logger is not None:
                logger.set_tag(f"checkpoint.{step_done:08d}", target)
                logger.set_tag("checkpoint.latest", target)
            # Ray only registers checkpoints under its own run directory (and would copy ours there):
            # report a pointer to the checkpoint instead, the pattern Ray's error message suggests.
            pointer_dir = tempfile.mkdtemp(prefix="vitdit-pointer-")
            write_json(os.path.join(pointer_dir, POINTER_NAME), {"path": target, "step": step_done})
            ckpt = Checkpoint.from_directory(pointer_dir)
        ray.train.report(
            {"step": step_done},
            checkpoint=ckpt,
            checkpoint_dir_name=checkpoint_name(step_done),
            delete_local_checkpoint_after_upload=True,
        )

    def stop_nonfinite(step_k: int, loss_value: float, grad_norm: float | None) -> None:
        if rank == 0:
            payload = {"step": step_k, "loss": str(loss_value), "grad_norm": str(grad_norm)}
            write_json(join(output, NONFINITE_MARKER), payload)
            if logger is not None:
                logger.set_tag("stopped", f"non-finite loss at step {step_k}")
                logger.close()
        # Every rank reports the same number of times and returns normally: no retry.
        ray.train.report({"nonfinite_step": step_k})

    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
    step = start_step
    raw.train()
    while step < cfg.steps:
        step_k = step + 1  # the step this update makes (1-based, as checkpoints name it)
        lr = lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(cfg.seed, step_k, rank))  # e.g. label dropout inside the model
        generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step_k, rank) + 1)
        loss_sum = torch.zeros((), device=device)
        extras: dict[str, float] = {}
        for m in range(accum):
            t_wait = time.perf_counter()
            batch = data.next()
            window_wait += time.perf_counter() - t_wait
            sync = contextlib.nullcontext() if (not ddp or m == accum - 1) else model.no_sync()
            with sync:
                with autocast(enabled=use_autocast):
                    loss, extra = task.loss(model, batch, generator)
                if hooks.get("inject_nan_at_step") == step_k:
                    loss = loss * float("nan")
                (loss / accum).backward()
            loss_sum += loss.detach().float()
            for k, v in extra.items():
                extras[k] = extras.get(k, 0.0) + float(v) / accum
        step_loss = loss_sum / accum
        # [loss, non-finite flag] summed over ranks: every rank takes the same stop decision.
        agree = torch.stack([torch.nan_to_num(step_loss, nan=0.0, posinf=0.0, neginf=0.0),
                             (~torch.isfinite(step_loss)).float()])  # fmt: skip
        if world > 1:
            torch.distributed.all_reduce(agree)
        mean_loss, nonfinite = agree[0].item() / world, agree[1].item() > 0
        if nonfinite:
            stop_nonfinite(step_k, float("nan"), None)
            return
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        if not torch.isfinite(grad_norm):  # gradients are all-reduced: the same on every rank
            stop_nonfinite(step_k, mean_loss, float(grad_norm))
            return
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, raw, cfg.ema_decay)
        step = step_k
        window_steps += 1

        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            elapsed = time.perf_counter() - window_start
            img_per_s = window_steps * cfg.global_batch_size / elapsed
            metrics = {
                "train/loss": mean_loss,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                "train/img_per_s": img_per_s,
                # img_per_s counts all workers; the peak is one device's, so divide by the world.
                "train/mfu": flops_per_sample * img_per_s / world / peak if peak else 0.0,
                "train/data_wait_frac": window_wait / elapsed,
                "train/epoch": data.epoch,
                **{f"train/{k}": v for k, v in extras.items()},
            }
            if logger is not None and step > logged["mlflow"]:
                logger.log_metrics(metrics, step)
            if log_path and step > logged["file"]:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
            log.info("step %d loss %.5f lr %.2e %.1f img/s", step, mean_loss, lr, img_per_s)
            window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0

        if rank == 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            t_eval = time.perf_counter()
            if warm_up is not None:
                warm_up.result()  # re-raises a failed validation read here, as a direct read would
                warm_up = None
            _evaluate(task, raw, ema, step, val_batches, autocast, use_autocast, logger, logged, log_path)
            window_start += time.perf_counter() - t_eval  # validation is not training throughput

        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(step)

        if hooks.get("kill_after_step") == step and rank == 0:
            marker = hooks.get("kill_after_step_marker")
            if marker and not os.path.exists(marker):
                open(marker, "w").close()
                import signal

                os.kill(os.getpid(), signal.SIGKILL)

    if rank == 0:
        t_end = time.perf_counter()
        summary = task.finalize(raw, ema, output) or {}
        summary = {"final_step": step, **summary}
        write_json(join(output, SUMMARY_NAME), summary)
        if logger is not None:
            logger.close()
        log.info(
            "rank 0 finished at step %d (finalize, MLflow flush: %.1f s)", step, time.perf_counter() - t_end
        )


PRECISION_NAME = "precision.json"  # rank 0's record of the precision it trained at, and why


def _record_precision(
    output: str, precision: str, requested: str, report: dict[str, Any] | None, logger
) -> None:
    """``<output>/precision.json`` and the MLflow run: the precision trained at, the probe's figures."""
    record: dict[str, Any] = {"precision": precision, "requested": requested}
    if report is not None:
        record.update({k: report.get(k) for k in ("reason", "cached", "seconds", "figures", "key")})
    try:
        write_json(join(output, PRECISION_NAME), record)
    except OSError as e:
        log.warning("cannot write %s: %s", PRECISION_NAME, e)
    if logger is not None:
        logger.log_params({"precision_resolved": precision})
        logger.set_tag("precision.resolved", precision)
        if report is not None:
            logger.set_tag("precision.reason", str(report.get("reason")))
            logger.set_tag("precision.probe", json.dumps(report.get("figures"), sort_keys=True)[:5000])
            figures = {
                f"precision_probe/{p}_{k}": float(v)
                for p, f in (report.get("figures") or {}).items()
                for k, v in f.items()
                if k in ("step_ms", "matmul_gflops") and isinstance(v, int | float)
            }
            if figures:
                logger.log_metrics(figures, 0)


def _start_warm_up(task: TrainTask, val_batches: _ValidationBatches | None) -> _Background:
    """``val_batches.prefetch()`` then ``task.warm_up()`` in a daemon thread."""

    def work() -> None:
        if val_batches is not None:
            val_batches.prefetch()
        task.warm_up()

    return _Background(work)


class _Background:
    """Runs ``fn`` in a daemon thread (a stopping worker never waits for it); ``result`` joins it and
    re-raises what it raised."""

    def __init__(self, fn: Callable[[], None]):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="vitdit-warm-up", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # handed to the training thread by result()
            self._error = e

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class _ValidationBatches:
    """The validation shard's batches; kept in memory after the first pass when it is small.

    Small validation sets (at most ``cache_rows`` rows, e.g. the digits' 360 images) are read from
    Ray Data once: the ViT may validate every epoch, and starting a Ray Data execution per
    validation cost more than the validation itself (benchmarks/RESULTS.md, "CPU: training
    start-up").
    The batches are the same either way (the val data set is not shuffled).
    """

    def __init__(self, shard, micro: int, cache_rows: int):
        self.shard, self.micro, self.cache_rows = shard, micro, cache_rows
        self.cached: list[dict[str, torch.Tensor]] | None = None
        self.too_big = False

    def prefetch(self) -> None:
        """Read a small validation set into the cache now; give up (no cache) once it is too big."""
        if self.cached is not None or self.too_big:
            return
        keep: list[dict[str, torch.Tensor]] = []
        rows = 0
        for batch in self.shard.iter_torch_batches(batch_size=self.micro):
            rows += len(next(iter(batch.values()))) if batch else 0
            if rows > self.cache_rows:
                self.too_big = True  # a large one streams at each validation instead
                return
            keep.append(batch)
        self.cached = keep

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.prefetch()  # a no-op after the warm-up thread's prefetch
        if self.cached is not None:
            yield from self.cached
        else:
            yield from self.shard.iter_torch_batches(batch_size=self.micro)


def _evaluate(task, raw, ema, step, val_batches, autocast, use_autocast, logger, logged, log_path) -> None:
    raw.eval()
    try:
        with torch.no_grad(), autocast(enabled=use_autocast):
            metrics = task.validate(raw, ema, val_batches) if val_batches is not None else {}
            image = task.visualize(ema, step)
    finally:
        raw.train()
    to_mlflow = logger is not None and step > logged["mlflow"]
    if metrics:
        log.info("step %d %s", step, " ".join(f"{k} {v:.5f}" for k, v in metrics.items()))
        if to_mlflow:
            logger.log_metrics(metrics, step)
        if log_path and step > logged["file"]:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
    if image is not None and to_mlflow:
        logger.log_image(image, key="samples", step=step)


# --- the driver ------------------------------------------------------------------------------------


def _check_config(cfg: TrainConfig) -> None:
    if cfg.steps <= 0:
        raise VitditError(f"--steps {cfg.steps}: must be > 0")
    if cfg.num_workers <= 0:
        raise VitditError(f"--num-workers {cfg.num_workers}: must be > 0")
    batch_plan(cfg.global_batch_size, cfg.num_workers, cfg.micro_batch_size)
    if cfg.lr_schedule not in SCHEDULES:
        raise VitditError(f"--lr-schedule {cfg.lr_schedule!r}: expected one of {SCHEDULES}")
    if cfg.precision not in PRECISIONS:
        raise VitditError(f"--precision {cfg.precision!r}: expected one of {PRECISIONS}")
    if cfg.keep_checkpoints < 1:
        raise VitditError(
            f"--keep-checkpoints {cfg.keep_checkpoints}: must be >= 1 (restarts need the latest)"
        )
    for name in ("checkpoint_every", "log_every", "eval_every"):
        if getattr(cfg, name) <= 0:
            raise VitditError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be > 0")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise VitditError(f"--ema-decay {cfg.ema_decay}: must be in [0, 1]")


def run_training(task: TrainTask, cfg: TrainConfig, _test_hooks: dict[str, Any] | None = None) -> TrainResult:
    """Driver: check flags, open the MLflow run, ``TorchTrainer.fit``, print where things are."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.runtime import check_resources, init_ray
    from pipelines.train.mlflow_logger import RunHandle

    _check_config(cfg)
    init_ray(cfg.address)
    # Ray Train would otherwise retry its worker-group start forever on a cluster that cannot fit it.
    check_resources(
        f"--num-workers {cfg.num_workers} × --cpus-per-worker {cfg.cpus_per_worker:g}",
        {
            "CPU": cfg.num_workers * cfg.cpus_per_worker,
            **({"GPU": float(cfg.num_workers)} if cfg.use_gpu else {}),
        },
    )
    output = cfg.output if is_uri(cfg.output) else os.path.abspath(cfg.output)
    cfg = dataclasses.replace(cfg, output=output)
    resume_dir = resolve_checkpoint_dir(cfg.resume) if cfg.resume else None
    if not resume_dir and not is_uri(output) and list_checkpoints(output):
        # Re-running the same command after a crash or a kill finishes the job (docs/design.md, Errors):
        # a run directory that already holds checkpoints is continued from its latest one.
        resume_dir = resolve_checkpoint_dir(output)
        log.info("--output %s holds checkpoints: continuing from %s", output, resume_dir)
    resume_config: dict[str, Any] = {}
    if resume_dir:
        resume_config = load_checkpoint(resume_dir).config
        if resume_config.get("kind") != task.kind:
            raise VitditError(
                f"resuming from {resume_dir}: a {resume_config.get('kind')} checkpoint, not {task.kind} "
                "(choose another --output)"
            )
    if not is_uri(output):
        os.makedirs(output, exist_ok=True)
        marker = os.path.join(output, NONFINITE_MARKER)
        if os.path.exists(marker):
            os.remove(marker)

    datasets = task.datasets()
    columns = task.batch_columns()
    if columns:
        datasets = {k: ds.select_columns(columns) for k, ds in datasets.items()}
    if "train" not in datasets:
        raise VitditError(f"{type(task).__name__}.datasets() returned no 'train' data set")

    # MLflow: the driver creates (or, on --resume, reopens) the run; rank 0 logs during fit.
    handle = RunHandle(cfg.tracking_uri, cfg.experiment or f"vitdit-{task.kind}")
    prev = resume_config.get("mlflow") or {}
    reopen = prev.get("run_id") if prev.get("tracking_uri") == handle.tracking_uri else None
    run_id = handle.start(run_name=os.path.basename(output.rstrip("/")), resume_run_id=reopen)
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume",)}
    params.update({f"model.{k}": v for k, v in _flat(task.model_config()).items()})
    handle.log_params(params)
    # What each sink already has of a resumed run (see _worker_loop): each gets each step once.
    in_file = (
        _last_step_in_log(os.path.join(output, TRAIN_LOG_NAME)) if resume_dir and not is_uri(output) else -1
    )
    reopened = bool(reopen) and run_id == reopen
    in_mlflow = handle.last_logged_step() if reopened else -1
    if reopened and in_mlflow is not None and not is_uri(output):
        # Steps up to the checkpoint that the killed run's MLflow thread never sent: from the log.
        upto = int(resume_config.get("step") or 0)
        rows = _logged_rows(os.path.join(output, TRAIN_LOG_NAME), in_mlflow, upto)
        if rows and handle.log_metric_rows(rows):
            log.info("sent %d logged steps to MLflow that the stopped run had not", len(rows))
            in_mlflow = max(in_mlflow, upto)
    last_logged = {"mlflow": in_file if in_mlflow is None else in_mlflow, "file": in_file}  # never twice
    if resume_dir:
        handle.set_tag("resumed_from", resume_dir)
    if run_id is None:
        handle_uri = None
    else:
        handle_uri = handle.tracking_uri

    execution = ray.train.DataConfig.default_ingest_options()
    execution.preserve_order = True  # the data order is a function of (seed, epoch): exact resume
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "task": task,
            "cfg": cfg,
            "output": output,
            "resume_dir": resume_dir,
            "run_id": run_id,
            "tracking_uri": handle_uri,
            "last_logged": last_logged,
            "hooks": _test_hooks or {},
            "has_val": "val" in datasets,
            # Every rank decides the same way (ranks that stream and ranks that do not would
            # desynchronise Ray Data's per-epoch split).
            "cache_data": _fits_cache(getattr(task, "num_train_rows", None), cfg),
            "preexisting_checkpoints": [os.path.basename(p) for _, p in list_checkpoints(output)]
            if not is_uri(output)
            else [],
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"{task.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=join(output, "_ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Retention is ours (last K + every M-th); Ray's num_to_keep would delete the M-th ones.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=execution),
    )
    try:
        result = trainer.fit()
    except BaseException:
        handle.end("FAILED")
        raise

    nonfinite = read_json(join(output, NONFINITE_MARKER))
    if nonfinite is None and result.metrics and "nonfinite_step" in result.metrics:
        nonfinite = {"step": result.metrics["nonfinite_step"]}
    if nonfinite is not None:
        handle.end("FAILED")
        last = list_checkpoints(output) if not is_uri(output) else []
        raise NonFiniteLossError(
            f"non-finite loss at step {nonfinite['step']}: training stopped on every worker; "
            f"last good checkpoint: {last[-1][1] if last else 'none'}"
        )
    handle.end("FINISHED")

    checkpoints = [p for _, p in list_checkpoints(output)] if not is_uri(output) else []
    last_ckpt = checkpoints[-1] if checkpoints else None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            with open(os.path.join(d, POINTER_NAME)) as f:
                last_ckpt = json.load(f)["path"]
    summary = read_json(join(output, SUMMARY_NAME)) or {}
    final_step = int(summary.get("final_step", cfg.steps))
    res = TrainResult(output, final_step, checkpoints, last_ckpt, run_id, handle_uri, summary)
    print(f"checkpoints: {output} (latest: {last_ckpt})")
    print(f"mlflow run: {run_id} at {handle_uri}" if run_id else "mlflow run: none (tracking unreachable)")
    return res


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
