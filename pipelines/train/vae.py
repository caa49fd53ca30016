"""A small diffusers ``AutoencoderKL`` trained on images: the ``TrainTask`` behind ``vitdit train vae``.

This is how the offline defaults get a real encoder (no pretrained VAE can be downloaded here). The
recipe is the one that worked for the 16 px digits (docs/facts.md): blocks (32, 64), one layer per block,
8 norm groups, 4 latent channels, L1 + L2 reconstruction + 1e-2 × per-element KL (1e-4 gave a
nearly deterministic latent that a DiT could not learn from). After training, ``scaling_factor`` is
set to 1 / std of the latents on the training images, as Stable Diffusion's VAE was calibrated, and
the model is written with ``save_pretrained`` to ``<output>/vae`` for ``vitdit encode --vae``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.train.loop import TrainConfig, TrainTask
from pipelines.train.vit import preprocessed_splits, to_model_input
from vitdit.errors import VitditError

log = logging.getLogger(__name__)

# Images used to measure the latents' std for scaling_factor (SD measured it on a batch; more is
# steadier and still cheap for a small VAE).
CALIBRATION_IMAGES = 2048


@dataclasses.dataclass
class VAETaskConfig:
    """Flags of ``vitdit train vae`` beyond the shared training flags."""

    images: str = dataclasses.field(
        metadata={"help": "image source (folder, .tar shards, parquet; local path or URI); "
                  "its train/ split when it has train/ and val/"}
    )  # fmt: skip
    val_images: str | None = dataclasses.field(
        default=None,
        metadata={"help": "validation images (default: <images>/val when it has train/ and val/)"},
    )
    resolution: int = dataclasses.field(default=16, metadata={"help": "image side in pixels"})
    block_out_channels: tuple[int, ...] = dataclasses.field(
        default=(32, 64),
        metadata={
            "help": "channels per encoder/decoder block, comma-separated; n blocks down-sample 2^(n-1)×"
        },
    )
    layers_per_block: int = dataclasses.field(default=1, metadata={"help": "resnet layers per block"})
    latent_channels: int = dataclasses.field(default=4, metadata={"help": "latent channels"})
    norm_num_groups: int = dataclasses.field(default=8, metadata={"help": "GroupNorm groups"})
    kl_weight: float = dataclasses.field(
        default=1e-2,
        metadata={"help": "weight of the per-element KL term (1e-4 made the latent near-deterministic)"},
    )
    hflip: bool = dataclasses.field(
        default=False, metadata={"help": "random horizontal flips; only where the domain allows (not digits)"}
    )


class VAEWithLoss(nn.Module):
    """encode → sample → decode in one ``forward``.

    DDP synchronises gradients only through the wrapped module's ``forward``, so calling
    ``vae.encode``/``vae.decode`` directly on a DDP-wrapped AutoencoderKL would train each worker
    alone. ``self.vae`` is the plain diffusers model (saved with ``save_pretrained``).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] → (reconstruction, posterior mean, posterior logvar)."""
        posterior = self.vae.encode(x).latent_dist
        dev = generator.device if generator is not None else posterior.mean.device
        noise = torch.randn(posterior.mean.shape, generator=generator, device=dev)
        z = posterior.mean + posterior.std * noise.to(posterior.mean)  # B, C, h, w
        recon = self.vae.decode(z).sample  # B, 3, H, W
        return recon, posterior.mean, posterior.logvar


def vae_loss(
    x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, kl_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + L2 reconstruction + kl_weight × KL(q(z|x) ‖ N(0, I)) averaged over latent elements."""
    recon, mean, logvar = recon.float(), mean.float(), logvar.float()
    l1 = (recon - x).abs().mean()
    l2 = F.mse_loss(recon, x)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + l2 + kl_weight * kl
    return loss, {"l1": l1.item(), "mse": l2.item(), "kl": kl.item()}


def build_autoencoder(cfg: VAETaskConfig, scaling_factor: float = 1.0):
    """The diffusers AutoencoderKL that ``cfg`` describes (randomly initialised)."""
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    if n < 1 or any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
        raise VitditError(
            f"--block-out-channels {cfg.block_out_channels}: need at least one block, each a multiple "
            f"of --norm-num-groups {cfg.norm_num_groups}"
        )
    down = 2 ** (n - 1)
    if cfg.resolution % down:
        raise VitditError(f"--resolution {cfg.resolution} is not divisible by the VAE's down-sampling {down}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.resolution,
        scaling_factor=scaling_factor,
        shift_factor=None,
    )


@torch.no_grad()
def measure_latent_std(
    vae, batches: Iterable[torch.Tensor], seed: int = 0, max_images: int | None = None
) -> float:
    """Std of posterior samples z = mean + std·ε over every element of ``batches`` (uint8 B×H×W×3).

    This is what the DiT trains on (docs/design.md: mean + std·ε), so 1/std brings it to unit variance.
    """
    gen = torch.Generator().manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    param = next(vae.parameters())
    for images in batches:
        x = to_model_input(images).to(param.device)
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=gen).to(post.mean)
        z = (post.mean + post.std * eps).double()
        total += float(z.sum())
        total_sq += float(z.pow(2).sum())
        count += z.numel()
        if max_images is not None and count // z[0].numel() >= max_images:
            break
    if count == 0:
        raise VitditError("no training images to calibrate the VAE's scaling_factor on")
    var = total_sq / count - (total / count) ** 2
    return float(var**0.5)


class VAETask(TrainTask):
    """Trains an AutoencoderKL; ``finalize`` calibrates ``scaling_factor`` and saves ``<output>/vae``."""

    kind = "vae"

    def __init__(self, cfg: VAETaskConfig, train_cfg: TrainConfig):
        self.cfg = cfg
        self.train_cfg = train_cfg
        if cfg.kl_weight < 0:
            raise VitditError(f"--kl-weight {cfg.kl_weight}: must be >= 0")
        build_autoencoder(cfg)  # validates the architecture flags on the driver, before Ray starts
        self.class_names: list[str] | None = None
        self.source: dict = {}

    # driver side ---------------------------------------------------------------------------------
    def datasets(self) -> dict:
        splits = preprocessed_splits(
            self.cfg.images,
            self.cfg.val_images,
            self.cfg.resolution,
            require_labels=False,
            seed=self.train_cfg.seed,
        )
        self.class_names = splits.class_names
        self.source = {"uri": splits.train_uri, "fingerprint": splits.fingerprint, "val_uri": splits.val_uri}
        self.num_train_rows = splits.num_train_rows
        return splits.datasets

    def model_config(self) -> dict:
        return {
            "kind": "vae",
            "model_name": "AutoencoderKL",
            "model_config": {
                k: v for k, v in build_autoencoder(self.cfg).config.items() if not k.startswith("_")
            },
            "class_names": self.class_names,
            "dataset": self.source,
            "resolution": self.cfg.resolution,
            "task": dataclasses.asdict(self.cfg),
        }

    def batch_columns(self) -> list[str] | None:
        return ["image"]

    # worker side ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return VAEWithLoss(build_autoencoder(self.cfg))

    def _input(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = to_model_input(images)
        if self.cfg.hflip and generator is not None:
            flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        return x

    def loss(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator):
        x = self._input(batch["image"], generator)
        recon, mean, logvar = model(x, generator)
        return vae_loss(x, recon, mean, logvar, self.cfg.kl_weight)

    @torch.no_grad()
    def validate(self, model, ema_model, batches: Iterable[dict]) -> dict[str, float]:
        """Reconstruction error of the posterior mean (deterministic) on held-out images."""
        inner = getattr(model, "module", model)
        vae = inner.vae
        l1 = mse = 0.0
        n = 0
        for batch in batches:
            x = to_model_input(batch["image"]).to(next(vae.parameters()).device)
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
            l1 += float((recon - x).abs().mean(dim=(1, 2, 3)).sum())
            mse += float((recon - x).pow(2).mean(dim=(1, 2, 3)).sum())
            n += x.shape[0]
        return {"val/l1": l1 / n, "val/mse": mse / n, "val/loss": l1 / n + mse / n} if n else {}

    def visualize(self, ema_model, step: int):
        return None

    def flops_per_sample(self, model) -> float:
        """Training FLOPs of one image: 3 × the forward FLOPs that torch's flop counter measures.

        A convolutional VAE has no closed-form count like the transformers' ``forward_macs``, so one
        forward on one zero image is counted (cheap: once per run, on rank 0's model).
        """
        from torch.utils.flop_counter import FlopCounterMode

        inner = getattr(model, "module", model)
        param = next(inner.parameters())
        x = torch.zeros(1, 3, self.cfg.resolution, self.cfg.resolution, device=param.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            inner(x)
        return 3.0 * float(counter.get_total_flops())

    def _final_vae(self, model, ema_model):
        if ema_model is not None and self.train_cfg.ema_decay > 0:
            return getattr(ema_model, "module", ema_model).vae
        return getattr(model, "module", model).vae

    def calibration_batches(self, batch_size: int = 256) -> Iterable[torch.Tensor]:
        """The training images (up to CALIBRATION_IMAGES), read again from the source.

        A fresh read, not this worker's shard: finalize runs on rank 0 alone, and a streaming shard
        consumed by one rank would leave the others' split waiting.
        """
        ds = self.datasets()["train"].select_columns(["image"]).limit(CALIBRATION_IMAGES)
        for batch in ds.iter_torch_batches(batch_size=batch_size):
            yield batch["image"]

    def finalize(self, model, ema_model, output_dir: str) -> dict:
        """Set ``scaling_factor`` = 1/std of the training latents and ``save_pretrained`` to <output>/vae."""
        vae = self._final_vae(model, ema_model)
        was_training = vae.training
        vae.eval()
        std = measure_latent_std(vae, self.calibration_batches(), seed=self.train_cfg.seed)
        vae.train(was_training)
        if not std > 0:
            raise VitditError(f"the trained VAE's latents have std {std}; cannot set scaling_factor")
        scaling = 1.0 / std
        vae.register_to_config(scaling_factor=scaling, shift_factor=None)
        out = save_vae(vae, output_dir)
        log.info("VAE saved to %s (latent std %.4f → scaling_factor %.4f)", out, std, scaling)
        return {"vae_dir": out, "scaling_factor": scaling, "latent_std": std}


def save_vae(vae, output_dir: str) -> str:
    """``save_pretrained`` to ``<output_dir>/vae`` (a local path or a pyarrow URI such as s3://...).

    Locally it is written beside and renamed into place, so a reader never sees a half-written vae/;
    for a URI it is written to a temp dir and uploaded (object stores have no rename).
    """
    import shutil
    import tempfile

    from pipelines import storage

    if storage.is_uri(output_dir):
        target = storage.join(output_dir, "vae")
        with tempfile.TemporaryDirectory(prefix="vitdit-vae-") as tmp:
            vae.save_pretrained(tmp)
            storage.copy_dir(tmp, target)  # object stores have no directories to create first
        return target
    out = os.path.join(output_dir, "vae")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    if os.path.exists(out):  # this run's own earlier save (a resumed or restarted run finalizing again)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
