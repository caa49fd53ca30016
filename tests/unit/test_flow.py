"""Rectified flow: the Euler sampler equals diffusers' FlowMatchEulerDiscreteScheduler step by step,
the objective's pieces equal their formulas (and diffusers' SD3 training helpers), guidance, an
end-to-end transport of noise to data, and a DiT trained with ``--objective flow``."""

from __future__ import annotations

import math

import pytest
import torch
from _tolerance import DIT_TEST_LAYERS, DIT_TEST_N, U_FP32, reassociation_rtol, reassociation_tol
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from vitdit.diffusion.flow import (
    T_EPS,
    RectifiedFlow,
    cfg_velocity,
    euler_sample,
    flow_sigmas,
    resolution_shift,
    scale_timesteps,
    shift_t,
)
from vitdit.errors import VitditError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on 2 threads of a shared, oversubscribed 2-core machine crawl (measured: the MLP
    test took 2 s alone, 77 s beside other test runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Sampling-error bounds below are 5 standard errors: a correct sampler fails one with probability
# < 6e-7 (two-sided normal tail); the generators are seeded, so a pass is also reproducible.
Z = 5.0


def _linear_velocity(shape: tuple[int, ...], seed: int = 0):
    """A fixed random affine velocity v(x, t) = W·x + t·b + c (per sample, x flattened)."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    w = torch.randn(d, d, generator=g) / math.sqrt(d)
    b, c = torch.randn(d, generator=g), torch.randn(d, generator=g)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], d)
        return (flat @ w.T + t[:, None] * b + c).reshape(x.shape)

    return v


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_euler_sample_equals_diffusers_flow_match_euler_step_by_step(shift, num_steps):
    shape = (3, 4, 4)
    velocity = _linear_velocity(shape)
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    ref_states, x = [], noise.clone()
    for timestep in scheduler.timesteps:
        ref_states.append(x)
        # As SD3's pipeline: the model gets timestep = 1000·sigma; ours takes t = sigma.
        v = velocity(x, (timestep / 1000).expand(x.shape[0]))
        x = scheduler.step(v, timestep, x).prev_sample

    states, times = [], []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        states.append(x.clone())
        times.append(t.clone())
        return velocity(x, t)

    out = euler_sample(recording, noise, num_steps, shift=shift)
    sigmas = flow_sigmas(num_steps, shift)
    assert sigmas.shape == (num_steps + 1,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=0, atol=1e-6)
    assert len(states) == num_steps
    for i, (ours, ref) in enumerate(zip(states, ref_states)):
        assert torch.equal(times[i], sigmas[i].expand(2))
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6, msg=f"x before step {i}")
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    assert (out - noise).abs().max() > 0.1  # the comparison is not of two untouched copies


def test_flow_sigmas_shift_only_moves_levels_towards_noise():
    plain, shifted = flow_sigmas(10, 1.0), flow_sigmas(10, 3.0)
    assert torch.all(plain[:-1] > plain[1:]) and torch.all(shifted[:-1] > shifted[1:])  # strictly falling
    assert torch.all(shifted[1:-1] > plain[1:-1])
    with pytest.raises(VitditError, match="num_steps"):
        flow_sigmas(0)
    with pytest.raises(VitditError, match="shift"):
        flow_sigmas(10, shift=0.0)


def test_shift_t_and_resolution_shift():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_t(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_t(t, 1.0), t)
    # 4× the tokens (2× the side) → shift 2; the base resolution → 1.
    assert resolution_shift(16384) == 2.0 and resolution_shift(4096) == 1.0
    assert resolution_shift(64, base_tokens=16) == 2.0
    with pytest.raises(VitditError, match="num_tokens"):
        resolution_shift(0)


def test_interpolate_target_and_loss_on_known_values():
    flow = RectifiedFlow()
    x0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    noise = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    t = torch.tensor([0.25, 1.0])
    expected_xt = torch.tensor([[0.75, 2.5], [1.0, 1.0]])  # (1 - t)·x0 + t·noise
    assert torch.equal(flow.interpolate(x0, noise, t), expected_xt)
    assert torch.equal(flow.target(x0, noise), torch.tensor([[-1.0, 2.0], [-2.0, 2.0]]))

    seen = {}

    def zero_velocity(x, tt):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    terms = flow.training_losses(zero_velocity, x0, noise=noise, t=t)
    assert torch.equal(seen["x"], expected_xt) and torch.equal(seen["t"], t)
    torch.testing.assert_close(terms["mse"], torch.tensor([2.5, 4.0]))  # mean of target²
    torch.testing.assert_close(terms["loss"], terms["mse"])  # weighting "none"
    assert torch.equal(terms["t"], t)
    # The exact velocity has zero loss; images broadcast t over (C, H, W).
    x0i, ni = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    perfect = flow.training_losses(lambda x, tt: ni - x0i, x0i, noise=ni, t=torch.rand(3))
    assert torch.equal(perfect["loss"], torch.zeros(3))


def test_training_losses_draws_noise_and_t_and_rejects_bad_shapes():
    flow = RectifiedFlow(shift=3.0)
    x0 = torch.randn(64, 3)
    a = flow.training_losses(lambda x, t: x, x0, generator=torch.Generator().manual_seed(0))
    b = flow.training_losses(lambda x, t: x, x0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["loss"], b["loss"]) and a["t"].shape == (64,)
    assert ((a["t"] > 0) & (a["t"] < 1)).all()
    with pytest.raises(VitditError, match="noise has shape"):
        flow.training_losses(lambda x, t: x, x0, noise=torch.randn(64, 4))
    with pytest.raises(VitditError, match="t has shape"):
        flow.training_losses(lambda x, t: x, x0, t=torch.rand(64, 1))
    with pytest.raises(VitditError, match="velocity_fn returned"):
        flow.training_losses(lambda x, t: x[:, :2], x0)


def test_logit_normal_t_has_its_mean_and_median_in_logit_space():
    n, mean, std = 20000, 0.5, 1.5
    t = RectifiedFlow(logit_mean=mean, logit_std=std).sample_t(n, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (n,) and ((t > 0) & (t < 1)).all()
    z = torch.logit(t.double())
    # Standard errors: of the mean σ/√n; of the median √(π/2)·σ/√n (asymptotic, normal data).
    assert abs(z.mean().item() - mean) < Z * std / math.sqrt(n)
    assert abs(z.median().item() - mean) < Z * math.sqrt(math.pi / 2) * std / math.sqrt(n)
    assert abs(z.std().item() - std) < Z * std / math.sqrt(2 * n)  # s.e. of a normal sample's std
    # The same draws as diffusers' SD3 training from the same generator.
    ref = compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=mean, logit_std=std, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(t, ref.clamp(T_EPS, 1 - T_EPS), rtol=0, atol=0)


def test_uniform_t_and_shift_moves_mass_towards_noise():
    n = 20000
    g = torch.Generator().manual_seed(0)
    u = RectifiedFlow(t_sampling="uniform").sample_t(n, generator=g)
    assert abs(u.mean().item() - 0.5) < Z * math.sqrt(1 / 12 / n)
    quarter = (u < 0.25).float().mean().item()
    assert abs(quarter - 0.25) < Z * math.sqrt(0.25 * 0.75 / n)

    # Logit-normal(0, 1) shifted by 3: P(t > 1/2) = P(u > 1/(1 + 3)) = Φ(logit(3/4)) ≈ 0.864.
    plain = RectifiedFlow().sample_t(n, generator=torch.Generator().manual_seed(1))
    shifted = RectifiedFlow(shift=3.0).sample_t(n, generator=torch.Generator().manual_seed(1))
    p = 0.5 * (1 + math.erf(math.log(3.0) / math.sqrt(2)))
    assert abs((shifted > 0.5).float().mean().item() - p) < Z * math.sqrt(p * (1 - p) / n)
    assert abs((plain > 0.5).float().mean().item() - 0.5) < Z * math.sqrt(0.25 / n)
    # The same draws, mapped by the monotone shift: quantiles move exactly.
    torch.testing.assert_close(shifted, shift_t(plain, 3.0).clamp(T_EPS, 1 - T_EPS))


def test_mode_sampling_is_diffusers_f_mode_and_rejects_scales_outside_its_range():
    n = 4096
    t = RectifiedFlow(t_sampling="mode", mode_scale=1.29).sample_t(
        n, generator=torch.Generator().manual_seed(0)
    )
    ref = compute_density_for_timestep_sampling(
        "mode", n, mode_scale=1.29, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(t, ref.clamp(T_EPS, 1 - T_EPS), rtol=0, atol=0)
    # s > 0 concentrates t in the middle: fewer draws in the outer quarters than uniform's half.
    assert ((t < 0.25) | (t > 0.75)).float().mean().item() < 0.4
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    flat = RectifiedFlow(t_sampling="mode", mode_scale=0.0).sample_t(
        n, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(flat, (1 - u).clamp(T_EPS, 1 - T_EPS))  # s = 0: uniform
    for bad in (-1.5, 2.0):
        with pytest.raises(VitditError, match="mode_scale"):
            RectifiedFlow(t_sampling="mode", mode_scale=bad)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_weightings_equal_their_formulas_and_diffusers(weighting):
    t = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.99])
    formula = {
        "none": torch.ones_like(t),
        "sigma_sqrt": 1 / t**2,
        "cosmap": 2 / (math.pi * (1 - 2 * t + 2 * t**2)),
    }[weighting]
    flow = RectifiedFlow(weighting=weighting)
    torch.testing.assert_close(flow.loss_weight(t), formula)
    torch.testing.assert_close(flow.loss_weight(t), compute_loss_weighting_for_sd3(weighting, t))
    x0, noise = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    terms = flow.training_losses(lambda x, tt: 0.5 * x, x0, noise=noise, t=t)
    torch.testing.assert_close(terms["loss"], formula * terms["mse"])


def test_constructor_rejects_bad_settings():
    with pytest.raises(VitditError, match="t_sampling 'normal'"):
        RectifiedFlow(t_sampling="normal")
    with pytest.raises(VitditError, match="weighting 'sqrt'"):
        RectifiedFlow(weighting="sqrt")
    with pytest.raises(VitditError, match="logit_std"):
        RectifiedFlow(logit_std=0.0)
    with pytest.raises(VitditError, match="shift"):
        RectifiedFlow(shift=-1.0)
    flow = RectifiedFlow(t_sampling="mode", shift=2.0, weighting="cosmap")
    assert RectifiedFlow(**flow.config()).config() == flow.config()


def _mmdit_like_velocity(x, t, cond):
    """A velocity of (context (B, L, D), pooled (B, P)) that depends on both, per sample."""
    context, pooled = cond
    gain = pooled.mean(dim=1).view(-1, 1, 1)  # B, 1, 1
    offset = context.mean(dim=(1, 2)).view(-1, 1, 1)  # B, 1, 1
    return gain * x + offset + t.view(-1, 1, 1)


def test_cfg_velocity_with_tuple_conditions():
    g = torch.Generator().manual_seed(0)
    b, length, d, p = 3, 5, 8, 6
    x, t = torch.randn(b, 4, 4, generator=g), torch.rand(b, generator=g)
    cond = (torch.randn(b, length, d, generator=g), torch.randn(b, p, generator=g))
    empty = (torch.randn(1, length, d, generator=g), torch.randn(1, p, generator=g))  # one empty caption
    v_c = _mmdit_like_velocity(x, t, cond)
    v_u = _mmdit_like_velocity(x, t, tuple(e.expand(b, *e.shape[1:]) for e in empty))
    # The doubled batch may sum the condition means in another order (reassociation over L·D terms),
    # and v_u + s·(v_c - v_u) rounds in fp32: ≤ (1 + 4s)·u·max|v| for s ≤ 3, i.e. 13u.
    scale_of = max(v_c.abs().max().item(), v_u.abs().max().item())
    tol = {"rtol": 0.0, "atol": (13 * U_FP32 + reassociation_rtol(length * d)) * scale_of}
    torch.testing.assert_close(cfg_velocity(_mmdit_like_velocity, x, t, cond, empty, 1.0), v_c, **tol)
    torch.testing.assert_close(cfg_velocity(_mmdit_like_velocity, x, t, cond, empty, 0.0), v_u, **tol)
    torch.testing.assert_close(
        cfg_velocity(_mmdit_like_velocity, x, t, cond, empty, 3.0), v_u + 3.0 * (v_c - v_u), **tol
    )
    # A float t is broadcast; mismatched conditions are refused.
    torch.testing.assert_close(
        cfg_velocity(_mmdit_like_velocity, x, 0.5, cond, empty, 1.0),
        _mmdit_like_velocity(x, torch.full((b,), 0.5), cond),
        **tol,
    )
    with pytest.raises(VitditError, match="both be tensors"):
        cfg_velocity(_mmdit_like_velocity, x, t, cond, empty[0], 1.0)
    with pytest.raises(VitditError, match="uncond"):
        cfg_velocity(_mmdit_like_velocity, x, t, cond, (empty[0], torch.randn(2, p)), 1.0)


def test_cfg_velocity_scale_one_is_the_conditional_dit_velocity():
    from vitdit.models import create_model

    torch.manual_seed(0)
    model = create_model("DiT-test/2", learn_sigma=False).eval()
    # adaLN-Zero starts at a zero output: give the final layer weights so the output depends on y.
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g)
    y, null = torch.tensor([0, 3, 7, 9]), torch.full((4,), 10)
    fn = scale_timesteps(model, 1000.0)
    with torch.no_grad():
        v_c = model(x, 1000.0 * t, y)
        guided = cfg_velocity(fn, x, t, y, null, 1.0)
        v_u = model(x, 1000.0 * t, null)
    assert (v_c - v_u).abs().max() > 1e-2  # the labels matter, so scale 1 picking v_c is a real check
    # A batch of 2N against N: fp32 reassociation through DiT-test/2 (tests/_tolerance.py).
    torch.testing.assert_close(guided, v_c, **reassociation_tol(v_c, DIT_TEST_N, DIT_TEST_LAYERS))


def _gaussian_velocity(mu: torch.Tensor, s: torch.Tensor):
    """E[noise - x0 | x_t] for x0 ~ N(mu, diag s²): x_t ~ N((1-t)mu, (1-t)²s² + t²) per coordinate."""

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype)[:, None]
        var = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)

    return v


def test_euler_with_the_exact_gaussian_velocity_transports_noise_to_the_data():
    mu, s = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    n, steps = 8192, 100
    out = euler_sample(
        _gaussian_velocity(mu, s), torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), steps
    )
    # Sampling error (standard errors s/√n and s/√(2n)) plus Euler's first-order error in the std:
    # the exact ODE maps ε to mu + s·ε, and Euler's map is off by O(1/steps) (1.35–1.5·s/steps
    # measured for these s), allowed as 2·s/steps.
    assert ((out.mean(0) - mu).abs() < Z * s / math.sqrt(n)).all(), out.mean(0)
    assert ((out.std(0) - s).abs() < Z * s / math.sqrt(2 * n) + 2 * s / steps).all(), out.std(0)


def test_a_trained_mlp_moves_noise_to_a_two_mode_mixture():
    """Training (training_losses) and sampling (euler_sample) together on 2-D points."""
    torch.manual_seed(0)

    def data(n: int, g: torch.Generator) -> torch.Tensor:
        side = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        return torch.stack([2.0 * side, torch.zeros(n)], 1) + 0.3 * torch.randn(n, 2, generator=g)

    class MLP(torch.nn.Module):
        def __init__(self, hidden: int = 64):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(3, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                torch.nn.SiLU(), torch.nn.Linear(hidden, 2),
            )  # fmt: skip

        def forward(self, x, t):
            return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))

    model, flow, g = MLP(), RectifiedFlow(), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    n = 2000
    before = euler_sample(model, torch.randn(n, 2, generator=torch.Generator().manual_seed(1)), 50)
    for _ in range(600):
        loss = flow.training_losses(model, data(256, g), generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = euler_sample(model, torch.randn(n, 2, generator=torch.Generator().manual_seed(1)), 50)

    def near_a_mode(x):  # within 3 data stds (0.9) of x = ±2 along the first axis
        return ((x[:, 0].abs() - 2).abs() < 0.9).float().mean().item()

    assert near_a_mode(before) < 0.5  # untrained, the samples are (rescaled) noise
    assert near_a_mode(out) > 0.95  # 99.7% of the data lies there
    share = (out[:, 0] > 0).float().mean().item()
    assert abs(share - 0.5) < Z * math.sqrt(0.25 / n)  # both modes, evenly
    assert abs(out[:, 0].abs().mean().item() - 2.0) < 0.2
    assert 0.15 < out[:, 1].std().item() < 0.45  # the modes' spread (0.3), not collapsed, not noise


# --- DiT training with --objective flow ------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_latents(tiny_vae_dir, tmp_path_factory):
    from _train_utils import write_digit_latents

    return write_digit_latents(str(tmp_path_factory.mktemp("latents") / "digits"), tiny_vae_dir)


def test_dit_flow_objective_config_and_bad_flags(digit_latents):
    from pipelines.train.dit import DiTTask, DiTTrainConfig

    task = DiTTask(
        DiTTrainConfig(latents=digit_latents, model="DiT-test/2", objective="flow", flow_shift=2.0)
    )
    assert task.model_cfg.learn_sigma is False and task.model_cfg.out_channels == task.model_cfg.in_channels
    assert task.model_config()["diffusion"] == {
        "objective": "flow",
        "t_sampling": "logit_normal",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "mode_scale": 1.29,
        "shift": 2.0,
        "weighting": "none",
        "timestep_scale": 1000.0,
        "learn_sigma": False,
    }
    plain = DiTTask(DiTTrainConfig(latents=digit_latents, model="DiT-test/2"))
    assert plain.model_cfg.learn_sigma is True and plain.flow is None
    assert plain.model_config()["diffusion"] == {
        "objective": "diffusion",
        "noise_schedule": "linear",
        "learn_sigma": True,
        "diffusion_steps": 1000,
    }
    with pytest.raises(VitditError, match="--objective flow: logit_std"):
        DiTTask(
            DiTTrainConfig(latents=digit_latents, model="DiT-test/2", objective="flow", flow_logit_std=0.0)
        )
    with pytest.raises(VitditError, match="--objective 'score'"):
        DiTTask(DiTTrainConfig(latents=digit_latents, model="DiT-test/2", objective="score"))


def test_dit_trained_with_the_flow_objective_lowers_its_held_out_flow_loss(digit_latents):
    """DiTTask.loss in a plain loop (the trainer's step without Ray): 300 steps of DiT-test/2."""
    from pipelines.latents import load_latents_numpy
    from pipelines.train.dit import DiTTask, DiTTrainConfig
    from vitdit.ema import create_ema, update_ema
    from vitdit.latents import LABEL, MEAN, STD

    task = DiTTask(
        DiTTrainConfig(
            latents=digit_latents, model="DiT-test/2", objective="flow", grid_samples=4, grid_steps=4
        )
    )
    arrays, _ = load_latents_numpy(digit_latents)
    rows = {k: torch.from_numpy(arrays[k]) for k in (MEAN, STD, LABEL)}
    held_out = 128  # the last rows: never trained on
    val = [{k: v[-held_out:] for k, v in rows.items()}]
    train_rows = rows[MEAN].shape[0] - held_out

    torch.manual_seed(0)
    model = task.build_model()
    ema = create_ema(model)
    with torch.no_grad():  # as the trainer validates
        before = task.validate(model, ema, val)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, train_rows, (64,), generator=g)
        loss, extra = task.loss(model, {k: v[idx] for k, v in rows.items()}, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.95)
    model.eval()
    with torch.no_grad():
        after = task.validate(model, ema, val)
        grid = task.visualize(ema, step=300)
    print(f"held-out flow loss {before} -> {after}")
    # An untrained adaLN-Zero DiT predicts 0: its loss is E|noise - x0|² ≈ 1 + E|x0|² (1.32 here).
    # Even the exact velocity E[noise - x0 | x_t] leaves a loss (x_t does not pin down the pair);
    # measured: 300 steps reach 0.68 of the start, 400 steps at lr 3e-3 0.68 too, so the bound 0.8
    # tests that training works without racing a still-falling curve.
    assert extra["mse"] > 0 and before["val/loss"] > 1.0, before
    assert after["val/loss"] < 0.8 * before["val/loss"], (before, after)
    assert after["val/loss_ema"] < 0.8 * before["val/loss_ema"], (before, after)
    # 4 Euler-sampled 16-px digits of 4 classes: a labelled row each, tiles upscaled to 64 px.
    assert grid is not None and grid.size[1] == 4 * (64 + 2) + 2, grid.size
