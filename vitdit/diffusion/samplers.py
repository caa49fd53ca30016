"""Sampler loops over a denoiser, and classifier-free guidance as a model wrapper.

A sampler walks a (usually respaced) :class:`GaussianDiffusion` from its last step to step 0,
calling ``model_fn(x, t, **model_kwargs)`` once per step with the original timesteps. The loops
draw all randomness from ``generator``:

- one ``torch.Generator``: the step noise of the whole batch, drawn as diffusers draws it
  (``torch.randn(x.shape, generator=g)`` per step), so the loops reproduce diffusers' schedulers;
- a list of generators, one per row: row i's step noise comes from its own generator, so sample i
  depends only on its own seed and initial noise, whatever batch it sits in (the sampling job seeds
  row i from ``(seed, i)``).

The model is not put in eval mode here: DiT drops labels at random in training mode, so call
``model.eval()`` first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vitdit.diffusion.gaussian import GaussianDiffusion
from vitdit.errors import VitditError

Generators = torch.Generator | Sequence[torch.Generator] | None


def _check_generators(generator: Generators, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    gens = list(generator)
    if len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
        raise VitditError(
            f"generator must be one torch.Generator or a list of {batch} (one per sample), "
            f"got a list of {len(gens)}"
        )


def step_noise(
    shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) from ``generator`` (see the module docstring).

    Noise is drawn on the generator's device and then moved, so a CPU generator gives the same
    numbers whatever device the sample lives on.
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
    return torch.stack(rows)  # (B, ...)


def _steps(diffusion: GaussianDiffusion, progress: bool):
    indices = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(indices, desc="sampling", total=diffusion.num_timesteps)
    return indices


def ddpm_sample(
    model_fn: Callable[..., torch.Tensor],
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    model_kwargs: dict | None = None,
    generator: Generators = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Ancestral sampling (DDPM with learned or fixed variance) from x_T = ``noise`` to x_0.

    Use a respaced diffusion (``create_diffusion(timestep_respacing="250")``) for fewer steps.
    Step noise is drawn for every step but the last (t = 0 adds none), as diffusers' DDPMScheduler.
    """
    _check_generators(generator, noise.shape[0])
    x = noise
    with torch.no_grad():
        for i in _steps(diffusion, progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            z = step_noise(x.shape, generator, x.device, x.dtype) if i > 0 else None
            x = diffusion.p_sample(model_fn, x, t, z, model_kwargs, clip_denoised)["sample"]
    return x


def ddim_sample(
    model_fn: Callable[..., torch.Tensor],
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    model_kwargs: dict | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """DDIM sampling from x_T = ``noise`` over the diffusion's steps (N steps: respacing "ddimN").

    ``eta`` = 0 is deterministic; ``eta`` = 1 matches DDPM's posterior variance. With eta > 0 step
    noise is drawn at every step, as diffusers' DDIMScheduler draws it.
    """
    if eta < 0:
        raise VitditError(f"eta must be >= 0, got {eta}")
    _check_generators(generator, noise.shape[0])
    x = noise
    with torch.no_grad():
        for i in _steps(diffusion, progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            z = step_noise(x.shape, generator, x.device, x.dtype) if eta > 0 else None
            x = diffusion.ddim_step(model_fn, x, t, z, model_kwargs, eta, clip_denoised)["sample"]
    return x


def cfg_model(
    model: Callable[..., torch.Tensor],
    cfg_scale: float,
    null_class: int,
    guided_channels: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Classifier-free guidance: ``fn(x, t, y)`` = ε_uncond + s (ε_cond - ε_uncond).

    The conditional and unconditional passes run as one doubled batch (labels ``y`` then
    ``null_class``). The first ``guided_channels`` output channels are guided (default: all of x's
    channels, i.e. the whole ε, as diffusers' DiTPipeline does); the remaining channels (the
    learned-variance values, and with ``guided_channels=3`` DiT's unguided 4th latent channel, the
    quirk of its ``forward_with_cfg``) are taken from the conditional pass.
    """

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        channels = x.shape[1] if guided_channels is None else guided_channels
        if not 0 < channels <= x.shape[1]:
            raise VitditError(f"guided_channels must be in [1, {x.shape[1]}], got {guided_channels}")
        x_in = torch.cat([x, x])  # (2B, C, H, W)
        t_in = torch.cat([t, t])
        y_in = torch.cat([y, torch.full_like(y, null_class)])
        out = model(x_in, t_in, y_in)  # (2B, C_out, H, W)
        cond, uncond = out[:batch], out[batch:]
        eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return guided
