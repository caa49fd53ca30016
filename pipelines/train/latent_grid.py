"""What the latent-diffusion tasks (DiT, MM-DiT) share for their sample grids: the VAE that decodes them.

The grid is optional: a VAE that cannot be loaded (an offline hub name, a moved directory) skips it
with one warning instead of failing a training run.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class LatentGridMixin:
    """Needs ``self.args.vae``, ``self.args.grid_samples`` and ``self.manifest`` (the latent data set's)."""

    _vae = None
    _vae_failed = False

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
