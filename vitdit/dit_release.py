"""Loading a DiT: vitdit checkpoints and the facebookresearch/DiT release files.

The release ships plain ``.pt`` state dicts (``DiT-XL-2-256x256.pt``: the EMA weights) with no
config beside them; :func:`infer_release_config` reads the architecture back from the tensor
shapes. Since vitdit's DiT keeps the release's state-dict keys, those files load with
``strict=True``. A DiT training checkpoint of the release (``{"model", "ema", "opt", "args"}``)
also loads: its ``ema`` entry is used. Files load with ``weights_only=True`` (no pickled code).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from vitdit.errors import VitditError


def is_release_file(path: str) -> bool:
    """True for a ``.pt``/``.pth`` file (a facebookresearch/DiT state dict), not a checkpoint dir."""
    return os.path.isfile(path) and path.endswith((".pt", ".pth"))


def infer_release_config(state: dict[str, torch.Tensor]):
    """The DiTConfig of a facebookresearch/DiT state dict, read from its tensor shapes."""
    from vitdit.models import DIT_PRESETS, DiTConfig

    try:
        proj = state["x_embedder.proj.weight"]  # hidden, C, p, p
        hidden, in_channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
        num_patches = int(state["pos_embed"].shape[1])
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        out_channels = int(state["final_layer.linear.weight"].shape[0]) // (patch * patch)
        table = int(state["y_embedder.embedding_table.weight"].shape[0])
    except (KeyError, IndexError, ValueError) as e:
        raise VitditError(f"not a facebookresearch/DiT state dict (missing or odd key: {e})") from e
    heads = next(
        (c.num_heads for c in DIT_PRESETS.values() if (c.hidden_size, c.depth) == (hidden, depth)),
        hidden // 64,
    )
    # DiT keeps an extra null-class row in the label table when it trains with label dropout.
    num_classes = table - 1
    return DiTConfig(
        input_size=int(round(math.sqrt(num_patches))) * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        class_dropout_prob=0.1 if num_classes > 0 else 0.0,
        learn_sigma=out_channels == 2 * in_channels,
    )


def load_release_state(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a release ``.pt`` (the EMA weights of a training checkpoint)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - pickled code, or not a torch file at all
        raise VitditError(f"--checkpoint {path}: cannot load with weights_only=True ({e})") from e
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]  # a DiT training checkpoint rather than the release's plain EMA state dict
    if not isinstance(state, dict):
        raise VitditError(f"--checkpoint {path}: expected a state dict, got {type(state).__name__}")
    return state


def checkpoint_info(checkpoint: str) -> dict[str, Any]:
    """What a caller needs to know about a DiT checkpoint without building the model.

    {"path", "kind": "vitdit"|"release", "model_config" (dict), "class_names", "vae" (dict or None),
    "diffusion" (dict), "step", "mlflow" (dict or None)}.
    """
    from vitdit.checkpoint import read_config, resolve_checkpoint_dir

    if is_release_file(checkpoint):
        cfg = infer_release_config(load_release_state(checkpoint, mmap=True))
        return {
            "path": os.path.abspath(checkpoint),
            "kind": "release",
            "model_config": dataclasses.asdict(cfg),
            "class_names": [str(i) for i in range(cfg.num_classes)],
            "vae": None,
            "diffusion": {"learn_sigma": cfg.learn_sigma},
            "step": None,
            "mlflow": None,
        }
    if not os.path.exists(checkpoint):
        raise VitditError(f"--checkpoint {checkpoint}: no such file or directory")
    path = resolve_checkpoint_dir(checkpoint)
    config = read_config(path)
    if config.get("kind") != "dit":
        raise VitditError(f"--checkpoint {path}: a {config.get('kind')!r} checkpoint, not a DiT")
    mc = config["model_config"]
    return {
        "path": path,
        "kind": "vitdit",
        "model_config": mc,
        "class_names": config.get("class_names") or [str(i) for i in range(mc["num_classes"])],
        "vae": config.get("vae"),
        "diffusion": config.get("diffusion") or {},
        "step": config.get("step"),
        "mlflow": config.get("mlflow"),
    }


def load_dit(checkpoint: str, use_ema: bool = True) -> torch.nn.Module:
    """The DiT of a vitdit checkpoint (EMA weights by default) or of a DiT release ``.pt``, in eval mode."""
    from vitdit.checkpoint import load_model, resolve_checkpoint_dir
    from vitdit.models import model_from_config

    if is_release_file(checkpoint):
        state = load_release_state(checkpoint)
        model = model_from_config(infer_release_config(state))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise VitditError(f"--checkpoint {checkpoint}: weights do not fit the inferred DiT ({e})") from e
        return model.eval()
    model, _ = load_model(resolve_checkpoint_dir(checkpoint), use_ema=use_ema)
    return model


__all__ = ["checkpoint_info", "infer_release_config", "is_release_file", "load_dit", "load_release_state"]
