"""Rectified flow (the objective of Stable Diffusion 3), its Euler sampler and classifier-free guidance.

Data x0 and noise ε ~ N(0, I) are joined by a straight line, ``x_t = (1 - t)·x0 + t·ε`` with t in
[0, 1] (t = 0 is data, t = 1 is noise), and a network learns the velocity ``v = ε - x0`` along it
(SD3 paper, Esser et al. 2024, sec. 2). Sampling integrates ``dx/dt = v(x, t)`` from t = 1 down to 0.

Models here take ``t`` in [0, 1]. Networks whose timestep embedding was designed for integer DDPM
steps (DiT's, SD3's: diffusers passes ``timestep = 1000·sigma`` to its SD3 transformer) get
``1000·t``: wrap them with :func:`scale_timesteps`.

Train::

    flow = RectifiedFlow(t_sampling="logit_normal", shift=1.0)
    terms = flow.training_losses(lambda x, t: model(x, 1000 * t, y), x0)
    terms["loss"].mean().backward()

Sample (the sampler is :class:`diffusers.FlowMatchEulerDiscreteScheduler`'s Euler loop)::

    fn = scale_timesteps(model.eval(), 1000.0)
    x0 = euler_sample(lambda x, t: cfg_velocity(fn, x, t, y, null_y, 4.0), noise, num_steps=50)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vitdit.errors import VitditError

#: How training draws t (SD3 paper sec. 3.1): a logit-normal (``logit(t) ~ N(mean, std²)``), the
#: uniform of plain rectified flow, or "mode" sampling with heavy tails ``f_mode(u; s)``.
T_SAMPLINGS = ("logit_normal", "uniform", "mode")

#: Per-sample loss weights w(t), as diffusers' SD3 training script applies them to the velocity MSE:
#: "none" = 1, "sigma_sqrt" = t^-2 (its name notwithstanding), "cosmap" = 2 / (π (1 - 2t + 2t²)).
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

#: f_mode(u; s) = 1 - u - s·(cos²(πu/2) - 1 + u) is a monotone map of [0, 1] onto itself only for
#: s in [-1, 2/(π - 2)] (SD3 paper sec. 3.1).
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))

#: Drawn t stay this far inside (0, 1): sigma_sqrt's t^-2 must stay finite, and a uniform draw can be 0.
T_EPS = 1e-5

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift_t(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """``shift·t / (1 + (shift - 1)·t)`` (SD3 eq. 23): shift > 1 moves t towards noise (t = 1).

    The map fixes 0 and 1 and is monotone for shift > 0; shift = 1 is the identity.
    """
    t = torch.as_tensor(t)
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 4096) -> float:
    """The shift that keeps a schedule's signal-to-noise ratios at another resolution: ``sqrt(m/n)``.

    SD3 paper sec. 5.3.2: an image of n pixels whose timestep schedule is right, seen at m pixels,
    keeps the same per-pixel uncertainty at ``t_m = shift_t(t_n, sqrt(m/n))``. Here m =
    ``num_tokens``, the latent tokens of the resolution to sample (or train) at, and n =
    ``base_tokens``, those of the resolution the schedule was tuned for (shift 1 there); for a fixed
    VAE and patch size, token counts are proportional to pixel counts, so the ratio is the paper's.
    """
    if num_tokens <= 0 or base_tokens <= 0:
        raise VitditError(
            f"resolution_shift: num_tokens ({num_tokens}) and base_tokens ({base_tokens}) must be > 0"
        )
    return math.sqrt(num_tokens / base_tokens)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The Euler sampler's ``num_steps + 1`` noise levels, from 1 down to 0 (float32).

    Equal to ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift=shift)`` after
    ``set_timesteps(num_steps)``: ``num_steps`` levels spaced evenly between the scheduler's
    training extremes, shifted, then a final 0. Gotcha kept for agreement with SD3 pipelines: the
    lower extreme is itself an already shifted training level (``shift_t(1/1000)``), so the last
    nonzero level is shifted twice. The extremes are computed in float32 and the spacing in
    float64, as the scheduler does, so the levels agree bit for bit.
    """
    if num_steps < 1:
        raise VitditError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise VitditError(f"shift must be > 0, got {shift}")
    if num_train_timesteps < 1:
        raise VitditError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    # The scheduler's training levels k/T, k = T … 1, in float32, shifted once.
    ends = torch.tensor([float(num_train_timesteps), 1.0], dtype=torch.float32) / num_train_timesteps
    if shift != 1.0:
        ends = shift * ends / (1 + (shift - 1) * ends)
    sigma_max, sigma_min = (float(v) for v in ends)
    sigmas = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = sigmas / num_train_timesteps  # float64
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1, dtype=torch.float32)])


def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    num_steps: int,
    shift: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity_fn(x, t)`` from x = ``noise`` at t = 1 to t = 0 in ``num_steps``.

    Euler steps ``x ← x + (σ_{i+1} - σ_i)·v(x, σ_i)`` over :func:`flow_sigmas`, as diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``; ``velocity_fn`` gets ``t`` as a (B,) float32 tensor
    of σ_i. The state is kept in float32 (float64 if the noise is), whatever the model returns.
    Put DiT-style models in eval mode first (they drop labels at random in training mode).
    """
    sigmas = flow_sigmas(num_steps, shift).to(noise.device)
    x = noise if noise.dtype == torch.float64 else noise.float()
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", total=num_steps)
    with torch.no_grad():
        for i in steps:
            t = sigmas[i].expand(x.shape[0])  # B
            v = velocity_fn(x, t)
            if v.shape != x.shape:
                raise VitditError(f"velocity_fn returned shape {tuple(v.shape)} for x of {tuple(x.shape)}")
            x = x + (sigmas[i + 1] - sigmas[i]) * v.to(x.dtype)
    return x


def scale_timesteps(model_fn: Callable[..., torch.Tensor], scale: float) -> Callable[..., torch.Tensor]:
    """``fn(x, t, *args) = model_fn(x, scale·t, *args)``: a model with DDPM-step embeddings (scale 1000)
    as a velocity function of t in [0, 1]."""

    def scaled(x: torch.Tensor, t: torch.Tensor, *args: Any) -> torch.Tensor:
        return model_fn(x, t * scale, *args)

    return scaled


Cond = torch.Tensor | tuple[torch.Tensor, ...]


def _cat_conditions(cond: Cond, uncond: Cond, batch: int) -> Cond:
    """[cond; uncond] along the batch; an uncond row of batch 1 (one empty caption) is repeated."""
    is_tuple = isinstance(cond, (tuple, list))
    if is_tuple != isinstance(uncond, (tuple, list)):
        raise VitditError("cfg_velocity: cond and uncond must both be tensors or both tuples of tensors")
    conds = tuple(cond) if is_tuple else (cond,)
    unconds = tuple(uncond) if is_tuple else (uncond,)
    if len(conds) != len(unconds):
        raise VitditError(f"cfg_velocity: cond has {len(conds)} tensors, uncond {len(unconds)}")
    out = []
    for i, (c, u) in enumerate(zip(conds, unconds)):
        if c.shape[0] != batch:
            raise VitditError(f"cfg_velocity: cond[{i}] has batch {c.shape[0]}, x has {batch}")
        if u.shape[0] == 1 and batch > 1:
            u = u.expand(batch, *u.shape[1:])
        if u.shape != c.shape:
            raise VitditError(
                f"cfg_velocity: uncond[{i}] has shape {tuple(u.shape)}, cond[{i}] {tuple(c.shape)}"
            )
        out.append(torch.cat([c, u]))  # 2B, ...
    return tuple(out) if is_tuple else out[0]


def cfg_velocity(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor | float,
    cond: Cond,
    uncond: Cond,
    scale: float,
) -> torch.Tensor:
    """Classifier-free guidance of a velocity model: ``v_u + scale·(v_c - v_u)``.

    ``velocity_fn(x, t, c)`` runs once on the doubled batch ``[x; x]`` with conditions
    ``[cond; uncond]``. ``cond``/``uncond`` are tensors (class labels: uncond is the null class) or
    tuples of tensors (MM-DiT's ``(context, pooled)``: uncond is the empty caption's embedding, which
    may have batch 1). ``t`` is a float or a (B,) tensor.
    """
    batch = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise VitditError(f"cfg_velocity: t has shape {tuple(t.shape)}; expected ({batch},) or a scalar")
    c_in = _cat_conditions(cond, uncond, batch)
    out = velocity_fn(torch.cat([x, x]), torch.cat([t, t]), c_in)  # 2B, ...
    v_c, v_u = out[:batch], out[batch:]
    return v_u + scale * (v_c - v_u)


class RectifiedFlow:
    """The rectified-flow training objective with SD3's t samplings and loss weightings.

    Args:
        t_sampling: one of :data:`T_SAMPLINGS`.
        logit_mean, logit_std: the logit-normal's location and scale (SD3's best: 0, 1).
        mode_scale: s of "mode" sampling, in :data:`MODE_SCALE_RANGE` (SD3 paper: 1.29).
        shift: applied to every drawn t (:func:`shift_t`); > 1 trains more at high noise.
        weighting: one of :data:`WEIGHTINGS`.
    """

    def __init__(
        self,
        t_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        weighting: str = "none",
    ):
        if t_sampling not in T_SAMPLINGS:
            raise VitditError(f"t_sampling {t_sampling!r}: expected one of {list(T_SAMPLINGS)}")
        if weighting not in WEIGHTINGS:
            raise VitditError(f"weighting {weighting!r}: expected one of {list(WEIGHTINGS)}")
        if not logit_std > 0:
            raise VitditError(f"logit_std must be > 0, got {logit_std}")
        lo, hi = MODE_SCALE_RANGE
        if not lo <= mode_scale <= hi:
            raise VitditError(
                f"mode_scale {mode_scale} is outside [{lo}, {hi:.4f}], where f_mode maps onto [0, 1]"
            )
        if not shift > 0:
            raise VitditError(f"shift must be > 0, got {shift}")
        self.t_sampling = t_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.mode_scale = float(mode_scale)
        self.shift = float(shift)
        self.weighting = weighting

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (JSON-ready): ``RectifiedFlow(**flow.config())`` rebuilds it."""
        return {
            "t_sampling": self.t_sampling,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "mode_scale": self.mode_scale,
            "shift": self.shift,
            "weighting": self.weighting,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"RectifiedFlow({args})"

    def sample_t(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` training times in (0, 1) (float32), drawn by ``t_sampling`` then shifted."""
        if self.t_sampling == "logit_normal":
            # torch.normal with these arguments draws what diffusers' SD3 training draws.
            z = torch.normal(self.logit_mean, self.logit_std, size=(n,), device=device, generator=generator)
            u = torch.sigmoid(z)
        else:
            u = torch.rand((n,), device=device, generator=generator)
            if self.t_sampling == "mode":
                u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return shift_t(u, self.shift).clamp(T_EPS, 1 - T_EPS)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) of ``weighting`` (see :data:`WEIGHTINGS`), shape of ``t``."""
        if self.weighting == "sigma_sqrt":
            return t.float() ** -2.0
        if self.weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * t.float() + 2 * t.float() ** 2))
        return torch.ones_like(t, dtype=torch.float32)

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t)·x0 + t·noise``, ``t`` of shape (N,) broadcast over x0's other dims."""
        t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))  # N, 1, ...
        return (1 - t) * x0 + t * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity ``d x_t / dt = noise - x0``."""
        return noise - x0

    def training_losses(
        self,
        velocity_fn: VelocityFn,
        x0: torch.Tensor,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses of ``velocity_fn(x_t, t)`` against ``noise - x0``.

        ``noise`` and ``t`` are drawn from ``generator`` when not given (noise first, then t).
        Returns ``{"loss": w(t)·mse (N,), "mse": the unweighted mean squared error (N,), "t": t}``,
        computed in float32 whatever the model's output dtype.
        """
        n = x0.shape[0]
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise VitditError(f"noise has shape {tuple(noise.shape)}; x0 has {tuple(x0.shape)}")
        if t is None:
            t = self.sample_t(n, device=x0.device, generator=generator)
        elif t.shape != (n,):
            raise VitditError(f"t has shape {tuple(t.shape)}; expected ({n},), one time per sample")
        x_t = self.interpolate(x0, noise, t)
        v = velocity_fn(x_t, t)
        if v.shape != x0.shape:
            raise VitditError(f"velocity_fn returned shape {tuple(v.shape)} for x of {tuple(x0.shape)}")
        err = (v.float() - self.target(x0, noise).float()) ** 2
        mse = err.reshape(n, -1).mean(dim=1)  # N
        return {"loss": self.loss_weight(t) * mse, "mse": mse, "t": t}
