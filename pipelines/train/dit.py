"""DiT training on a latent data set: the DiT recipe at pre-extracted speed.

Each step samples ``z = mean + std·ε`` from the stored VAE posterior (and a random flip when the
data set has flips) and scales it with the manifest's VAE factors (``(z - shift) * scale``: never a
hard-coded 0.18215). Then, by ``--objective``:

- ``diffusion`` (the DiT paper): t uniform over 1000 steps and the hybrid loss of
  ``vitdit.diffusion`` (L_simple + the VLB term for the learned variance); DDIM sample grid.
- ``flow`` (rectified flow, SD3's objective, ``vitdit.diffusion.flow``): t from ``--flow-t-sampling``
  (shifted by ``--flow-shift``), the (weighted) MSE of the predicted velocity ``noise - x0``. The DiT
  has no learned variance (out channels = in channels) and gets ``1000·t``: its timestep embedding was
  made for DDPM's integer steps 0…999, and SD3 feeds its transformer ``1000·sigma`` the same way.
  The sample grid is the Euler sampler with classifier-free guidance.

Labels are dropped with the model's ``class_dropout_prob`` (classifier-free guidance); a data set
without class names trains an unconditional model (every label is the null class).

The objective goes into the checkpoint's ``config.json`` under ``"diffusion"`` (see
``DiTTask.objective_config``), so samplers can tell a flow checkpoint from a diffusion one.

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

from pipelines.train.latent_grid import LatentGridMixin
from pipelines.train.loop import TrainTask
from vitdit.diffusion.flow import T_SAMPLINGS, WEIGHTINGS
from vitdit.errors import VitditError
from vitdit.latents import FLIP_COLUMNS, ID, LABEL, MEAN, STD

log = logging.getLogger(__name__)

OBJECTIVES = ("diffusion", "flow")

#: A flow-trained DiT gets t·1000 (t in [0, 1]): its sinusoidal timestep embedding was sized for DDPM's
#: integer steps 0…999 (frequencies 1 down to 1e-4 rad per step); fed t itself, even the fastest
#: feature would turn less than a radian over the whole range, leaving the embedding nearly constant.
FLOW_TIMESTEP_SCALE = 1000.0


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
    objective: str = dataclasses.field(
        default="diffusion",
        metadata={
            "choices": list(OBJECTIVES),
            "help": "diffusion: DiT's ε-prediction with learned variance; flow: rectified flow (SD3)",
        },
    )
    noise_schedule: str = dataclasses.field(
        default="linear", metadata={"choices": ["linear", "cosine"], "help": "β schedule (diffusion only)"}
    )
    flow_t_sampling: str = dataclasses.field(
        default="logit_normal",
        metadata={"choices": list(T_SAMPLINGS), "help": "how flow training draws t (SD3 paper sec. 3.1)"},
    )
    flow_logit_mean: float = dataclasses.field(
        default=0.0, metadata={"help": "mean of logit(t) for --flow-t-sampling logit_normal"}
    )
    flow_logit_std: float = dataclasses.field(
        default=1.0, metadata={"help": "std of logit(t) for --flow-t-sampling logit_normal"}
    )
    flow_mode_scale: float = dataclasses.field(
        default=1.29, metadata={"help": "scale s of --flow-t-sampling mode, in [-1, 1.75]"}
    )
    flow_shift: float = dataclasses.field(
        default=1.0,
        metadata={
            "help": "t → shift·t/(1+(shift-1)·t) for training and the grid's sampler; > 1 favours noise "
            "(SD3's 1024-px models ship 3.0)"
        },
    )
    flow_weighting: str = dataclasses.field(
        default="none", metadata={"choices": list(WEIGHTINGS), "help": "flow loss weighting w(t) (SD3's)"}
    )
    vae: str | None = dataclasses.field(
        default=None, metadata={"help": "VAE to decode the sample grid (default: the manifest's)"}
    )
    grid_samples: int = dataclasses.field(
        default=16, metadata={"help": "samples in the logged grid; 0 turns it off"}
    )
    grid_steps: int = dataclasses.field(
        default=10, metadata={"help": "sampler steps of the grid (DDIM; Euler with --objective flow)"}
    )
    grid_cfg_scale: float = dataclasses.field(default=4.0, metadata={"help": "guidance scale of the grid"})


class DiTTask(LatentGridMixin, TrainTask):
    """A DiT on the latents of one data set (see the module docstring)."""

    kind = "dit"

    def __init__(self, args: DiTTrainConfig):
        from pipelines.latents import read_manifest
        from vitdit.models import get_preset, list_models

        if args.model not in list_models("dit"):
            raise VitditError(f"--model {args.model!r}: not a DiT preset; choose one of {list_models('dit')}")
        if not 0.0 <= args.val_fraction < 1.0:
            raise VitditError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
        if args.objective not in OBJECTIVES:
            raise VitditError(f"--objective {args.objective!r}: choose one of {list(OBJECTIVES)}")
        self.flow = None
        if args.objective == "flow":
            from vitdit.diffusion.flow import RectifiedFlow

            try:
                self.flow = RectifiedFlow(
                    t_sampling=args.flow_t_sampling,
                    logit_mean=args.flow_logit_mean,
                    logit_std=args.flow_logit_std,
                    mode_scale=args.flow_mode_scale,
                    shift=args.flow_shift,
                    weighting=args.flow_weighting,
                )
            except VitditError as e:
                raise VitditError(f"--objective flow: {e} (see the --flow-* flags)") from None
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
        if self.flow is not None:
            overrides["learn_sigma"] = False  # a velocity only: out channels = in channels
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
            "diffusion": self.objective_config(),
            "dataset": self.dataset_record(),
            "vae": dataclasses.asdict(m.vae),
        }

    def objective_config(self) -> dict[str, Any]:
        """config.json's ``"diffusion"``: ``{"objective": "diffusion", noise_schedule, learn_sigma,
        diffusion_steps}`` or ``{"objective": "flow", t_sampling, logit_mean, logit_std, mode_scale,
        shift, weighting, timestep_scale, learn_sigma}`` (a config without "objective" is diffusion)."""
        if self.flow is None:
            return {"objective": "diffusion", **self.diffusion_settings}
        return {
            "objective": "flow",
            **self.flow.config(),
            "timestep_scale": FLOW_TIMESTEP_SCALE,
            "learn_sigma": self.model_cfg.learn_sigma,
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
        x0 = self.sample_x0(batch, generator)
        labels = batch[LABEL].long().to(x0.device)
        null = self.model_cfg.num_classes
        labels = torch.where((labels < 0) | (labels >= null), torch.full_like(labels, null), labels)
        return x0, labels

    def _terms(
        self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms of the objective, t and noise drawn from ``generator``."""
        if self.flow is not None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            t = self.flow.sample_t(x0.shape[0], device=x0.device, generator=generator)
            return self.flow.training_losses(
                lambda x_t, t: model(x_t, t * FLOW_TIMESTEP_SCALE, y), x0, noise=noise, t=t
            )
        t = torch.randint(
            0, self.diffusion.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device
        )
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.diffusion.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x0, y = self._x0_and_labels(batch, generator)
        terms = self._terms(model, x0, y, generator)
        return terms["loss"].mean(), {"mse": float(terms["mse"].mean().detach())}

    def validate(self, model: nn.Module, ema_model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Loss of the model and of its EMA on held-out latents at fixed noise and timesteps."""
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(1234)
        totals = {"val/loss": 0.0, "val/mse": 0.0, "val/loss_ema": 0.0}
        n = 0
        for batch in batches:
            x0, y = self._x0_and_labels(batch, generator)
            state = generator.get_state()  # the EMA model sees the same noise and timesteps
            terms = self._terms(model, x0, y, generator)
            generator.set_state(state)
            ema_terms = self._terms(ema_model, x0, y, generator)
            b = x0.shape[0]
            totals["val/loss"] += float(terms["loss"].float().sum())
            totals["val/mse"] += float(terms["mse"].float().sum())
            totals["val/loss_ema"] += float(ema_terms["loss"].float().sum())
            n += b
        return {k: v / n for k, v in totals.items()} if n else {}

    def visualize(self, ema_model: nn.Module, step: int):
        """A fixed-seed grid of the EMA model (classes cycled), decoded with the VAE: DDIM, or with
        ``--objective flow`` the Euler sampler, both guided with ``--grid-cfg-scale``."""
        n = self.args.grid_samples
        if n <= 0:
            return None
        vae = self._load_vae()
        if vae is None:
            return None
        from vitdit.vae import decode_latents

        device = next(ema_model.parameters()).device
        cfg = self.model_cfg
        generator = torch.Generator(device=device).manual_seed(0)
        noise = torch.randn(
            (n, cfg.in_channels, cfg.input_size, cfg.input_size), generator=generator, device=device
        )
        null = torch.full((n,), cfg.num_classes, device=device)
        y = torch.arange(n, device=device) % cfg.num_classes if self.conditional else null
        with torch.autocast(device_type=device.type, enabled=False):
            if self.flow is not None:
                z = self._flow_grid_latents(ema_model, noise.float(), y, null)
            else:
                z = self._ddim_grid_latents(ema_model, noise.float(), y)
            images = decode_latents(vae, z, self.manifest.vae)
        from vitdit.samples import labeled_grid

        if self.conditional:  # a row per class, named
            return labeled_grid(images, y.tolist(), list(self.manifest.class_names))
        k = int(math.ceil(math.sqrt(n)))  # unconditional: a square of samples, rows named by first index
        return labeled_grid(images, [f"#{i // k * k}" for i in range(n)], max_per_row=k)

    def _ddim_grid_latents(self, ema_model: nn.Module, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from vitdit.diffusion import create_diffusion
        from vitdit.diffusion.samplers import cfg_model, ddim_sample

        cfg = self.model_cfg
        model_fn = (
            cfg_model(ema_model, self.args.grid_cfg_scale, null_class=cfg.num_classes)
            if self.conditional
            else ema_model
        )
        diffusion = create_diffusion(
            timestep_respacing=f"ddim{self.args.grid_steps}",
            noise_schedule=self.args.noise_schedule,
            learn_sigma=cfg.learn_sigma,
        )
        return ddim_sample(model_fn, diffusion, noise, model_kwargs={"y": y})

    def _flow_grid_latents(
        self, ema_model: nn.Module, noise: torch.Tensor, y: torch.Tensor, null: torch.Tensor
    ) -> torch.Tensor:
        from vitdit.diffusion.flow import cfg_velocity, euler_sample, scale_timesteps

        model_fn = scale_timesteps(ema_model, FLOW_TIMESTEP_SCALE)
        if self.conditional:
            scale = self.args.grid_cfg_scale

            def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return cfg_velocity(model_fn, x, t, y, null, scale)
        else:

            def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return model_fn(x, t, y)

        return euler_sample(velocity, noise, self.args.grid_steps, shift=self.flow.shift)

    def batch_columns(self) -> list[str] | None:
        return None  # datasets() already selected the tensor columns
