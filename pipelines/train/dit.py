"""DiT training on a latent data set: the DiT recipe at pre-extracted speed.

Each step samples ``z = mean + std·ε`` from the stored VAE posterior (and a random flip when the
data set has flips), scales it with the manifest's VAE factors (``(z - shift) * scale``: never a
hard-coded 0.18215), draws t uniformly and trains on the hybrid loss of ``vitdit.diffusion``
(L_simple + the VLB term for the learned variance). Labels are dropped with the model's
``class_dropout_prob`` (classifier-free guidance); a data set without class names trains an
unconditional model (every label is the null class).

Validation: the loss on held-out latents (``--val-latents``, else a ``--val-fraction`` slice chosen
by a hash of the row id) at fixed noise and timesteps, and a fixed-seed DDIM sample grid decoded
with the VAE named in the manifest (skipped with a log line when that VAE cannot be loaded).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from pipelines.train.loop import TrainTask
from vitdit.errors import VitditError
from vitdit.latents import FLIP_COLUMNS, ID, LABEL, MEAN, MEAN_FLIP, STD, STD_FLIP

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DiTTrainConfig:
    """Flags of ``vitdit train dit`` beyond the shared training flags."""

    latents: str = dataclasses.field(metadata={"help": "latent data set (output of `vitdit encode`)"})
    model: str = dataclasses.field(default="DiT-B/2", metadata={"help": "DiT preset, e.g. DiT-XL/2"})
    val_latents: str | None = dataclasses.field(
        default=None,
        metadata={"help": "held-out latent data set (default: a --val-fraction slice of --latents)"},
    )
    val_fraction: float = dataclasses.field(
        default=0.05, metadata={"help": "share of rows held out (by id hash) when --val-latents is not given"}
    )
    class_dropout_prob: float | None = dataclasses.field(
        default=None, metadata={"help": "label dropout for guidance (default: the preset's, 0.1)"}
    )
    noise_schedule: str = dataclasses.field(default="linear", metadata={"choices": ["linear", "cosine"]})
    vae: str | None = dataclasses.field(
        default=None, metadata={"help": "VAE to decode the sample grid (default: the manifest's)"}
    )
    grid_samples: int = dataclasses.field(
        default=16, metadata={"help": "samples in the logged grid; 0 turns it off"}
    )
    grid_steps: int = dataclasses.field(default=10, metadata={"help": "DDIM steps of the sample grid"})
    grid_cfg_scale: float = dataclasses.field(default=4.0, metadata={"help": "guidance scale of the grid"})


def image_grid(images: torch.Tensor, nrow: int):
    """N×3×H×W in [-1, 1] → one PIL image, ``nrow`` per row."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    canvas = torch.zeros((3, rows * h, nrow * w), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = pixels[i, :3]
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())  # H, W, 3


class DiTTask(TrainTask):
    """A DiT on the latents of one data set (see the module docstring)."""

    kind = "dit"

    def __init__(self, args: DiTTrainConfig):
        from pipelines.latents import read_manifest
        from vitdit.models import get_preset, list_models

        if args.model not in list_models("dit"):
            raise VitditError(f"--model {args.model!r}: not a DiT preset; choose one of {list_models('dit')}")
        if not 0.0 <= args.val_fraction < 1.0:
            raise VitditError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
        self.args = args
        self.manifest = read_manifest(args.latents)
        self.num_train_rows: int | None = self.manifest.num_rows
        self.val_manifest = read_manifest(args.val_latents) if args.val_latents else None
        if self.val_manifest is not None:
            self.val_manifest.check_compatible(
                vae=self.manifest.vae, latent_shape=tuple(self.manifest.latent_shape), where=args.val_latents
            )
        c, h, w = self.manifest.latent_shape
        if h != w:
            raise VitditError(f"--latents {args.latents}: latents {h}×{w} are not square")
        self.conditional = self.manifest.num_classes > 0
        overrides: dict[str, Any] = {
            "input_size": h,
            "in_channels": c,
            "num_classes": self.manifest.num_classes,  # 0 → unconditional: every label is the null class
        }
        if args.class_dropout_prob is not None:
            overrides["class_dropout_prob"] = args.class_dropout_prob
        if not self.conditional:
            # The null-class embedding must exist (it is the only one): keep a dropout > 0.
            overrides["class_dropout_prob"] = max(overrides.get("class_dropout_prob", 0.1), 0.1)
        self.model_cfg = get_preset(args.model, **overrides)
        self.diffusion_settings = {
            "noise_schedule": args.noise_schedule,
            "learn_sigma": self.model_cfg.learn_sigma,
            "diffusion_steps": 1000,
        }
        self._diffusion = None
        self._vae = None
        self._vae_failed = False

    # driver side ------------------------------------------------------------------------------

    def datasets(self) -> dict[str, Any]:
        from pipelines.latents import SplitById, read_latents

        cols = [LABEL, MEAN, STD, *(FLIP_COLUMNS if self.manifest.flips else ())]
        if self.args.val_latents:
            train, _ = read_latents(self.args.latents, columns=cols)
            val, _ = read_latents(self.args.val_latents, columns=[LABEL, MEAN, STD])
            return {"train": train.randomize_block_order(seed=0), "val": val}
        if self.args.val_fraction <= 0:
            train, _ = read_latents(self.args.latents, columns=cols)
            return {"train": train.randomize_block_order(seed=0)}
        full, _ = read_latents(self.args.latents, columns=[ID, *cols])
        # Parts are written in listing order, often class by class: a seeded block order plus the
        # trainer's local shuffle buffer keeps batches class-mixed.
        train = full.randomize_block_order(seed=0).map_batches(
            SplitById(self.args.val_fraction, want_val=False)
        )
        val = full.map_batches(SplitById(self.args.val_fraction, want_val=True)).select_columns(
            [LABEL, MEAN, STD]
        )
        return {"train": train, "val": val}

    def model_config(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model_name": self.args.model,
            "model_config": dataclasses.asdict(self.model_cfg),
            "class_names": list(m.class_names),
            "diffusion": dict(self.diffusion_settings),
            "dataset": {
                "uri": self.args.latents,
                "fingerprint": m.source_fingerprint,
                "num_rows": m.num_rows,
                "resolution": m.resolution,
                "latent_shape": list(m.latent_shape),
                "flips": m.flips,
            },
            "vae": dataclasses.asdict(m.vae),
        }

    # worker side ------------------------------------------------------------------------------

    @property
    def diffusion(self):
        if self._diffusion is None:
            from vitdit.diffusion import create_diffusion

            self._diffusion = create_diffusion(**self.diffusion_settings)
        return self._diffusion

    def build_model(self) -> nn.Module:
        from vitdit.models import model_from_config

        return model_from_config(self.model_cfg)

    def _x0_and_labels(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample scaled latents x0 = (mean + std·ε - shift)·scale (random flip when stored)."""
        from vitdit.vae import scale_latents

        mean, std = batch[MEAN].float(), batch[STD].float()
        if self.manifest.flips and MEAN_FLIP in batch:
            flip = torch.rand(mean.shape[0], generator=generator, device=mean.device) < 0.5
            flip = flip.view(-1, 1, 1, 1)  # B, 1, 1, 1
            mean = torch.where(flip, batch[MEAN_FLIP].float(), mean)
            std = torch.where(flip, batch[STD_FLIP].float(), std)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        x0 = scale_latents(mean + std * eps, self.manifest.vae)
        labels = batch[LABEL].long().to(mean.device)
        null = self.model_cfg.num_classes
        labels = torch.where((labels < 0) | (labels >= null), torch.full_like(labels, null), labels)
        return x0, labels

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x0, y = self._x0_and_labels(batch, generator)
        t = torch.randint(
            0, self.diffusion.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device
        )
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        terms = self.diffusion.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)
        return terms["loss"].mean(), {"mse": float(terms["mse"].mean().detach())}

    def validate(self, model: nn.Module, ema_model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Loss of the model and of its EMA on held-out latents at fixed noise and timesteps."""
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(1234)
        totals = {"val/loss": 0.0, "val/mse": 0.0, "val/loss_ema": 0.0}
        n = 0
        for batch in batches:
            x0, y = self._x0_and_labels(batch, generator)
            t = torch.randint(
                0, self.diffusion.num_timesteps, (x0.shape[0],), generator=generator, device=device
            )
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            terms = self.diffusion.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)
            ema_terms = self.diffusion.training_losses(ema_model, x0, t, model_kwargs={"y": y}, noise=noise)
            b = x0.shape[0]
            totals["val/loss"] += float(terms["loss"].float().sum())
            totals["val/mse"] += float(terms["mse"].float().sum())
            totals["val/loss_ema"] += float(ema_terms["loss"].float().sum())
            n += b
        return {k: v / n for k, v in totals.items()} if n else {}

    def _load_vae(self):
        if self._vae is None and not self._vae_failed:
            from vitdit.vae import load_vae

            where = self.args.vae or self.manifest.vae.name_or_path
            try:
                self._vae = load_vae(where)
            except Exception as e:  # offline hub name, moved directory: the grid is optional
                self._vae_failed = True
                log.warning("sample grid skipped: cannot load the VAE %s (%s)", where, e)
        return self._vae

    def warm_up(self) -> None:
        # Imports only (diffusers takes seconds): building the VAE would draw from torch's global
        # RNG, which the training thread seeds at every step.
        if self.args.grid_samples > 0:
            try:
                from diffusers import AutoencoderKL  # noqa: F401

                import vitdit.vae  # noqa: F401
            except Exception:  # the grid is optional: _load_vae says why it is skipped
                pass

    def visualize(self, ema_model: nn.Module, step: int):
        """A fixed-seed DDIM grid of the EMA model (classes cycled), decoded with the VAE."""
        n = self.args.grid_samples
        if n <= 0:
            return None
        vae = self._load_vae()
        if vae is None:
            return None
        from vitdit.diffusion import create_diffusion
        from vitdit.diffusion.samplers import cfg_model, ddim_sample
        from vitdit.vae import decode_latents

        device = next(ema_model.parameters()).device
        cfg = self.model_cfg
        generator = torch.Generator(device=device).manual_seed(0)
        noise = torch.randn(
            (n, cfg.in_channels, cfg.input_size, cfg.input_size), generator=generator, device=device
        )
        if self.conditional:
            y = torch.arange(n, device=device) % cfg.num_classes
            model_fn = cfg_model(ema_model, self.args.grid_cfg_scale, null_class=cfg.num_classes)
        else:
            y = torch.full((n,), cfg.num_classes, device=device)
            model_fn = ema_model
        diffusion = create_diffusion(
            timestep_respacing=f"ddim{self.args.grid_steps}",
            noise_schedule=self.args.noise_schedule,
            learn_sigma=cfg.learn_sigma,
        )
        with torch.autocast(device_type=device.type, enabled=False):
            z = ddim_sample(model_fn, diffusion, noise.float(), model_kwargs={"y": y})
            images = decode_latents(vae, z, self.manifest.vae)
        nrow = cfg.num_classes if self.conditional and cfg.num_classes <= n else int(math.ceil(math.sqrt(n)))
        return image_grid(images, nrow=max(1, nrow))

    def batch_columns(self) -> list[str] | None:
        return None  # datasets() already selected the tensor columns
