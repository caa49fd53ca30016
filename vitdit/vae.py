"""The VAE wrapper: load a diffusers AutoencoderKL, identify it, encode posteriors, decode latents.

Latent convention (the one training, sampling and the manifest share): the *scaled* latent is
``z = (raw - shift_factor) * scaling_factor``; both factors come from the VAE's own config and
travel in the manifest (``VAEIdentity``), never hard-coded (DiT's 0.18215 is SD-VAE's value).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from vitdit.errors import UnsafeCheckpointError, VitditError
from vitdit.latents import Manifest, VAEIdentity

# Weight files diffusers may save for a model; all that exist are hashed, in this order. Only
# safetensors are loaded: a pickled .bin can run code when unpickled.
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
)
_PICKLED_WEIGHT_FILES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub repo id (``name`` or ``org/name``): it exists, or it starts like a
    path (``/``, ``.``, ``~``, ``file://``), or it has more than one ``/``."""
    return (
        os.path.exists(os.path.expanduser(name_or_path))
        or name_or_path.startswith(("/", ".", "~", "file://"))
        or name_or_path.count("/") > 1
    )


def resolve_local_vae_dir(path: str) -> str:
    """The directory holding the VAE's config.json: ``path`` itself or its ``vae/`` subfolder
    (a full diffusers pipeline directory). Raises VitditError when neither is a diffusers VAE."""
    path = os.path.expanduser(path.removeprefix("file://"))
    if not os.path.exists(path):
        raise VitditError(f"--vae {path}: no such file or directory")
    if not os.path.isdir(path):
        raise VitditError(f"--vae {path}: not a directory (expected a diffusers AutoencoderKL directory)")
    for cand in (path, os.path.join(path, "vae")):
        cfg = os.path.join(cand, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as f:
                    raw = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise VitditError(f"--vae {path}: unreadable config.json ({e})") from e
            cls = raw.get("_class_name")
            if cls not in (None, "AutoencoderKL"):
                if cand == path and os.path.isfile(os.path.join(path, "vae", "config.json")):
                    continue  # a pipeline directory: its model_index.json-less root has another class
                raise VitditError(f"--vae {path}: config.json describes a {cls}, not an AutoencoderKL")
            if not any(os.path.isfile(os.path.join(cand, w)) for w in _WEIGHT_FILES):
                if any(os.path.isfile(os.path.join(cand, w)) for w in _PICKLED_WEIGHT_FILES):
                    raise UnsafeCheckpointError(
                        f"--vae {path}: only pickle-format weights (.bin), which can run code when loaded; "
                        "convert them to safetensors (diffusers: save_pretrained(safe_serialization=True))"
                    )
                raise VitditError(f"--vae {path}: config.json but no diffusers weights file in {cand}")
            return cand
    raise VitditError(
        f"--vae {path}: not a diffusers VAE directory (no config.json in it or in its vae/ subfolder)"
    )


def load_vae(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
):
    """Load an ``AutoencoderKL`` from a hub name (``stabilityai/sd-vae-ft-ema``) or a local
    diffusers directory, in eval mode on ``device``. Clear VitditError when it cannot be loaded."""
    from diffusers import AutoencoderKL

    if _looks_local(name_or_path):
        where = resolve_local_vae_dir(name_or_path)
        try:
            vae = AutoencoderKL.from_pretrained(where, torch_dtype=dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise VitditError(f"--vae {name_or_path}: cannot load an AutoencoderKL ({e})") from e
    else:
        try:
            vae = AutoencoderKL.from_pretrained(
                name_or_path, revision=revision, torch_dtype=dtype, use_safetensors=True
            )
        except (OSError, ValueError) as e:
            raise VitditError(
                f"--vae {name_or_path}: cannot load it from the Hugging Face hub ({str(e).splitlines()[0]}); "
                "offline, pass a local diffusers directory instead"
            ) from e
    return vae.to(device).eval().requires_grad_(False)


def weights_sha256(directory: str) -> str:
    """sha256 over the weight file(s) of a local diffusers model directory (names and bytes)."""
    h = hashlib.sha256()
    found = False
    for name in _WEIGHT_FILES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            found = True
            h.update(name.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    if not found:
        raise VitditError(f"{directory}: no diffusers weights file to hash")
    return h.hexdigest()


def vae_identity(vae, name_or_path: str, revision: str | None = None) -> VAEIdentity:
    """What identifies this VAE in a manifest; factors and channels come from ``vae.config``."""
    cfg = vae.config
    sha = None
    if _looks_local(name_or_path):
        sha = weights_sha256(resolve_local_vae_dir(name_or_path))
        name = os.path.abspath(os.path.expanduser(name_or_path.removeprefix("file://")))
    else:
        name = name_or_path
    shift = cfg.get("shift_factor", None) if isinstance(cfg, Mapping) else getattr(cfg, "shift_factor", None)
    return VAEIdentity(
        name_or_path=name,
        revision=revision,
        sha256=sha,
        scaling_factor=float(cfg.scaling_factor),
        shift_factor=None if shift is None else float(shift),
        latent_channels=int(cfg.latent_channels),
    )


def downsample_factor(vae) -> int:
    """Spatial down-sampling of the encoder: 2^(number of down blocks - 1) for AutoencoderKL."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    """C, H, W of the latent of a resolution×resolution image; VitditError if it does not divide."""
    f = downsample_factor(vae)
    if resolution % f:
        raise VitditError(
            f"--resolution {resolution}: must be a multiple of the VAE's down-sampling factor {f}"
        )
    return (int(vae.config.latent_channels), resolution // f, resolution // f)


@torch.no_grad()
def encode_posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of images ``x`` (N×3×H×W in [-1, 1]), both N×C×h×w, unscaled.

    The posterior is stored rather than one sample so that training draws a fresh sample every
    step (``mean + std * eps``), as the original DiT recipe does when it encodes on the fly.
    """
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.std


def _factors(identity_or_config: Any) -> tuple[float, float]:
    if isinstance(identity_or_config, Manifest):
        identity_or_config = identity_or_config.vae
    if isinstance(identity_or_config, VAEIdentity):
        scaling, shift = identity_or_config.scaling_factor, identity_or_config.shift_factor
    elif isinstance(identity_or_config, Mapping):
        scaling, shift = identity_or_config["scaling_factor"], identity_or_config.get("shift_factor")
    else:  # a diffusers config object or a VAE
        cfg = getattr(identity_or_config, "config", identity_or_config)
        scaling, shift = cfg.scaling_factor, getattr(cfg, "shift_factor", None)
    return float(scaling), float(shift or 0.0)


def scale_latents(raw: torch.Tensor, identity_or_config: Any) -> torch.Tensor:
    """Raw VAE latents → the scaled latents the DiT is trained on: ``(raw - shift) * scaling``."""
    scaling, shift = _factors(identity_or_config)
    return (raw - shift) * scaling


def unscale_latents(z: torch.Tensor, identity_or_config: Any) -> torch.Tensor:
    """Scaled latents → raw VAE latents: ``z / scaling + shift``."""
    scaling, shift = _factors(identity_or_config)
    return z / scaling + shift


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, identity_or_config: Any) -> torch.Tensor:
    """Decode *scaled* latents ``z`` (N×C×h×w) to images N×3×H×W in [-1, 1].

    ``identity_or_config`` gives the factors: a VAEIdentity, a Manifest, a mapping or the VAE itself.
    """
    param = next(vae.parameters())
    raw = unscale_latents(z.to(device=param.device, dtype=torch.float32), identity_or_config)
    images = vae.decode(raw.to(param.dtype)).sample
    return images.float().clamp(-1.0, 1.0)
