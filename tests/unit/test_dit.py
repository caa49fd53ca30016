"""DiT: layout against the release, paper's parameter counts and MACs, conditioning variants, CFG,
and equivalence with diffusers' DiTTransformer2DModel through vitdit.export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _tolerance import DIT_TEST_LAYERS, DIT_TEST_N, reassociation_rtol, reassociation_tol
from torch.utils.flop_counter import FlopCounterMode

from vitdit.errors import VitditError
from vitdit.models import DIT_PRESETS, DiT, DiTConfig, create_model, list_models
from vitdit.models.dit import CONDITIONINGS, sincos_pos_embed_2d, timestep_embedding

GOLDEN = Path(__file__).parent.parent / "golden" / "dit_xl2_keys.json"

# The paper's model table (256×256, "Gflops" = GMACs) and parameter counts (M); Fig. 5 for the variants.
PAPER = {
    "DiT-S/2": (6.06, 33),
    "DiT-B/2": (23.0, 130),
    "DiT-L/2": (80.7, 458),
    "DiT-XL/2": (118.6, 675),
}
PAPER_GMACS_P4_P8 = {
    "DiT-S/4": 1.41, "DiT-S/8": 0.36, "DiT-B/4": 5.56, "DiT-B/8": 1.42,
    "DiT-L/4": 19.7, "DiT-L/8": 5.01, "DiT-XL/4": 29.05, "DiT-XL/8": 7.39,
}  # fmt: skip
PAPER_XL2_VARIANT_GMACS = {"in-context": 119.4, "cross-attention": 137.6, "adaLN": 118.6}


def _meta_model(name: str, **overrides) -> DiT:
    with torch.device("meta"):
        return create_model(name, **overrides)


def _use_attn_impl(model: torch.nn.Module, impl: str) -> None:
    # Every attention module in dit.py (self- and cross-) reads its own ``attn_impl``.
    for m in model.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = impl


def _randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Fill the zero-initialised layers (adaLN, final layer) with small noise: every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def _inputs(cfg: DiTConfig, batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.tensor([0, 10, 500, 999][:batch])
    y = torch.tensor([0, 3, cfg.num_classes - 1, cfg.num_classes][:batch])  # the last one is null
    return x, t, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_presets_and_registry():
    names = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    assert set(names) <= set(DIT_PRESETS)
    assert {"DiT-test/2", "DiT-digits/2"} <= set(list_models("dit"))
    assert DIT_PRESETS["DiT-XL/4"].patch_size == 4 and DIT_PRESETS["DiT-L/8"].depth == 24
    digits = DIT_PRESETS["DiT-digits/2"]
    assert (digits.hidden_size, digits.depth, digits.num_heads, digits.num_classes) == (128, 4, 4, 10)


def test_golden_layout_matches_release_dit_xl2():
    """Our DiT-XL/2 state dict has exactly the release's keys and shapes (tests/golden/make_dit_xl2_keys.py)."""
    golden = json.loads(GOLDEN.read_text())["keys"]
    sd = _meta_model("DiT-XL/2").state_dict()
    ours = {k: list(v.shape) for k, v in sd.items()}
    assert sorted(set(ours) - set(golden)) == [] and sorted(set(golden) - set(ours)) == []
    assert ours == golden
    assert list(ours) == list(golden)  # same order too
    # The published checkpoint would load strictly: build one on meta from the golden shapes.
    fake = {k: torch.empty(v, device="meta") for k, v in golden.items()}
    model = _meta_model("DiT-XL/2")
    model.load_state_dict(fake, strict=True, assign=True)


@pytest.mark.parametrize("name", list(PAPER))
def test_params_and_macs_match_paper(name):
    gmacs, mparams = PAPER[name]
    model = _meta_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - mparams) / mparams < 0.01, params
    assert abs(model.forward_macs() / 1e9 - gmacs) / gmacs < 0.01, model.forward_macs()


def test_macs_match_paper_for_patch_4_and_8():
    for name, gmacs in PAPER_GMACS_P4_P8.items():
        # The paper rounds to 2 decimals: 0.36 carries up to 1.4% rounding, hence the 0.005 G slack.
        assert abs(_meta_model(name).forward_macs() / 1e9 - gmacs) <= max(0.01 * gmacs, 0.005), name


@pytest.mark.parametrize("conditioning", list(PAPER_XL2_VARIANT_GMACS))
def test_variant_macs_match_paper(conditioning):
    gmacs = PAPER_XL2_VARIANT_GMACS[conditioning]
    macs = _meta_model("DiT-XL/2", conditioning=conditioning).forward_macs()
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.01, macs


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_macs_equal_flop_counter(conditioning):
    """forward_macs == FlopCounterMode FLOPs / 2, exactly, with the explicit-matmul attention path.

    FlopCounterMode counts matrix products (mm, addmm, bmm, convolution, and the CUDA SDPA kernels)
    and nothing elementwise, which is also what forward_macs counts. On CPU it has no formula for
    SDPA's kernel (``_scaled_dot_product_flash_attention_for_cpu``), so with "sdpa" it misses
    q·kᵀ and weights·v; the "math" path routes them through counted bmm's, making the check exact.
    """
    model = create_model("DiT-test/2", conditioning=conditioning).eval()
    _use_attn_impl(model, "math")
    x, t, y = _inputs(model.config, batch=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert counter.get_total_flops() == 2 * model.forward_macs()


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_variants_forward_backward(conditioning):
    torch.manual_seed(0)
    model = _randomise(create_model("DiT-test/2", conditioning=conditioning))
    cfg = model.config
    x, t, y = _inputs(cfg)
    out = model(x, t, y)
    assert out.shape == (4, 2 * cfg.in_channels, cfg.input_size, cfg.input_size)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.pos_embed.grad is None  # fixed sin-cos, frozen
    # The class label reaches the output in every variant (t and y are both used).
    model.eval()
    with torch.no_grad():
        a = model(x, t, torch.zeros_like(y))
        b = model(x, t, torch.ones_like(y))
    # More than any fp32 rounding could move the output (the same batch would even be bit-identical).
    assert (a - b).abs().max() > reassociation_tol(a, DIT_TEST_N, DIT_TEST_LAYERS)["atol"]


def test_variant_layouts():
    cross = create_model("DiT-test/2", conditioning="cross-attention").state_dict()
    assert "blocks.0.cross_attn.kv.weight" in cross and "final_layer.adaLN_modulation.1.weight" not in cross
    inctx = create_model("DiT-test/2", conditioning="in-context").state_dict()
    assert not any("adaLN" in k or "cross" in k for k in inctx)
    ada = create_model("DiT-test/2", conditioning="adaLN").state_dict()
    assert ada["blocks.0.adaLN_modulation.1.weight"].shape == (4 * 32, 32)
    with pytest.raises(VitditError, match="conditioning"):
        create_model("DiT-test/2", conditioning="film")


def test_initialisation_adaln_zero():
    """Zeroed adaLN modulation and output layer: a fresh model outputs zeros, blocks are identities."""
    model = create_model("DiT-test/2")
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
    x, t, y = _inputs(model.config)
    assert not model(x, t, y).any()
    # Plain adaLN keeps its regressed modulation non-zero (no "-Zero").
    assert create_model("DiT-test/2", conditioning="adaLN").blocks[0].adaLN_modulation[-1].weight.any()


def test_pos_embed_and_timestep_embedding():
    model = create_model("DiT-test/2")
    pos = model.pos_embed[0]  # T, D
    grid, quarter = 4, 32 // 4
    # Token (row 0, col 1): the first half of the channels encodes the column, the second the row.
    assert torch.allclose(
        pos[1, :quarter], torch.sin(torch.tensor(1.0) / 10000 ** (torch.arange(quarter) / quarter))
    )
    assert torch.allclose(pos[1, 2 * quarter : 3 * quarter], torch.zeros(quarter))  # sin(row 0) = 0
    assert torch.allclose(pos[grid, 2 * quarter], torch.sin(torch.tensor(1.0)))  # row 1, lowest freq
    assert pos.shape == (16, 32) and torch.equal(pos, torch.from_numpy(sincos_pos_embed_2d(32, 4)).float())
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 256)
    assert emb.shape == (2, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))  # cos 0, sin 0
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(3.0)))  # frequency 1 first
    assert torch.allclose(emb[1, 127], torch.cos(torch.tensor(3.0 * 10000 ** (-127 / 128))))


def test_token_stream_is_bf16_under_bf16_autocast():
    """As diffusers' DiT: the sin-cos table is added in the patch embedding's dtype, so blocks see
    bf16 tokens under autocast (an fp32 stream cost ~100 extra activation casts per step and ~7%
    of a CPU training step) and fp32 tokens without it."""
    model = create_model("DiT-test/2")
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y)
    model(x, t, y)
    assert seen == [torch.bfloat16, torch.float32]


def test_label_dropout():
    torch.manual_seed(0)
    model = create_model("DiT-test/2", class_dropout_prob=0.5)
    labels = torch.arange(10).repeat(20)
    dropped = model.y_embedder.token_drop(labels)
    frac = (dropped == 10).float().mean().item()
    assert 0.35 < frac < 0.65
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    forced = model.y_embedder.token_drop(torch.tensor([1, 2, 3]), force_drop_ids=torch.tensor([1, 0, 1]))
    assert forced.tolist() == [10, 2, 10]
    # eval mode: no dropout, so identical labels give identical embeddings
    model.eval()
    assert torch.equal(model.y_embedder(labels, model.training), model.y_embedder.embedding_table(labels))


def test_forward_with_cfg_guides_three_channels():
    model = _randomise(create_model("DiT-test/2")).eval()
    x, t, _ = _inputs(model.config)
    x = torch.cat([x[:2], x[:2]])  # the sampler's layout: both halves share the noise
    t = torch.tensor([500, 20, 500, 20])
    y = torch.tensor([3, 7, 10, 10])  # [labels; null labels]
    scale = 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, scale)
        raw = model(x, t, y)
        all_ch = model.forward_with_cfg(x, t, y, scale, guidance_channels=None)
    cond, uncond = raw[:2], raw[2:]
    guided = uncond + scale * (cond - uncond)
    # The same batch of 4 through the same kernels, then the same elementwise formula: bit-identical.
    assert torch.equal(out[:2, :3], guided[:, :3])
    assert torch.equal(out[:2, :3], out[2:, :3])
    assert torch.equal(out[:, 3:], raw[:, 3:])  # 4th latent channel and Σ: unguided (release quirk)
    assert torch.equal(all_ch[:2, :4], guided[:, :4])
    assert not torch.allclose(out[:2, 3], all_ch[:2, 3])


def test_config_round_trip():
    import dataclasses

    from vitdit.models import config_from_dict

    cfg = DIT_PRESETS["DiT-digits/2"]
    assert config_from_dict("dit", json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    assert cfg.out_channels == 8 and cfg.num_patches == 16


def test_bad_input_shape():
    model = create_model("DiT-test/2")
    with pytest.raises(VitditError, match="shape"):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(VitditError, match="divisible"):
        DiTConfig(input_size=9, patch_size=2)
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(VitditError, match="guidance_channels"):
        model.forward_with_cfg(x, torch.zeros(2), torch.tensor([1, 10]), 2.0, guidance_channels=5)


def test_batch_equals_singles():
    model = _randomise(create_model("DiT-test/2")).eval()
    x, t, y = _inputs(model.config)
    with torch.no_grad():
        batched = model(x, t, y)
        singles = torch.cat([model(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(4)])
    # Batch 4 and batch 1 take differently blocked GEMM kernels: fp32 reassociation error only.
    assert torch.allclose(singles, batched, **reassociation_tol(batched, DIT_TEST_N, DIT_TEST_LAYERS))


# --- diffusers export ---------------------------------------------------------------------------


def test_dit_to_diffusers_matches_in_fp32():
    from vitdit.export import dit_to_diffusers

    torch.manual_seed(0)
    model = _randomise(create_model("DiT-test/2")).eval()
    transformer = dit_to_diffusers(model)
    x, t, y = _inputs(model.config)
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = transformer(x, timestep=t, class_labels=y).sample
    assert ours.abs().mean() > 1e-3  # a real output, not the zero of a fresh adaLN-Zero model
    # Two implementations of one network in fp32: reassociation error only (tests/_tolerance.py).
    assert _rel(theirs, ours) <= reassociation_rtol(DIT_TEST_N, DIT_TEST_LAYERS)
    with pytest.raises(VitditError, match="conditioning"):
        dit_to_diffusers(create_model("DiT-test/2", conditioning="in-context"))


def test_dit_to_diffusers_save_reload_shift(tmp_path):
    """diffusers rebuilds downscale_freq_shift=1 on load: a small, non-zero difference (see export.py)."""
    from diffusers import DiTTransformer2DModel

    from vitdit.export import dit_to_diffusers, set_dit_timestep_shift

    torch.manual_seed(0)
    model = _randomise(create_model("DiT-test/2")).eval()
    dit_to_diffusers(model).save_pretrained(tmp_path / "dit")
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "dit").eval()
    assert reloaded.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 1
    x, t, y = _inputs(model.config)
    with torch.no_grad():
        ours = model(x, t, y)
        diff = _rel(reloaded(x, timestep=t, class_labels=y).sample, ours)
        set_dit_timestep_shift(reloaded, 0.0)
        restored = _rel(reloaded(x, timestep=t, class_labels=y).sample, ours)
    # A real difference, not rounding (measured 1.06e-3, seed 0); restored: rounding only.
    rounding = reassociation_rtol(DIT_TEST_N, DIT_TEST_LAYERS)
    assert rounding < diff < 0.05, diff
    assert restored <= rounding


def test_dit_pipeline_runs(tiny_vae_dir):
    from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline

    from vitdit.export import dit_to_diffusers

    model = _randomise(create_model("DiT-test/2")).eval()
    pipe = DiTPipeline(
        transformer=dit_to_diffusers(model),
        vae=AutoencoderKL.from_pretrained(tiny_vae_dir),
        # DiTPipeline drops the learned-variance channels before scheduler.step: a fixed variance.
        scheduler=DDPMScheduler(num_train_timesteps=1000),
    )
    pipe.set_progress_bar_config(disable=True)
    # guidance_scale 1: DiTPipeline's null label is hard-coded to 1000 (ImageNet).
    out = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    images = out.images
    assert images.shape == (2, 16, 16, 3) and math.isfinite(float(images.sum()))
