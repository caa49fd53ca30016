"""Exponential moving average of model weights (DiT: decay 0.9999, updated after every step)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen fp32 copy of ``model`` in eval mode (the copy EMA updates write into)."""
    ema = copy.deepcopy(unwrap_model(model)).float().eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for every parameter; buffers are copied."""
    src = unwrap_model(model)
    ema_params = dict(ema.named_parameters())
    model_params = [(name, p) for name, p in src.named_parameters()]
    targets = [ema_params[name] for name, _ in model_params]
    sources = [p.detach().to(targets[i].dtype) for i, (_, p) in enumerate(model_params)]
    torch._foreach_lerp_(targets, sources, 1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in src.named_buffers():
        if name in ema_buffers:
            ema_buffers[name].copy_(b)
