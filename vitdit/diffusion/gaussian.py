"""Gaussian diffusion with ε-prediction: noise schedules, q/p distributions, one-step updates, losses.

The maths follows DDPM (Ho et al. 2020) and Improved DDPM (Nichol & Dhariwal 2021) as DiT trains
with it: linear or cosine β, a model that predicts ε and (with ``learn_sigma``) a per-pixel value
v ∈ [-1, 1] interpolating the log-variance between the posterior variance β̃_t and β_t
("learned range"), and the hybrid loss L_simple + L_vlb with the mean frozen in the VLB term.

Schedules are kept in float64 (as ADM keeps them in numpy float64) and coefficients are gathered per
timestep and cast to the sample's precision (float32 unless the sample is float64), so float32
sampling matches ADM and diffusers to float32 rounding.

The one-step updates here (``p_sample``, ``ddim_step``) take their noise as an argument; the loops
that draw noise and walk the timesteps live in :mod:`vitdit.diffusion.samplers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from vitdit.errors import VitditError

ModelFn = Callable[..., torch.Tensor]

NOISE_SCHEDULES = ("linear", "cosine")


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def linear_betas(num_steps: int) -> torch.Tensor:
    """DDPM's linear β from 1e-4 to 0.02, rescaled by 1000/num_steps as ADM and DiT do.

    The rescaling keeps ᾱ_T near zero for step counts other than 1000 (at 1000 it is the identity).
    """
    scale = 1000.0 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β clipped at 0.999.

    Clipping β keeps the last step from being singular (ᾱ(T) = 0 would make β_T = 1).
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def get_beta_schedule(name: str, num_steps: int) -> torch.Tensor:
    """β_0..β_{T-1} (float64) of the named schedule ("linear" or "cosine")."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise VitditError(f"diffusion_steps must be a positive integer, got {num_steps!r}")
    if name == "linear":
        return linear_betas(num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise VitditError(f"unknown noise_schedule {name!r}; expected one of {list(NOISE_SCHEDULES)}")


# ---------------------------------------------------------------------------------------------
# Densities used by the variational bound
# ---------------------------------------------------------------------------------------------


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) through the tanh approximation (Page 1977).

    Kept instead of the exact ``torch.special.ndtr`` because ADM and DiT train with it: the decoder
    NLL (and so the loss curve at t = 0) reproduces theirs.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of data in [-1, 1] quantised to 256 bins under N(means, e^{2 log_scales}).

    The edge bins extend to ±∞, as in DDPM's decoder L_0.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # The clamps keep log finite where a bin's probability underflows.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ---------------------------------------------------------------------------------------------
# The diffusion process
# ---------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A discrete Gaussian diffusion over ``len(betas)`` steps with an ε-predicting model.

    Args:
        betas: β per step (any 1-D sequence; stored as float64).
        learn_sigma: the model returns (B, 2C, ...) = ε and the learned-range value v ∈ [-1, 1];
            otherwise (B, C, ...) = ε with the fixed "large" variance β_t (DiT's choice).
        rescale_learned_sigmas: multiply the VLB term by ``num_timesteps / 1000`` (ADM's
            ``RESCALED_MSE``). DiT trains without it; at 1000 steps the factor is 1 either way.
        timestep_map: for a respaced diffusion, the original timestep of each of its steps; the
            model is always called with original timesteps, so one network serves every spacing.
        settings: the arguments that rebuild this object with ``create_diffusion`` (for configs).
    """

    def __init__(
        self,
        betas: torch.Tensor | Sequence[float],
        *,
        learn_sigma: bool = True,
        rescale_learned_sigmas: bool = False,
        timestep_map: torch.Tensor | Sequence[int] | None = None,
        settings: dict | None = None,
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() == 0:
            raise VitditError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise VitditError("betas must lie in (0, 1]")
        self.learn_sigma = learn_sigma
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.settings = dict(settings or {})
        self.num_timesteps = int(betas.numel())
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long)
        if self.timestep_map.shape != (self.num_timesteps,):
            raise VitditError(
                f"timestep_map has {self.timestep_map.numel()} entries for {self.num_timesteps} steps"
            )

        one = torch.ones(1, dtype=torch.float64)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, β̃_t),  β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: its log is replaced by β̃_1's, as ADM does, so the learned range at t = 0 (and the
        # decoder NLL) stays finite. diffusers clamps it to 1e-20 instead; only t = 0 differs.
        if self.num_timesteps > 1:
            first = self.posterior_variance[1:2]
        else:
            first = self.betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )
        # Fixed "large" variance (no learn_sigma): β_t, with β̃_1 at t = 0 for the same reason.
        self.fixed_log_variance = torch.log(torch.cat([first, betas[1:]]))
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"GaussianDiffusion(num_timesteps={self.num_timesteps}, learn_sigma={self.learn_sigma}, settings={self.settings})"

    # -- helpers --------------------------------------------------------------------------------

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Schedule ``name`` at timesteps ``t`` (B,), shaped (B, 1, ..., 1) to broadcast over ``like``."""
        key = (name, t.device)
        arr = self._on_device.get(key)
        if arr is None:
            src = getattr(self, name)
            # MPS has no float64; elsewhere gather in float64 and round once.
            arr = src.to(device=t.device, dtype=torch.float32 if t.device.type == "mps" else torch.float64)
            self._on_device[key] = arr
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        out = arr[t].to(dtype)
        return out.view(t.shape[0], *([1] * (like.ndim - 1)))

    def _check_t(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.shape != (batch,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise VitditError(f"timesteps t must be a tensor of shape ({batch},), got {shape}")
        return t.long()

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps the model sees for this diffusion's step indices ``t``."""
        key = ("timestep_map", t.device)
        if key not in self._on_device:
            self._on_device[key] = self.timestep_map.to(t.device)
        return self._on_device[key][t]

    def __getstate__(self) -> dict:
        # Drop the per-device copies: a pickled diffusion (e.g. sent to a Ray actor) must not carry
        # CUDA tensors to a process that may have no GPU.
        state = self.__dict__.copy()
        state["_on_device"] = {}
        return state

    def _call_model(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None):
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        channels = x.shape[1] * (2 if self.learn_sigma else 1)
        if out.shape != (x.shape[0], channels, *x.shape[2:]):
            raise VitditError(
                f"model output has shape {tuple(out.shape)}, expected {(x.shape[0], channels, *x.shape[2:])} "
                f"(learn_sigma={self.learn_sigma}: ε{' plus the variance value v' if self.learn_sigma else ''})"
            )
        return out

    # -- forward process ------------------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        t = self._check_t(t, x_start.shape[0])
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = 1.0 - self._extract("alphas_cumprod", t, x_start)
        return mean, variance, torch.log(variance)

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε."""
        t = self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise VitditError(f"noise shape {tuple(noise.shape)} differs from x_start {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        t = self._check_t(t, x_t.shape[0])
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        return (
            mean,
            self._extract("posterior_variance", t, x_t),
            self._extract("posterior_log_variance_clipped", t, x_t),
        )

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor
    ) -> torch.Tensor:
        """ε implied by x_t and a prediction of x_0."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # -- reverse process ------------------------------------------------------------------------

    def p_mean_variance_from_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output already computed at (x_t, t).

        Returns ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and ``eps``.
        """
        t = self._check_t(t, x_t.shape[0])
        channels = x_t.shape[1]
        if self.learn_sigma:
            eps, v = torch.split(model_output, channels, dim=1)
            # Learned range: interpolate log-variance between β̃_t (v = -1) and β_t (v = +1).
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("betas", t, x_t).log()
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output
            log_variance = self._extract("fixed_log_variance", t, x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self,
        model: ModelFn,
        x_t: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run the model at (x_t, t) and return p(x_{t-1} | x_t) (see ``p_mean_variance_from_output``)."""
        t = self._check_t(t, x_t.shape[0])
        out = self._call_model(model, x_t, t, model_kwargs)
        return self.p_mean_variance_from_output(out, x_t, t, clip_denoised)

    def p_sample(
        self,
        model: ModelFn,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} = mean + σ z (no noise where t == 0 or ``noise`` is None).

        Returns ``sample`` and ``pred_xstart``.
        """
        t = self._check_t(t, x_t.shape[0])
        out = self.p_mean_variance(model, x_t, t, model_kwargs, clip_denoised)
        sample = out["mean"]
        if noise is not None:
            nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
            sample = sample + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_step(
        self,
        model: ModelFn,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12) from this diffusion's step t to step t - 1.

        With a respaced diffusion the steps are the respaced ones, so "ddim50" gives 50-step DDIM.
        The learned variance channels, if any, are ignored (DDIM's σ comes from η).
        """
        t = self._check_t(t, x_t.shape[0])
        out = self.p_mean_variance(model, x_t, t, model_kwargs, clip_denoised)
        # Recompute ε from the (possibly clipped) x̂_0 so clipping stays consistent, as ADM does.
        eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"]) if clip_denoised else out["eps"]
        alpha_bar = self._extract("alphas_cumprod", t, x_t)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x_t)
        sigma = (
            eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt() * (1 - alpha_bar / alpha_bar_prev).sqrt()
        )
        sample = (
            out["pred_xstart"] * alpha_bar_prev.sqrt()
            + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
        )
        if noise is not None and eta > 0:
            nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
            sample = sample + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # -- losses ---------------------------------------------------------------------------------

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """One term of the variational bound per sample (B,), in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretised-Gaussian decoder
        NLL -log p(x_0 | x_1) at t = 0, both from a model output at (x_t, t).
        """
        t = self._check_t(t, x_t.shape[0])
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(
            2.0
        )
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses at timesteps ``t`` (B,): ``loss``, ``mse`` and, with learn_sigma, ``vb``.

        ``mse`` is L_simple = mean ‖ε - ε̂‖². With learn_sigma, ``vb`` is the VLB term of
        Improved DDPM's L_hybrid computed with ε̂ detached, so the VLB trains only the variance
        (Improved DDPM §3.1, as DiT trains); ``loss`` = mse + vb.
        """
        t = self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._call_model(model, x_t, t, model_kwargs)
        terms: dict[str, torch.Tensor] = {}
        if self.learn_sigma:
            eps, v = torch.split(model_output, x_t.shape[1], dim=1)
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            if self.rescale_learned_sigmas:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        else:
            eps = model_output
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
