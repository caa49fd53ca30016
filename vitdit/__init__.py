"""vitdit: Vision Transformers and Diffusion Transformers trained at cluster scale on Ray.

The library package. It imports torch, diffusers, safetensors and numpy, never ray or mlflow
(``tests/test_imports.py`` checks it). Ray stages live in ``pipelines``, entrypoints in ``jobs``.
"""

from vitdit.models import create_model, get_preset, list_models

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "get_preset", "list_models"]
