"""Gaussian diffusion for DiT (schedules, the hybrid loss, timestep respacing, samplers) and rectified
flow (``vitdit.diffusion.flow``: SD3's objective, its Euler sampler and velocity guidance).

Train with ``create_diffusion()`` (all 1000 steps); sample with a respaced one::

    from vitdit.diffusion import create_diffusion
    from vitdit.diffusion.samplers import cfg_model, ddim_sample, ddpm_sample

    train_diffusion = create_diffusion()                         # 1000 steps, learned sigma
    losses = train_diffusion.training_losses(model, x0, t, model_kwargs={"y": y})
    sample_diffusion = create_diffusion(timestep_respacing="250")  # DiT's 250-step DDPM
    x = ddpm_sample(cfg_model(model, 4.0, null_class=1000), sample_diffusion, noise,
                    model_kwargs={"y": y})
    x = ddim_sample(model, create_diffusion(timestep_respacing="ddim50"), noise, model_kwargs={"y": y})

    flow = RectifiedFlow()                                       # logit-normal t, no weighting
    losses = flow.training_losses(lambda x, t: model(x, 1000 * t, y), x0)
    x = euler_sample(lambda x, t: model(x, 1000 * t, y), noise, num_steps=50)
"""

from __future__ import annotations

from collections.abc import Sequence

from vitdit.diffusion.flow import (
    T_SAMPLINGS,
    WEIGHTINGS,
    RectifiedFlow,
    cfg_velocity,
    euler_sample,
    flow_sigmas,
    resolution_shift,
    scale_timesteps,
    shift_t,
)
from vitdit.diffusion.gaussian import NOISE_SCHEDULES, GaussianDiffusion, get_beta_schedule
from vitdit.diffusion.respace import respace_betas, space_timesteps
from vitdit.errors import VitditError


def create_diffusion(
    timestep_respacing: str | int | Sequence[int] | None = None,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
    rescale_learned_sigmas: bool = False,
) -> GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion with DiT's defaults.

    Args:
        timestep_respacing: None or "" for all ``diffusion_steps``; an int or a string such as
            "250" or "10,15,20" for evenly spread steps per section; "ddimN" for DDIM's strided N steps.
        noise_schedule: "linear" (β 1e-4 -> 0.02 at 1000 steps, scaled by 1000/steps) or "cosine".
        learn_sigma: the model outputs ε and a learned-range variance value (2C channels).
        diffusion_steps: T of the base (training) chain.
        rescale_learned_sigmas: scale the VLB term by T/1000 (ADM's RESCALED_MSE); DiT leaves it off.
    """
    if noise_schedule not in NOISE_SCHEDULES:
        raise VitditError(
            f"unknown noise_schedule {noise_schedule!r}; expected one of {list(NOISE_SCHEDULES)}"
        )
    base_betas = get_beta_schedule(noise_schedule, diffusion_steps)
    if isinstance(timestep_respacing, bool):
        raise VitditError(f"timestep_respacing must be a string or an int, got {timestep_respacing!r}")
    spacing = timestep_respacing if timestep_respacing not in (None, "") else diffusion_steps
    settings = {
        "timestep_respacing": "" if timestep_respacing is None else timestep_respacing,
        "noise_schedule": noise_schedule,
        "learn_sigma": learn_sigma,
        "diffusion_steps": diffusion_steps,
        "rescale_learned_sigmas": rescale_learned_sigmas,
    }
    if isinstance(settings["timestep_respacing"], Sequence) and not isinstance(
        settings["timestep_respacing"], str
    ):
        settings["timestep_respacing"] = ",".join(str(int(c)) for c in timestep_respacing)
    use_timesteps = space_timesteps(diffusion_steps, spacing)
    base = GaussianDiffusion(base_betas, learn_sigma=learn_sigma)
    betas, timestep_map = respace_betas(base.alphas_cumprod, use_timesteps)
    return GaussianDiffusion(
        betas,
        learn_sigma=learn_sigma,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_map=timestep_map,
        settings=settings,
    )


__all__ = [
    "T_SAMPLINGS",
    "WEIGHTINGS",
    "GaussianDiffusion",
    "RectifiedFlow",
    "cfg_velocity",
    "create_diffusion",
    "euler_sample",
    "flow_sigmas",
    "get_beta_schedule",
    "resolution_shift",
    "respace_betas",
    "scale_timesteps",
    "shift_t",
    "space_timesteps",
]
