"""A tiny diffusers AutoencoderKL for tests (shared by both tiers, so it is not in a conftest)."""

from __future__ import annotations


def make_tiny_vae(path, latent_channels: int = 4, seed: int = 0):
    """A randomly initialised 2-block diffusers AutoencoderKL (2× down-sampling), saved to ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    )
    vae.save_pretrained(str(path))
    return str(path)
