"""Training checkpoints: the layout of docs/design.md, written atomically, loaded without pickled code.

A checkpoint is a directory ``<run dir>/checkpoint_<step:08d>/``::

    config.json          what rebuilds the model and where it came from (see CONFIG_KEYS)
    model.safetensors    the trained weights (keys of the published checkpoints)
    ema.safetensors      the exponential moving average of the weights (what sampling uses)
    train_state.pt       optimizer, LR schedule, step, data epoch, RNG states: tensors, ints,
                         floats and strings only, so ``torch.load(weights_only=True)`` reads it

``save_checkpoint`` writes into a temporary sibling directory and renames it into place, so a
reader (or a restart after SIGKILL) never sees a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import uuid
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from vitdit.errors import UnsafeCheckpointError, VitditError

CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
TRAIN_STATE_NAME = "train_state.pt"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8,})$")
# Keys every config.json carries (training fills them; ``None`` where they do not apply).
CONFIG_KEYS = (
    "kind",
    "model_name",
    "model_config",
    "step",
    "class_names",
    "diffusion",
    "dataset",
    "vae",
    "mlflow",
    "vitdit_version",
)


def checkpoint_name(step: int) -> str:
    """``checkpoint_<step:08d>``: names sort in step order."""
    return f"checkpoint_{step:08d}"


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: config.json, the two state dicts and the training state."""

    config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    train_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.train_state.get("step", self.config.get("step", 0)))


def _tensors_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous tensors and tensors that share storage: copy to plain CPU
    # tensors (a state dict of a trained model is small next to the time this saves).
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    directory: str | os.PathLike,
    config: dict[str, Any],
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    train_state: dict[str, Any],
) -> str:
    """Write a checkpoint directory atomically (temp dir, then rename); returns its path.

    An existing directory of the same name (a step re-done after a restart) is replaced.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        save_file(
            _tensors_for_safetensors(model_state), os.path.join(tmp, MODEL_NAME), metadata={"format": "pt"}
        )
        if ema_state is not None:
            save_file(
                _tensors_for_safetensors(ema_state), os.path.join(tmp, EMA_NAME), metadata={"format": "pt"}
            )
        torch.save(train_state, os.path.join(tmp, TRAIN_STATE_NAME))
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=_json_default)
        for name in os.listdir(tmp):  # durable before the rename makes it visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(directory):
            old = os.path.join(parent, f".{os.path.basename(directory)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"config value of type {type(obj).__name__} is not JSON serialisable")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint directory."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise VitditError(f"{os.fspath(directory)}: not a checkpoint (no {CONFIG_NAME})")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise VitditError(f"{path}: not valid JSON ({e})") from e


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """train_state.pt with ``weights_only=True``: a file that needs pickled code is refused."""
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{os.fspath(path)}: refusing to load, it needs pickled code or objects beyond tensors "
            f"and plain values ({str(e).splitlines()[0]})"
        ) from e


def load_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint`."""
    directory = os.fspath(directory)
    config = read_config(directory)
    model_path = os.path.join(directory, MODEL_NAME)
    if not os.path.isfile(model_path):
        raise VitditError(f"{directory}: checkpoint has no {MODEL_NAME}")
    ema_path = os.path.join(directory, EMA_NAME)
    state_path = os.path.join(directory, TRAIN_STATE_NAME)
    return Checkpoint(
        config=config,
        model_state=load_file(model_path),
        ema_state=load_file(ema_path) if os.path.isfile(ema_path) else None,
        train_state=load_train_state(state_path) if os.path.isfile(state_path) else {},
    )


def load_model(ckpt_dir: str | os.PathLike, use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a ViT, DiT or MM-DiT checkpoint and load its (EMA) weights; returns (model, config).

    The model is in eval mode on the CPU.
    """
    from vitdit.models import config_from_dict, model_from_config

    ckpt_dir = os.fspath(ckpt_dir)
    config = read_config(ckpt_dir)
    kind = config.get("kind")
    if kind not in ("vit", "dit", "mmdit"):
        raise VitditError(
            f"{ckpt_dir}: checkpoint kind {kind!r} has no model to rebuild (expected vit, dit or mmdit)"
        )
    if kind == "mmdit" and (config.get("text") or {}).get("kind") == "own":
        from vitdit.models.text_tower import tower_from_config

        model = tower_from_config(config)  # the MM-DiT with the text tower it trained with
    else:
        model = model_from_config(config_from_dict(kind, config["model_config"]))
    name = EMA_NAME if use_ema and os.path.isfile(os.path.join(ckpt_dir, EMA_NAME)) else MODEL_NAME
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(path):
        raise VitditError(f"{ckpt_dir}: checkpoint has no {name}")
    try:
        model.load_state_dict(load_file(path), strict=True)
    except RuntimeError as e:
        raise VitditError(f"{path}: weights do not match the model in config.json ({e})") from e
    return model.eval(), config


# --- finding checkpoints and retention ---------------------------------------------------------


def checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint_<step>`` directory name, else None."""
    m = CHECKPOINT_RE.match(os.path.basename(name.rstrip("/")))
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints under a local run directory as (step, path), oldest first."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        step = checkpoint_step(name)
        if step is not None and os.path.isfile(os.path.join(run_dir, name, CONFIG_NAME)):
            out.append((step, os.path.join(run_dir, name)))
    return sorted(out)


def resolve_checkpoint_dir(path: str | os.PathLike) -> str:
    """A checkpoint directory as given, or the latest checkpoint of a run directory."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise VitditError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")
    return found[-1][1]


def steps_to_delete(steps: list[int], keep_last: int, keep_every: int = 0) -> list[int]:
    """Retention: keep the last ``keep_last`` steps plus every multiple of ``keep_every`` (> 0)."""
    ordered = sorted(steps)
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in keep]


def apply_retention(run_dir: str | os.PathLike, keep_last: int, keep_every: int = 0) -> list[str]:
    """Delete the checkpoints of a local run directory that retention does not keep; returns them."""
    found = dict(list_checkpoints(run_dir))
    deleted = []
    for step in steps_to_delete(list(found), keep_last, keep_every):
        shutil.rmtree(found[step], ignore_errors=True)
        deleted.append(found[step])
    return deleted


# --- RNG states as tensors and ints (numpy's own state object does not load with weights_only) ---


def capture_rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and python RNG states as tensors, ints and floats."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
