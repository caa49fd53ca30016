"""One optimizer step on a worker: micro batches with gradient accumulation under autocast, the
ranks' agreement on a non-finite loss, clipping, the AdamW update and the EMA update."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch
import torch.nn as nn

from pipelines.train.task import TrainConfig, TrainTask
from vitdit.ema import update_ema
from vitdit.lr import lr_at


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of (run seed, step, rank): makes each step's noise independent of history."""
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919_777) % (2**63 - 1)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``enabled`` (the run's precision is bf16)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@dataclasses.dataclass
class StepParts:
    """What a training step works on. ``model`` is what forward runs (compiled, DDP-wrapped);
    ``raw`` the module underneath, whose weights the optimizer and the EMA (rank 0 only) hold."""

    task: TrainTask
    model: nn.Module
    raw: nn.Module
    optimizer: torch.optim.Optimizer
    ema: nn.Module | None
    data: Any  # an EpochIterator, or anything with .next() -> batch
    device: torch.device
    accum: int
    rank: int
    world: int
    use_autocast: bool

    def __post_init__(self) -> None:
        self.params = [p for p in self.raw.parameters() if p.requires_grad]
        self.ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """One step's result. ``nonfinite``: the loss or the gradient norm was NaN/inf on some rank and
    no update was applied (``loss`` is then NaN when the loss was, ``grad_norm`` None)."""

    step: int
    lr: float
    loss: float
    grad_norm: float | None
    extras: dict[str, float]
    data_wait: float
    nonfinite: bool = False


def accumulate_gradients(
    parts: StepParts, generator: torch.Generator, inject_nan: bool = False
) -> tuple[torch.Tensor, dict[str, float], float]:
    """Forward and backward over ``parts.accum`` micro batches; returns (mean loss, mean extras,
    seconds spent waiting for batches).

    DDP all-reduces gradients in the backward of the last micro batch only (``no_sync`` on the
    others), so an accumulated step costs one all-reduce.
    """
    loss_sum = torch.zeros((), device=parts.device)
    extras: dict[str, float] = {}
    data_wait = 0.0
    for m in range(parts.accum):
        t_wait = time.perf_counter()
        batch = parts.data.next()
        data_wait += time.perf_counter() - t_wait
        sync = contextlib.nullcontext() if (not parts.ddp or m == parts.accum - 1) else parts.model.no_sync()
        with sync:
            with autocast(parts.device, parts.use_autocast):
                loss, extra = parts.task.loss(parts.model, batch, generator)
            if inject_nan:
                loss = loss * float("nan")
            (loss / parts.accum).backward()
        loss_sum += loss.detach().float()
        for k, v in extra.items():
            extras[k] = extras.get(k, 0.0) + float(v) / parts.accum
    return loss_sum / parts.accum, extras, data_wait


def agree_on_loss(step_loss: torch.Tensor, world: int) -> tuple[float, bool]:
    """(mean loss over ranks, whether any rank's loss was non-finite), the same on every rank.

    [loss, non-finite flag] is summed over ranks in one all-reduce, so every rank takes the same
    stop decision: a rank that stopped alone would leave the others waiting in the next all-reduce.
    """
    agree = torch.stack(
        [torch.nan_to_num(step_loss, nan=0.0, posinf=0.0, neginf=0.0), (~torch.isfinite(step_loss)).float()]
    )
    if world > 1:
        torch.distributed.all_reduce(agree)
    return agree[0].item() / world, agree[1].item() > 0


def train_step(parts: StepParts, cfg: TrainConfig, step: int, inject_nan: bool = False) -> StepOutcome:
    """Make optimizer step ``step`` (1-based, as checkpoints name it); no update when non-finite.

    The RNG is seeded from (seed, step, rank), so a step's noise does not depend on history and a
    resumed run repeats the uninterrupted one.
    """
    lr = lr_at(step - 1, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(step_seed(cfg.seed, step, parts.rank))  # e.g. label dropout inside the model
    generator = torch.Generator(device=parts.device).manual_seed(step_seed(cfg.seed, step, parts.rank) + 1)
    step_loss, extras, data_wait = accumulate_gradients(parts, generator, inject_nan)
    mean_loss, nonfinite = agree_on_loss(step_loss, parts.world)
    if nonfinite:
        return StepOutcome(step, lr, float("nan"), None, extras, data_wait, nonfinite=True)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        parts.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    )
    if not torch.isfinite(grad_norm):  # gradients are all-reduced: the same on every rank
        return StepOutcome(step, lr, mean_loss, float(grad_norm), extras, data_wait, nonfinite=True)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        update_ema(parts.ema, parts.raw, cfg.ema_decay)
    return StepOutcome(step, lr, mean_loss, float(grad_norm), extras, data_wait)
