"""The types every training part shares: the flags (``TrainConfig``), the per-kind task
(``TrainTask``), what a run leaves (``TrainResult``) and the files a run directory holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from vitdit.ema import unwrap_model
from vitdit.errors import VitditError
from vitdit.lr import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16")
# Ray Train placement-group strategies (ScalingConfig(placement_strategy=...)), as --placement names.
PLACEMENTS = ("pack", "spread")
NONFINITE_MARKER = "nonfinite.json"  # rank 0's record of the step that stopped a run
SUMMARY_NAME = "summary.json"  # finalize's summary
TRAIN_LOG_NAME = "train_log.jsonl"  # rank 0's metrics, one JSON line per logged step
POINTER_NAME = "vitdit_checkpoint.json"  # what a Ray Train checkpoint of this loop holds
PRECISION_NAME = "precision.json"  # rank 0's record of the precision it trained at, and why


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
    placement: str = dataclasses.field(
        default="pack",
        metadata={
            "choices": list(PLACEMENTS),
            "help": "pack: workers on as few nodes as fit (Ray Train's default, fastest all-reduce); "
            "spread: one worker per node where possible (survives better the loss of one node)",
        },
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
    node_wait_s: float = dataclasses.field(
        default=600.0,
        metadata={
            "help": "after a worker or its node is lost, how long Ray Train may wait for room to start "
            "the workers again (a replacement node) before the run stops at its last checkpoint"
        },
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
