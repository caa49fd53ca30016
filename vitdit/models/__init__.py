"""Model registry: presets keyed by the papers' names plus tiny presets for tests.

``create_model("DiT-XL/2")`` or ``create_model("ViT-B/16", num_classes=10)``: the preset is a frozen
dataclass and overrides go through ``dataclasses.replace``, so every model carries the exact config
that rebuilds it (``model.config``), which checkpoints store as JSON.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from vitdit.models.dit import DIT_PRESETS, DiT, DiTConfig
from vitdit.models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig
from vitdit.models.vit import VIT_PRESETS, ViT, ViTConfig

_MODEL_CLASSES = {ViTConfig: ViT, DiTConfig: DiT, MMDiTConfig: MMDiT}


def _all_presets() -> dict:
    return {**VIT_PRESETS, **DIT_PRESETS, **MMDIT_PRESETS}


def list_models(kind: str | None = None) -> list[str]:
    """Preset names, optionally only ``kind`` in {"vit", "dit", "mmdit"}."""
    if kind is None:
        return list(_all_presets())
    table = {"vit": VIT_PRESETS, "dit": DIT_PRESETS, "mmdit": MMDIT_PRESETS}
    if kind not in table:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(table)}")
    return list(table[kind])


def get_preset(name: str, **overrides):
    """The preset's config dataclass with ``overrides`` applied."""
    presets = _all_presets()
    if name not in presets:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(presets)}")
    return dataclasses.replace(presets[name], **overrides) if overrides else presets[name]


def model_from_config(config) -> nn.Module:
    """Build the model class that matches a config dataclass."""
    return _MODEL_CLASSES[type(config)](config)


def config_from_dict(kind: str, values: dict):
    """Rebuild a config dataclass from its ``dataclasses.asdict`` form (as stored in config.json)."""
    cls = {"vit": ViTConfig, "dit": DiTConfig, "mmdit": MMDiTConfig}[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in fields}
    return cls(**kwargs)


def create_model(name: str, **overrides) -> nn.Module:
    """A ViT, DiT or MM-DiT (randomly initialised as its paper does) from a preset name."""
    return model_from_config(get_preset(name, **overrides))


__all__ = [
    "DIT_PRESETS",
    "MMDIT_PRESETS",
    "VIT_PRESETS",
    "DiT",
    "DiTConfig",
    "MMDiT",
    "MMDiTConfig",
    "ViT",
    "ViTConfig",
    "config_from_dict",
    "create_model",
    "get_preset",
    "list_models",
    "model_from_config",
]
