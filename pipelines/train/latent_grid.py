"""What the latent-diffusion tasks (DiT, MM-DiT) share: x0 drawn from the stored posterior, the data
set's record in config.json, and the VAE that decodes their sample grids.

The grid is optional: a VAE that cannot be loaded (an offline hub name, a moved directory) skips it
with one warning instead of failing a training run.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class LatentGridMixin:
    """Needs ``self.args.latents``, ``self.args.vae``, ``self.args.grid_samples`` and ``self.manifest``
    (the latent data set's)."""

    _vae = None
    _vae_failed = False

    def sample_x0(self, batch: dict, generator):
        """Scaled latents x0 = (mean + std·ε − shift)·scale, with a random flip when the data set
        stores flips (the DiT recipe at pre-extracted speed)."""
        import torch

        from vitdit.latents import MEAN, MEAN_FLIP, STD, STD_FLIP
        from vitdit.vae import scale_latents

        mean, std = batch[MEAN].float(), batch[STD].float()
        if self.manifest.flips and MEAN_FLIP in batch:
            flip = torch.rand(mean.shape[0], generator=generator, device=mean.device) < 0.5
            flip = flip.view(-1, 1, 1, 1)  # B, 1, 1, 1
            mean = torch.where(flip, batch[MEAN_FLIP].float(), mean)
            std = torch.where(flip, batch[STD_FLIP].float(), std)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return scale_latents(mean + std * eps, self.manifest.vae)

    def dataset_record(self) -> dict:
        """config.json "dataset": which latent data set the checkpoint trained on."""
        m = self.manifest
        return {
            "uri": self.args.latents,
            "fingerprint": m.source_fingerprint,
            "num_rows": m.num_rows,
            "resolution": m.resolution,
            "latent_shape": list(m.latent_shape),
            "flips": m.flips,
        }

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
