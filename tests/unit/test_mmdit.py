"""MM-DiT (Stable Diffusion 3): presets and parameter counts against diffusers, layout, MACs, the
forward contract, and equivalence with diffusers' SD3Transformer2DModel through vitdit.export."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _tolerance import TRANSFORMER_BLOCK_LAYERS, reassociation_rtol, reassociation_tol
from torch.utils.flop_counter import FlopCounterMode

from vitdit.errors import VitditError
from vitdit.models import MMDIT_PRESETS, MMDiT, MMDiTConfig, config_from_dict, create_model, list_models
from vitdit.models.layers import set_attn_impl
from vitdit.models.mmdit import TIMESTEP_SCALE, mmdit_forward_macs, sincos_table

# MMDiT-tiny in tests/_tolerance.py's terms: its longest reductions are the timestep MLP's 256-d
# input and fc2's 4·64 = 256; per block the usual transformer-block chain (plus 5 for a dual block's
# second attention), then patch embedding, timestep MLP (2), context embedder, final adaLN, norm and
# linear.
TINY_N = 256


def _layers(cfg: MMDiTConfig) -> int:
    return cfg.depth * TRANSFORMER_BLOCK_LAYERS + 5 * len(cfg.dual_attention_layers) + 7


# A norm-wise relative error ‖a - b‖/‖b‖ averages over every element, so it needs none of MARGIN's 4×
# for the extreme element, only the 2× for layer gains: 2·√(25·256)·2⁻²⁴ ≈ 9.5e-6 for MMDiT-tiny
# (1.04e-5 with one dual block).
NORMWISE_MARGIN = 2.0

VARIANTS = {
    "sd3": {},
    "qk_norm": {"qk_norm": "rms_norm"},
    "dual": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
}


def _randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Fill every zero-initialised layer (adaLN of both streams, final layer) with small noise, and
    move the RMS norms' unit weights off 1: every weight then changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif (p == 1).all():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _tiny(seed: int = 0, **overrides) -> MMDiT:
    torch.manual_seed(seed)
    return _randomise(create_model("MMDiT-tiny", **overrides), seed).eval()


def _inputs(cfg: MMDiTConfig, batch: int = 4, seed: int = 0, size: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    size = size or cfg.input_size
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
    t = torch.tensor([0.0, 0.01, 0.5, 1.0][:batch])
    context = torch.randn(batch, cfg.context_len, cfg.context_dim, generator=gen)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=gen)
    return x, t, context, pooled


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _diffusers_out(transformer, x, t, context, pooled) -> torch.Tensor:
    # SD3's convention: diffusers' timestep is 1000·t.
    return transformer(
        x, encoder_hidden_states=context, pooled_projections=pooled, timestep=TIMESTEP_SCALE * t
    ).sample


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- presets, layout, cost ----------------------------------------------------------------------


def test_presets_and_registry():
    names = set(list_models("mmdit"))
    assert {"MMDiT-d8", "MMDiT-d12", "MMDiT-d24", "SD3-Medium", "SD3.5-Large", "SD3.5-Medium"} <= names
    assert {"MMDiT-tiny", "MMDiT-digits"} <= names
    for d in (8, 12, 24):  # the paper's family: width 64·d, d heads of 64
        cfg = MMDIT_PRESETS[f"MMDiT-d{d}"]
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (d, 64 * d, d)
        assert (cfg.input_size, cfg.in_channels, cfg.patch_size) == (128, 16, 2)
    assert MMDIT_PRESETS["SD3-Medium"].context_len == 77 + 256
    digits = MMDIT_PRESETS["MMDiT-digits"]
    assert (digits.hidden_size, digits.depth, digits.num_heads, digits.input_size) == (128, 4, 4, 8)
    cfg = MMDIT_PRESETS["SD3.5-Medium"]
    assert config_from_dict("mmdit", json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


@pytest.mark.parametrize("name", ["SD3-Medium", "SD3.5-Large", "SD3.5-Medium"])
def test_released_configs_match_diffusers_parameter_counts(name):
    """The real SD3 sizes, built on the meta device: same parameters as diffusers' model of the
    released config (SD3-Medium 2.03B, SD3.5-Large 8.06B, SD3.5-Medium 2.24B), and our key map
    produces exactly diffusers' state-dict keys and shapes."""
    from diffusers import SD3Transformer2DModel

    from vitdit.export import _mmdit_key_map, _sd3_kwargs

    with torch.device("meta"):
        ours = create_model(name)
        theirs = SD3Transformer2DModel(**_sd3_kwargs(ours.config))
    assert _n_params(ours) == _n_params(theirs)
    expected = {"SD3-Medium": 2.03e9, "SD3.5-Large": 8.06e9, "SD3.5-Medium": 2.24e9}[name]
    assert abs(_n_params(ours) - expected) / expected < 0.005
    sd, their_sd = ours.state_dict(), theirs.state_dict()
    mapped = {}
    for key, keys, _how in _mmdit_key_map(ours.config):
        for k in keys:
            shape = list(sd[key].shape)
            shape[0] //= len(keys)  # a fused qkv splits its rows in three
            mapped[k] = shape
    assert mapped == {k: list(v.shape) for k, v in their_sd.items()}
    assert set(k for k, _, _ in _mmdit_key_map(ours.config)) == set(sd)


def test_last_block_text_stream_gives_keys_and_values_only():
    sd = create_model("MMDiT-tiny", qk_norm="rms_norm").state_dict()
    last, first = "blocks.1.context_block.", "blocks.0.context_block."
    assert f"{first}attn.proj.weight" in sd and f"{first}mlp.fc1.weight" in sd
    assert not any(k.startswith((f"{last}attn.proj", f"{last}mlp", f"{last}norm2")) for k in sd)
    assert sd[f"{last}adaLN_modulation.1.weight"].shape == (2 * 64, 64)  # (shift, scale) only
    assert sd[f"{last}attn.qkv.weight"].shape == (3 * 64, 64)  # release layout: q rows kept
    assert sd["blocks.1.x_block.adaLN_modulation.1.weight"].shape == (6 * 64, 64)
    dual = create_model("MMDiT-tiny", dual_attention_layers=(0,)).state_dict()
    assert dual["blocks.0.x_block.adaLN_modulation.1.weight"].shape == (9 * 64, 64)
    assert "blocks.0.x_block.attn2.qkv.weight" in dual and "blocks.1.x_block.attn2.qkv.weight" not in dual


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_macs_equal_flop_counter(variant):
    """forward_macs == FlopCounterMode FLOPs / 2, exactly, on the math attention path (FlopCounterMode
    has no formula for the CPU SDPA kernel), at the config's context_len and at another length."""
    model = set_attn_impl(create_model("MMDiT-tiny", **VARIANTS[variant]), "math").eval()
    cfg = model.config
    for length in (cfg.context_len, 3):
        x, t, context, pooled = _inputs(cfg, batch=1)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, context[:, :length], pooled)
        assert counter.get_total_flops() == 2 * mmdit_forward_macs(cfg, context_len=length)
    assert model.forward_macs() == mmdit_forward_macs(cfg, context_len=cfg.context_len)


def test_sd3_medium_macs_by_hand():
    """SD3-Medium at 1024 px (4096 image + 333 text tokens): the count written out once by hand."""
    cfg = MMDIT_PRESETS["SD3-Medium"]
    D, T, L, d = 1536, 4096, 333, 24
    N = T + L
    joint = 6 * D * D * 2 + N * 3 * D * D + 2 * N * N * D + N * D * D + 2 * N * D * 4 * D
    last = 6 * D * D + 2 * D * D + T * D * D + N * 2 * D * D + 2 * T * N * D + T * D * D + 2 * T * D * 4 * D
    embed = T * 16 * 4 * D + 256 * D + D * D + 2048 * D + D * D + L * 4096 * D
    final = 2 * D * D + T * D * 4 * 16
    assert (cfg.hidden_size, cfg.num_patches, cfg.context_len, cfg.depth) == (D, T, L, d)
    assert mmdit_forward_macs(cfg) == embed + (d - 1) * joint + last + final


# --- the forward contract -----------------------------------------------------------------------


def test_initialisation_is_adaln_zero():
    model = create_model("MMDiT-tiny")
    for block in model.blocks:
        for stream in (block.x_block, block.context_block):
            assert not stream.adaLN_modulation[-1].weight.any() and not stream.adaLN_modulation[-1].bias.any()
    assert not model(*_inputs(model.config)).any()  # a fresh model predicts v = 0


def test_forward_shapes_and_other_resolutions():
    model = _tiny()
    cfg = model.config
    x, t, context, pooled = _inputs(cfg)
    out = model(x, t, context, pooled)
    assert out.shape == x.shape and out.abs().mean() > 1e-3
    # Up to pos_embed_max_size·patch (16) per side, any aspect ratio, any number of text tokens.
    wide = torch.randn(2, 4, 6, 16)
    assert model(wide, t[:2], context[:2, :5], pooled[:2]).shape == (2, 4, 6, 16)


def test_bad_inputs_raise():
    model = create_model("MMDiT-tiny")
    x, t, context, pooled = _inputs(model.config, batch=2)
    with pytest.raises(VitditError, match="shape"):
        model(x[:, :3], t, context, pooled)
    with pytest.raises(VitditError, match="multiple of patch_size"):
        model(torch.zeros(2, 4, 7, 8), t, context, pooled)
    with pytest.raises(VitditError, match="pos_embed_max_size"):
        model(torch.zeros(2, 4, 18, 8), t, context, pooled)
    with pytest.raises(VitditError, match="context"):
        model(x, t, context[..., :5], pooled)
    with pytest.raises(VitditError, match="pooled"):
        model(x, t, context, pooled[:1])
    with pytest.raises(VitditError, match=r"\(2,\)"):
        model(x, t[:1], context, pooled)
    with pytest.raises(VitditError, match="dual_attention_layers"):
        MMDiTConfig(depth=2, dual_attention_layers=(2,))
    with pytest.raises(VitditError, match="qk_norm"):
        MMDiTConfig(qk_norm="layer_norm")
    with pytest.raises(VitditError, match="pos_embed_max_size"):
        MMDiTConfig(input_size=64, patch_size=2, pos_embed_max_size=16)


def test_position_table_matches_diffusers_and_is_centre_cropped():
    """The fresh table equals diffusers' (positions scaled by base_size / max_size), and a 4×4 grid
    reads rows and columns 2..5 of the 8×8 table."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    model = create_model("MMDiT-tiny")
    theirs = get_2d_sincos_pos_embed(64, 8, base_size=4, output_type="pt").float()
    assert torch.allclose(model.pos_embed[0], theirs, rtol=0, atol=1e-6)
    assert torch.allclose(model.pos_embed[0], torch.from_numpy(sincos_table(64, 8, 4)).float())
    table = model.pos_embed.reshape(8, 8, 64)
    assert torch.equal(model.cropped_pos_embed(4, 4)[0], table[2:6, 2:6].reshape(16, 64))
    # Column 1 of the table sits at coordinate 0.5 (base 4 over 8 positions): sin(0.5) at frequency 1.
    assert table[0, 1, 0].item() == pytest.approx(torch.sin(torch.tensor(0.5)).item())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_trainable_parameter_gets_a_gradient(variant):
    """Nothing DDP would see as unused: the last text block's query norm is frozen, not dangling."""
    model = _tiny(**VARIANTS[variant]).train()
    model(*_inputs(model.config)).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == (["blocks.1.context_block.attn.ln_q.weight"] if model.config.qk_norm else [])


def test_batch_equals_singles():
    model = _tiny(qk_norm="rms_norm")
    x, t, context, pooled = _inputs(model.config)
    with torch.no_grad():
        batched = model(x, t, context, pooled)
        singles = torch.cat([model(x[i : i + 1], t[i : i + 1], context[i : i + 1], pooled[i : i + 1])
                             for i in range(4)])  # fmt: skip
    # Batch 4 and batch 1 take differently blocked GEMM kernels: fp32 reassociation error only.
    assert torch.allclose(singles, batched, **reassociation_tol(batched, TINY_N, _layers(model.config)))


def test_grad_checkpointing_equals_plain():
    from pipelines.train.loop import enable_grad_checkpointing

    plain, wrapped = _tiny(**VARIANTS["dual"]).train(), _tiny(**VARIANTS["dual"]).train()
    enable_grad_checkpointing(wrapped)
    inputs = _inputs(plain.config)
    outs = []
    for model in (plain, wrapped):
        out = model(*inputs)
        out.square().mean().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])  # recomputation runs the same kernels on the same shapes
    layers = 2 * _layers(plain.config)  # a gradient passes the network forwards and backwards
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        if a.requires_grad:  # backward may accumulate the shared c's contributions in another order
            assert torch.allclose(b.grad, a.grad, **reassociation_tol(a.grad, TINY_N, layers)), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_math_attention_equals_sdpa(variant):
    model = _tiny(**VARIANTS[variant])
    inputs = _inputs(model.config)
    with torch.no_grad():
        sdpa = model(*inputs)
        math_ = set_attn_impl(model, "math")(*inputs)
    assert all(m.attn_impl == "math" for m in model.modules() if hasattr(m, "attn_impl"))
    assert torch.allclose(math_, sdpa, **reassociation_tol(sdpa, TINY_N, _layers(model.config)))


def test_bf16_autocast_runs_with_qk_norm():
    model = _tiny(**VARIANTS["dual"])
    inputs = _inputs(model.config)
    with torch.no_grad():
        ref = model(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = set_attn_impl(model, "math")(*inputs)
    # Rounding every matmul input to bf16 (u = 2⁻⁸): a few u relative, far below an O(1) error.
    assert _rel(out.float(), ref) < 0.05


# --- diffusers conversion -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_to_and_from_diffusers_match_in_fp32(variant, tmp_path):
    from diffusers import SD3Transformer2DModel

    from vitdit.export import mmdit_from_diffusers, mmdit_to_diffusers

    model = _tiny(**VARIANTS[variant])
    cfg = model.config
    transformer = mmdit_to_diffusers(model)
    assert _n_params(transformer) == _n_params(model)
    inputs = _inputs(cfg)
    # ≈ 1e-5: 9.5e-6 for the SD3 layout, 1.04e-5 with the dual block's extra attention.
    bound = reassociation_rtol(TINY_N, _layers(cfg), margin=NORMWISE_MARGIN)
    with torch.no_grad():
        ours = model(*inputs)
        theirs = _diffusers_out(transformer, *inputs)
    assert ours.abs().mean() > 1e-3  # a real output, not the zero of a fresh adaLN-Zero model
    assert _rel(theirs, ours) <= bound  # two implementations of one network: rounding only

    # Through diffusers' own files, and back: every convention is in the config or the weights.
    transformer.save_pretrained(tmp_path / "transformer")
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    back = mmdit_from_diffusers(tmp_path / "transformer")
    assert dataclasses.replace(back.config, context_len=cfg.context_len) == cfg
    with torch.no_grad():
        assert torch.equal(_diffusers_out(reloaded, *inputs), theirs)
        assert torch.equal(back(*inputs), ours)  # the same weights in the same network: bit-identical
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_from_diffusers_on_a_diffusers_initialised_model():
    """diffusers → ours from diffusers' own random weights (not ours round-tripped)."""
    from diffusers import SD3Transformer2DModel

    from vitdit.export import _sd3_kwargs, mmdit_from_diffusers

    cfg = MMDIT_PRESETS["MMDiT-tiny"]
    torch.manual_seed(1)
    transformer = _randomise(
        SD3Transformer2DModel(**_sd3_kwargs(dataclasses.replace(cfg, qk_norm="rms_norm")))
    )
    model = mmdit_from_diffusers(transformer.eval())
    inputs = _inputs(model.config)
    with torch.no_grad():
        theirs = _diffusers_out(transformer, *inputs)
        ours = model(*inputs)
    assert ours.abs().mean() > 1e-3
    assert _rel(ours, theirs) <= reassociation_rtol(TINY_N, _layers(model.config), margin=NORMWISE_MARGIN)


def test_conversion_rejects_what_does_not_map(tmp_path):
    from diffusers import SD3Transformer2DModel

    from vitdit.export import _sd3_kwargs, mmdit_from_diffusers, mmdit_to_diffusers

    with pytest.raises(VitditError, match="mlp_ratio"):
        mmdit_to_diffusers(create_model("MMDiT-tiny", mlp_ratio=2.0))
    with pytest.raises(VitditError, match="MMDiT"):
        mmdit_to_diffusers(create_model("DiT-test/2"))
    with pytest.raises(VitditError, match="config.json"):
        mmdit_from_diffusers(tmp_path)
    kwargs = {**_sd3_kwargs(MMDIT_PRESETS["MMDiT-tiny"]), "caption_projection_dim": 32}
    with pytest.raises(VitditError, match="caption_projection_dim"):
        mmdit_from_diffusers(SD3Transformer2DModel(**kwargs))
