"""Gaussian diffusion and samplers against diffusers' schedulers and direct computations.

Spacing conventions (how our ADM-style respacing lines up with diffusers):
- Full 1000-step chains: ``DDPMScheduler.set_timesteps(1000)`` gives 999..0, our unspaced chain.
- Respaced DDPM ("250"): ADM spreads 250 steps over [0, 999] with both ends included and
  round-half-even, which is diffusers' ``timestep_spacing="linspace"``; diffusers' DDPM then steps
  from each kept timestep to the previous kept one, which is exactly our respaced β.
- DDIM ("ddim50"): ``range(0, 1000, 20)``, which is diffusers' DDIMScheduler default
  ``timestep_spacing="leading"`` with ``steps_offset=0``, ``set_alpha_to_one=True`` (ᾱ_prev = 1
  after the last step, as our ᾱ_prev[0] = 1).
- t = 0: ADM replaces the zero posterior variance by β̃_1 in the log, diffusers clamps it to 1e-20,
  so learned-range *variances* are compared for t > 0 only; the samples agree at t = 0 as well,
  because neither adds noise there.
"""

from __future__ import annotations

import math
import pickle
import time

import pytest
import torch
from _tolerance import DIT_TEST_LAYERS, DIT_TEST_N, U_FP32, reassociation_rtol, reassociation_tol
from diffusers import DDIMScheduler, DDPMScheduler

import vitdit
from vitdit.diffusion import create_diffusion, get_beta_schedule, space_timesteps
from vitdit.diffusion.gaussian import mean_flat
from vitdit.diffusion.samplers import cfg_model, ddim_sample, ddpm_sample
from vitdit.errors import VitditError

C, H, W = 4, 8, 8

# diffusers keeps its schedule in float32 and forms 1 - ᾱ_t (and 1 - ᾱ_t/ᾱ_{t-1}) there: at the first
# step that difference is β_0 = 1e-4 and keeps only u/β_0 ≈ 6e-4 of relative accuracy (fp32 u = 2^-24),
# which the coefficients and samples built from it inherit; ours are float64, rounded once.
DIFFUSERS_RTOL = U_FP32 / 1e-4


def _vs_diffusers(ref: torch.Tensor) -> dict[str, float]:
    """DIFFUSERS_RTOL, and as absolute error that much of the largest compared value (an element
    near zero is the cancellation of terms as large as that, and keeps their error)."""
    return {"rtol": DIFFUSERS_RTOL, "atol": DIFFUSERS_RTOL * ref.abs().max().item()}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models run faster so on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """A fixed nonlinear ε-and-v predictor: per-pixel, so each row depends only on its own input."""
    scale = (1.0 + t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1)
    eps = 0.8 * torch.tanh(0.7 * x * scale) + 0.1 * torch.sin(3.0 * x)
    if y is not None:
        eps = eps + 0.05 * y.to(x.dtype).view(-1, 1, 1, 1)
    v = torch.tanh(x.flip(-1))  # the learned-range value in [-1, 1]
    return torch.cat([eps, v], dim=1)  # (B, 2C, H, W)


def _ddpm_scheduler(**kw) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        **{"variance_type": "learned_range", "clip_sample": False, **kw},
    )


def _ddim_scheduler(clip_sample: bool = False) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=clip_sample,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """DiT zero-initialises its adaLN and output layers; give every weight a random value instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Schedules, posterior, single steps
# ---------------------------------------------------------------------------------------------


def test_schedules_match_diffusers():
    d = create_diffusion()
    ref = _ddpm_scheduler()
    assert d.num_timesteps == 1000
    # diffusers' fp32 linspace (start + i·step: ≤ 3 roundings) against our float64 rounded once: ≤ 4u, ×4.
    torch.testing.assert_close(d.betas.float(), ref.betas, rtol=16 * U_FP32, atol=0)
    # diffusers' ᾱ is a running product of 1000 fp32 factors: the roundings add like a length-1000 sum.
    torch.testing.assert_close(
        d.alphas_cumprod.float(), ref.alphas_cumprod, rtol=reassociation_rtol(1000), atol=0
    )

    cos = create_diffusion(noise_schedule="cosine")
    ref_cos = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    # Both computed in float64 and rounded once to fp32: at most one fp32 ulp (2u) apart, ×2.
    torch.testing.assert_close(cos.betas.float(), ref_cos.betas, rtol=4 * U_FP32, atol=0)
    assert cos.betas.max().item() == pytest.approx(0.999)  # the clip on the last step

    # ADM/DiT scale the linear endpoints by 1000/T for other step counts.
    b = get_beta_schedule("linear", 250)
    assert b[0].item() == pytest.approx(4e-4) and b[-1].item() == pytest.approx(0.08)
    with pytest.raises(VitditError, match="noise_schedule"):
        create_diffusion(noise_schedule="quadratic")


@pytest.mark.parametrize("respacing", ["", "250"])
def test_posterior_and_learned_range_step_match_diffusers(respacing):
    d = create_diffusion(timestep_respacing=respacing)
    ref = _ddpm_scheduler(timestep_spacing="linspace")
    ref.set_timesteps(d.num_timesteps)
    # Our step k runs the model at the original timestep timestep_map[k]; diffusers walks the same list.
    assert torch.equal(ref.timesteps.flip(0), d.timestep_map)

    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, C, H, W, generator=g)
    for k in [d.num_timesteps - 1, d.num_timesteps // 2, 1, 0]:
        t_orig = int(d.timestep_map[k])
        t = torch.full((3,), k, dtype=torch.long)
        out = toy_model(x_t, torch.full((3,), t_orig))
        eps, v = out.split(C, dim=1)
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(k))
        ours = d.p_sample(toy_model, x_t, t, noise=z)
        theirs = ref.step(out, t_orig, x_t, generator=torch.Generator().manual_seed(k))
        pred_x0 = theirs.pred_original_sample
        torch.testing.assert_close(ours["pred_xstart"], pred_x0, **_vs_diffusers(pred_x0))  # fp32 schedule
        torch.testing.assert_close(ours["sample"], theirs.prev_sample, **_vs_diffusers(theirs.prev_sample))
        if k == 0:
            continue  # diffusers clamps β̃_0 to 1e-20 (see the module docstring)
        # The posterior q(x_{t-1} | x_t, x_0) itself, at x_0 = the prediction. diffusers' β̃_t =
        # (1 - ᾱ_{t-1})/(1 - ᾱ_t)·(1 - ᾱ_t/ᾱ_{t-1}) has two fp32 differences of size β: 2·DIFFUSERS_RTOL.
        mean, var, _ = d.q_posterior_mean_variance(ours["pred_xstart"], x_t, t)
        fixed_small = ref._get_variance(t_orig, variance_type="fixed_small")
        torch.testing.assert_close(
            var.flatten(), fixed_small.expand(3).float(), rtol=2 * DIFFUSERS_RTOL, atol=0
        )
        pmv = d.p_mean_variance(toy_model, x_t, t)
        torch.testing.assert_close(pmv["mean"], mean)  # the same code on the same inputs (fp32 defaults)
        log_var_ref = ref._get_variance(t_orig, predicted_variance=v)
        # A relative error δ of a variance is an absolute error δ of its log (2δ: β̃ as above).
        torch.testing.assert_close(pmv["log_variance"], log_var_ref, rtol=0, atol=2 * DIFFUSERS_RTOL)
        # Same model at the same original timestep: eps recovered from x̂_0 equals the model's ε.
        # ε = (x_t/√ᾱ_t - x̂_0)/√(1/ᾱ_t - 1) amplifies the fp32 roundings of its two terms (~u·|x_t|/√ᾱ_t
        # each) by 1/√(1/ᾱ_t - 1): u·|x_t|/√(1 - ᾱ_t) per rounding; 4 roundings, ×8 margin.
        abar = d.alphas_cumprod[k].item()
        eps_atol = 32 * U_FP32 * x_t.abs().max().item() / math.sqrt(1 - abar)
        torch.testing.assert_close(
            d.predict_eps_from_xstart(x_t, t, pmv["pred_xstart"]), eps, rtol=0, atol=eps_atol
        )


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(eta):
    d = create_diffusion(timestep_respacing="ddim50")
    ref = _ddim_scheduler()
    ref.set_timesteps(50)
    assert torch.equal(ref.timesteps.flip(0), d.timestep_map)
    x_t = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(1))
    for k in [49, 25, 1, 0]:
        t_orig = int(d.timestep_map[k])
        out = toy_model(x_t, torch.full((2,), t_orig))
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(100 + k))
        ours = d.ddim_step(toy_model, x_t, torch.full((2,), k), noise=z, eta=eta)
        theirs = ref.step(out[:, :C], t_orig, x_t, eta=eta, generator=torch.Generator().manual_seed(100 + k))
        torch.testing.assert_close(ours["sample"], theirs.prev_sample, **_vs_diffusers(theirs.prev_sample))


# ---------------------------------------------------------------------------------------------
# Whole loops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta,clip", [(0.0, False), (1.0, False), (0.0, True)])
def test_ddim_loop_matches_diffusers_loop(eta, clip):
    d = create_diffusion(timestep_respacing="ddim50")
    noise = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(2))
    ours = ddim_sample(
        toy_model, d, noise, eta=eta, generator=torch.Generator().manual_seed(3), clip_denoised=clip
    )

    # ADM recomputes ε from the clipped x̂_0, which is diffusers' use_clipped_model_output=True.
    ref = _ddim_scheduler(clip_sample=clip)
    ref.set_timesteps(50)
    g = torch.Generator().manual_seed(3)
    x = noise.clone()
    for t in ref.timesteps:
        eps = toy_model(x, t.expand(2))[:, :C]
        x = ref.step(eps, t, x, eta=eta, generator=g, use_clipped_model_output=clip).prev_sample
    assert ours.abs().max() > 0.1  # not a degenerate all-zero comparison
    torch.testing.assert_close(ours, x, **_vs_diffusers(x))  # diffusers' fp32 schedule, see DIFFUSERS_RTOL


@pytest.mark.parametrize("clip", [False, True])
def test_respaced_ddpm_loop_matches_diffusers_loop(clip):
    d = create_diffusion(timestep_respacing="25")
    noise = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(4))
    ours = ddpm_sample(toy_model, d, noise, generator=torch.Generator().manual_seed(5), clip_denoised=clip)

    ref = _ddpm_scheduler(timestep_spacing="linspace", clip_sample=clip)
    ref.set_timesteps(25)
    g = torch.Generator().manual_seed(5)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t.expand(2)), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, **_vs_diffusers(x))  # diffusers' fp32 schedule, see DIFFUSERS_RTOL
    if clip:
        # The last step returns coef1·x̂_0 + coef2·x_t with the clipped x̂_0, coef1 = 1 and coef2 = 0
        # up to their fp32 rounding (≤ u each).
        assert ours.abs().max() <= 1.0 + 4 * U_FP32


def test_fixed_variance_ddpm_loop_matches_diffusers_fixed_large():
    # Without learn_sigma DiT (like ADM's default) samples with the "large" variance β_t.
    d = create_diffusion(timestep_respacing="25", learn_sigma=False)
    eps_model = lambda x, t: toy_model(x, t)[:, :C]
    noise = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(6))
    ours = ddpm_sample(eps_model, d, noise, generator=torch.Generator().manual_seed(7))

    ref = _ddpm_scheduler(timestep_spacing="linspace", variance_type="fixed_large")
    ref.set_timesteps(25)
    g = torch.Generator().manual_seed(7)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(eps_model(x, t.expand(2)), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, **_vs_diffusers(x))  # diffusers' fp32 schedule, see DIFFUSERS_RTOL


# ---------------------------------------------------------------------------------------------
# The variational bound
# ---------------------------------------------------------------------------------------------


def _direct_vb_bits(x0, x_t, model_out, t_orig: int, betas: torch.Tensor) -> torch.Tensor:
    """The VLB term written out from scratch in float64 with torch.distributions."""
    x0, x_t, model_out = x0.double(), x_t.double(), model_out.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    a_t, ab_t = alphas[t_orig], abar[t_orig]
    ab_prev = abar[t_orig - 1] if t_orig > 0 else torch.tensor(1.0, dtype=torch.float64)
    beta_t = betas[t_orig]
    eps, v = model_out.split(C, dim=1)

    def posterior_mean(x_start):
        return (ab_prev.sqrt() * beta_t * x_start + a_t.sqrt() * (1 - ab_prev) * x_t) / (1 - ab_t)

    tilde_beta = beta_t * (1 - ab_prev) / (1 - ab_t)
    x0_hat = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    min_log = torch.log(tilde_beta) if t_orig > 0 else torch.log(betas[1] * (1 - abar[0]) / (1 - abar[1]))
    log_var = (v + 1) / 2 * torch.log(beta_t) + (1 - v) / 2 * min_log
    p = torch.distributions.Normal(posterior_mean(x0_hat), torch.exp(0.5 * log_var))
    if t_orig > 0:
        q = torch.distributions.Normal(posterior_mean(x0), tilde_beta.sqrt())
        nats = torch.distributions.kl_divergence(q, p)
    else:
        # Exact Gaussian mass of x0's 1/127.5-wide bin (edge bins open), against ADM's tanh CDF.
        upper = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), x0 + 1 / 255)
        lower = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), x0 - 1 / 255)
        nats = -torch.log(p.cdf(upper) - p.cdf(lower))
    return mean_flat(nats) / math.log(2)


@pytest.mark.parametrize("t_orig", [0, 1, 10, 500, 999])
def test_vb_term_matches_direct_computation(t_orig):
    d = create_diffusion()
    g = torch.Generator().manual_seed(t_orig)
    x0 = torch.rand(3, C, H, W, generator=g) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # exercise both open edge bins
    x_t = d.q_sample(x0, torch.full((3,), t_orig), noise=torch.randn(x0.shape, generator=g))
    out = toy_model(x_t, torch.full((3,), t_orig))
    ours = d.vb_terms_bpd(out, x0, x_t, torch.full((3,), t_orig))
    direct = _direct_vb_bits(x0, x_t, out, t_orig, d.betas).float()
    assert (ours > 0).all()
    # At t = 0 ADM's tanh approximation of Φ (kept for DiT's loss values) differs from the exact
    # CDF: a property of the formula, not of rounding, the same on every machine (0.36% here).
    # For t > 0 the fp32 closed-form KL against float64: O(1) terms rounded (≤ a few u each) and a
    # mean over C·H·W = 256 elements (√256·u); rtol 1e-4 ≈ 1700u holds ≥ 8× that.
    rtol = 1e-2 if t_orig == 0 else 1e-4
    # atol for small KLs: their error is u-relative to the O(1) terms that cancel in -1 + Δ + e^-Δ,
    # not to the KL itself: a few u ≈ 2e-7 bits, which 1e-6 holds 5×.
    torch.testing.assert_close(ours, direct, rtol=rtol, atol=1e-6)


def test_hybrid_loss_freezes_the_mean_in_the_vb_term():
    d = create_diffusion()
    x0 = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(6))
    out = toy_model(x0, torch.zeros(2)).detach().requires_grad_(True)
    t = torch.tensor([3, 700])
    losses = d.training_losses(lambda x, t, y: out, x0, t, model_kwargs={"y": None})
    assert set(losses) == {"loss", "mse", "vb"} and losses["vb"].shape == (2,)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert grad_vb[:, :C].abs().max() == 0 and grad_vb[:, C:].abs().max() > 0  # vb trains only v
    assert grad_mse[:, C:].abs().max() == 0 and grad_mse[:, :C].abs().max() > 0  # mse trains only ε

    plain = create_diffusion(learn_sigma=False)
    losses = plain.training_losses(lambda x, t: out[:, :C], x0, t)
    assert set(losses) == {"loss", "mse"}
    with pytest.raises(VitditError, match="model output has shape"):
        plain.training_losses(lambda x, t: out, x0, t)


def test_rescaled_vb_term():
    x0 = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([5, 50])
    plain = create_diffusion(diffusion_steps=100).training_losses(toy_model, x0, t, noise=noise)
    scaled = create_diffusion(diffusion_steps=100, rescale_learned_sigmas=True).training_losses(
        toy_model, x0, t, noise=noise
    )
    torch.testing.assert_close(scaled["vb"], plain["vb"] * 0.1)
    torch.testing.assert_close(scaled["mse"], plain["mse"])


# ---------------------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------------------


def test_respacing_maps_timesteps():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, 250) == space_timesteps(1000, "250")
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    # Three sections of 334, 333, 333 steps, each spread with both ends included.
    sections = space_timesteps(1000, "2,3,1")
    assert sections == [0, 333, 334, 500, 666, 667]
    assert create_diffusion(timestep_respacing="").num_timesteps == 1000
    assert create_diffusion(timestep_respacing=None, diffusion_steps=100).num_timesteps == 100

    base = create_diffusion()
    d = create_diffusion(timestep_respacing="250")
    assert d.num_timesteps == 250 and d.settings["timestep_respacing"] == "250"
    # Respacing keeps ᾱ at every kept step, so q(x_t | x_0) is the trained one.
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12, atol=0)

    # A pickled diffusion (as Ray ships it) drops its per-device caches and still works.
    d.q_sample(torch.zeros(1, C, H, W), torch.tensor([3]))
    clone = pickle.loads(pickle.dumps(d))
    assert clone._on_device == {} and torch.equal(clone.timestep_map, d.timestep_map)

    seen = []

    def recorder(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    ddim_sample(recorder, create_diffusion(timestep_respacing="ddim10"), torch.randn(2, C, H, W))
    assert [int(s[0]) for s in seen] == list(range(900, -1, -100))
    assert all(torch.equal(s, s[:1].expand(2)) for s in seen)

    for bad in ["abc", "2000", "ddim999", "ddimx", "0"]:
        with pytest.raises(VitditError, match="timestep_respacing"):
            create_diffusion(timestep_respacing=bad)


# ---------------------------------------------------------------------------------------------
# Determinism, per-sample generators, guidance
# ---------------------------------------------------------------------------------------------


def _per_sample(seeds: list[int], sampler, model, diffusion, **kw) -> torch.Tensor:
    """Initial noise and step noise for sample i from its own seed, as the sampling job does."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(C, H, W, generator=g) for g in gens])
    y = torch.tensor([s % 10 for s in seeds])
    return sampler(model, diffusion, noise, model_kwargs={"y": y}, generator=gens, **kw)


@pytest.mark.parametrize("sampler,kw", [(ddpm_sample, {}), (ddim_sample, {"eta": 1.0})])
def test_per_sample_generators_make_samples_batch_independent(sampler, kw):
    d = create_diffusion(timestep_respacing="ddim20" if sampler is ddim_sample else "20")
    batch = _per_sample([10, 11, 12, 13], sampler, toy_model, d, **kw)
    single = _per_sample([12], sampler, toy_model, d, **kw)
    assert torch.equal(batch[2:3], single)  # a per-pixel model: bit-identical
    assert not torch.allclose(batch[1], batch[2])
    again = _per_sample([10, 11, 12, 13], sampler, toy_model, d, **kw)
    assert torch.equal(batch, again)  # deterministic under the seeds

    dit = _randomise(vitdit.create_model("DiT-test/2"))
    batch = _per_sample([10, 11, 12, 13], sampler, dit, d, **kw)
    single = _per_sample([12], sampler, dit, d, **kw)
    # Batch 4 and batch 1 take differently blocked GEMM kernels: summation order only, compounded
    # over the 20 steps' model calls. A random-weight DiT's samples reach |x| ~ 1e4, hence the scale.
    steps = d.num_timesteps
    tol = reassociation_tol(single, DIT_TEST_N, steps * DIT_TEST_LAYERS)
    torch.testing.assert_close(batch[2:3], single, **tol)

    with pytest.raises(VitditError, match="generator"):
        sampler(toy_model, d, torch.randn(2, C, H, W), generator=[torch.Generator()], **kw)


def test_cfg_model_scale_one_and_dit_quirk():
    dit = _randomise(vitdit.create_model("DiT-test/2"))
    null = dit.config.num_classes
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, C, H, W, generator=g)
    t = torch.tensor([10, 500, 999])
    y = torch.tensor([0, 1, 2]) % null
    with torch.no_grad():
        # cfg_model runs one batch of 2N, the references N: differently blocked GEMM kernels, so
        # the two agree to fp32 reassociation error of the network (tests/_tolerance.py).
        cond = dit(x, t, y)
        tol = reassociation_tol(cond, DIT_TEST_N, DIT_TEST_LAYERS)
        torch.testing.assert_close(cfg_model(dit, 1.0, null)(x, t, y), cond, **tol)
        guided = cfg_model(dit, 4.0, null)(x, t, y)
        uncond = dit(x, t, torch.full_like(y, null))
        # Guidance (1 - s)·uncond + s·cond passes on |1 - s| + |s| = 7 times its inputs' error.
        tol_guided = reassociation_tol(torch.cat([cond, uncond]), DIT_TEST_N, DIT_TEST_LAYERS, gain=7.0)
        torch.testing.assert_close(
            guided[:, :C], uncond[:, :C] + 4.0 * (cond[:, :C] - uncond[:, :C]), **tol_guided
        )
        torch.testing.assert_close(guided[:, C:], cond[:, C:], **tol)  # variance from the conditional pass
        # guided_channels=3 reproduces the release's forward_with_cfg (its first half). Both run the
        # same 2N batch (bit-identical today); as two implementations they get the guided tolerance.
        quirk = cfg_model(dit, 4.0, null, guided_channels=3)(x, t, y)
        ref = dit.forward_with_cfg(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]), 4.0
        )
        torch.testing.assert_close(quirk, ref[:3], **tol_guided)
        assert not torch.allclose(quirk[:, 3], guided[:, 3], **tol_guided)


def test_progress_bar_and_global_rng(capsys):
    d = create_diffusion(timestep_respacing="ddim5")
    torch.manual_seed(0)
    a = ddim_sample(toy_model, d, torch.ones(1, C, H, W), eta=1.0, progress=True)
    torch.manual_seed(0)
    b = ddim_sample(toy_model, d, torch.ones(1, C, H, W), eta=1.0)
    assert torch.equal(a, b)
    assert "5/5" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_tiny_dit_overfits_one_batch():
    torch.manual_seed(0)
    model = vitdit.create_model("DiT-test/2")
    d = create_diffusion()
    x0 = torch.randn(8, C, H, W).clamp(-1, 1)
    y = torch.arange(8) % model.config.num_classes
    # A fixed evaluation draw of (t, noise) so the before/after comparison is not noise.
    g = torch.Generator().manual_seed(1)
    t_eval = torch.randint(0, d.num_timesteps, (64,), generator=g)
    noise_eval = torch.randn(64, C, H, W, generator=g)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = d.training_losses(model, x0.repeat(8, 1, 1, 1), t_eval, {"y": y.repeat(8)}, noise_eval)
        model.train()
        return loss["loss"].mean().item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    start = time.perf_counter()
    for _ in range(60):
        t = torch.randint(0, d.num_timesteps, (16,))
        loss = d.training_losses(model, x0.repeat(2, 1, 1, 1), t, {"y": y.repeat(2)})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"overfit: loss {before:.4f} -> {after:.4f} in {time.perf_counter() - start:.1f}s")
    assert math.isfinite(after) and after < 0.5 * before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_with_cpu_generators():
    """On a GPU the schedules follow the sample's device and CPU generators give the CPU noise."""
    dit = _randomise(vitdit.create_model("DiT-test/2"))
    d = create_diffusion(timestep_respacing="ddim10")
    cpu = _per_sample([1, 2, 3], ddim_sample, dit, d, eta=1.0)
    gens = [torch.Generator().manual_seed(s) for s in [1, 2, 3]]
    noise = torch.stack([torch.randn(C, H, W, generator=g) for g in gens]).cuda()
    y = torch.tensor([1, 2, 3]).cuda()
    gpu = ddim_sample(dit.cuda(), d, noise, model_kwargs={"y": y}, eta=1.0, generator=gens)
    assert gpu.device.type == "cuda"
    # Loose: cuDNN may run the patch-embedding conv in TF32 (u = 2^-11 ≈ 4.9e-4), once in each of the
    # 10 steps: ~√10·u ≈ 1.5e-3; 1e-2 ≈ 20u. Wrong noise or schedules differ by O(1).
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-2, atol=1e-2)
    x0 = torch.randn(4, C, H, W, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    losses = create_diffusion().training_losses(
        dit, x0, t, {"y": torch.zeros(4, dtype=torch.long, device="cuda")}
    )
    assert losses["loss"].device.type == "cuda" and torch.isfinite(losses["loss"]).all()
