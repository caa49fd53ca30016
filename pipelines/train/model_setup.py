"""The model a worker trains: optimizer, precision (given, or measured on a CPU), gradient
checkpointing, torch.compile and DDP."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from pipelines.storage import join, write_json
from pipelines.train.task import PRECISION_NAME, PRECISIONS, TrainConfig, TrainTask
from vitdit.ema import unwrap_model
from vitdit.errors import VitditError

log = logging.getLogger(__name__)


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


def record_precision(
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


def settle_precision(
    task: TrainTask,
    raw: nn.Module,
    first_batch: Callable[[], dict[str, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    rank: int,
    world: int,
) -> tuple[str, dict[str, Any] | None]:
    """The precision every rank trains at, and rank 0's probe report when it was measured.

    "auto" on a CPU: rank 0 times each candidate on ``first_batch()`` and every rank takes its
    answer (ranks that trained at different precisions would all-reduce different gradients).
    """
    precision = resolve_precision(cfg.precision, device)
    if precision is not None:
        return precision, None
    probe_report = None
    if rank == 0:
        probe_report = probe_precision(task, raw, first_batch(), cfg, device)
        log.info(
            "precision auto -> %s (%s; probe %s s%s)", probe_report["precision"],
            probe_report["reason"], probe_report.get("seconds"), ", cached" if probe_report["cached"] else "",
        )  # fmt: skip
    choice = [probe_report["precision"] if probe_report else None]
    if world > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0], probe_report


def prepare_model(
    raw: nn.Module, precision: str, cfg: TrainConfig, device: torch.device, world: int
) -> nn.Module:
    """What the loop calls forward on: ``raw`` set up for ``precision``, checkpointed, compiled and
    wrapped in DDP as asked (``raw`` keeps the weights: the optimizer, EMA and checkpoints use it)."""
    prepare_for_precision(raw, precision, device)
    if cfg.grad_checkpointing:  # after the probe: a deep copy would keep calling raw's blocks
        enable_grad_checkpointing(raw)
    model = raw
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, move_to_device=False)
    return model
