"""vitdit: Vision Transformers and Diffusion Transformers trained at cluster scale on Ray.

The library package. Its modules import torch, diffusers, safetensors and numpy, never ray or
mlflow (``tests/test_imports.py`` checks it); ``import vitdit`` alone imports none of them. Ray stages live in ``pipelines``, entrypoints in ``jobs``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "get_preset", "list_models"]

_LAZY = {"create_model", "get_preset", "list_models"}


def __getattr__(name: str) -> Any:
    # The model functions load vitdit.models (and torch) on first use, not on `import vitdit`:
    # torch-free modules (vitdit.errors, vitdit.latents, vitdit.preprocess) are imported by Ray Data
    # UDFs, and each fresh Ray worker process that imports torch for nothing spends seconds on it.
    if name in _LAZY:
        from vitdit import models

        return getattr(models, name)
    raise AttributeError(f"module 'vitdit' has no attribute {name!r}")
