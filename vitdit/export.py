"""Export a vitdit DiT to diffusers' ``DiTTransformer2DModel`` (usable in ``DiTPipeline``), and convert
an MM-DiT to and from diffusers' ``SD3Transformer2DModel`` (:func:`mmdit_to_diffusers`,
:func:`mmdit_from_diffusers`; their key mapping is above them).

Key mapping (after diffusers' ``scripts/convert_dit_to_diffusers.py``; our names are the release's):

=====================================  ===========================================================
vitdit / facebookresearch/DiT          diffusers ``DiTTransformer2DModel``
=====================================  ===========================================================
``x_embedder.proj``                    ``pos_embed.proj`` (diffusers recomputes the sin-cos table)
``t_embedder.mlp.0`` / ``.2``          ``transformer_blocks.N.norm1.emb.timestep_embedder.linear_1/2``
``y_embedder.embedding_table``         ``transformer_blocks.N.norm1.emb.class_embedder.embedding_table``
``blocks.N.adaLN_modulation.1``        ``transformer_blocks.N.norm1.linear``
``blocks.N.attn.qkv`` (fused)          ``transformer_blocks.N.attn1.to_q`` / ``to_k`` / ``to_v``
``blocks.N.attn.proj``                 ``transformer_blocks.N.attn1.to_out.0``
``blocks.N.mlp.fc1`` / ``fc2``         ``transformer_blocks.N.ff.net.0.proj`` / ``ff.net.2``
``final_layer.adaLN_modulation.1``     ``proj_out_1``
``final_layer.linear``                 ``proj_out_2``
=====================================  ===========================================================

diffusers keeps one copy of the timestep and label embedders per block (the shared ones are copied
into every block), so the exported model is an inference equivalent, not a training one: in training
mode each block would drop labels independently.

Two conventions differ from DiT and are set here: the pre-MLP LayerNorm eps (``norm_eps=1e-6``; the
diffusers default is 1e-5) and the timestep sinusoid's frequency shift (diffusers hard-codes
``downscale_freq_shift=1``, i.e. frequencies 10000^(-i/127); DiT uses 10000^(-i/128)). The shift is
not part of diffusers' config, so :func:`dit_to_diffusers` sets it to 0 on every block after
construction; with both set, outputs match ours to <= 1e-5 relative in fp32 (tests/test_dit.py).

**After ``save_pretrained`` + ``from_pretrained`` diffusers rebuilds the shift of 1**, and the
reloaded model's outputs differ from ours by an amount that grows with how much the weights use the
timestep. Measured in fp32 (relative L2 over a batch of 4 with t in {0, 10, 500, 999}, weights from
``initialize_weights`` with the zero-initialised adaLN/output layers filled with N(0, 0.02), seeds
0-2): ``DiT-test/2`` 0.08-0.11%, ``DiT-digits/2`` 0.35-0.40%; with every weight drawn from
N(0, 0.2) it reaches 63% on ``DiT-test/2``; docs/facts.md reports about 6% on its random weights. Call
:func:`set_dit_timestep_shift` on a reloaded model to restore exact equality
(``tests/test_dit.py::test_dit_to_diffusers_save_reload_shift``).

``DiTPipeline`` hard-codes the null label 1000, so classifier-free guidance (``guidance_scale > 1``)
in the pipeline only works for 1000-class models; it also guides all latent channels where DiT's
``forward_with_cfg`` guides three.
"""

from __future__ import annotations

import torch

from vitdit.errors import VitditError
from vitdit.models.dit import DiT


def set_dit_timestep_shift(transformer, shift: float = 0.0):
    """Set every block's timestep ``downscale_freq_shift`` (0 = DiT's convention, 1 = diffusers')."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift
    return transformer


def _diffusers_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    table = sd["y_embedder.embedding_table.weight"]  # num_classes (+1), D
    if table.shape[0] == cfg.num_classes:
        # No null row (class_dropout_prob == 0), but diffusers' LabelEmbedding always has one; an unused zero row keeps
        # every real label's embedding identical.
        table = torch.cat([table, table.new_zeros(1, table.shape[1])], dim=0)  # num_classes + 1, D

    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(cfg.depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = dst + "norm1.emb."
        out[emb + "timestep_embedder.linear_1.weight"] = sd["t_embedder.mlp.0.weight"]
        out[emb + "timestep_embedder.linear_1.bias"] = sd["t_embedder.mlp.0.bias"]
        out[emb + "timestep_embedder.linear_2.weight"] = sd["t_embedder.mlp.2.weight"]
        out[emb + "timestep_embedder.linear_2.bias"] = sd["t_embedder.mlp.2.bias"]
        out[emb + "class_embedder.embedding_table.weight"] = table
        out[dst + "norm1.linear.weight"] = sd[src + "adaLN_modulation.1.weight"]
        out[dst + "norm1.linear.bias"] = sd[src + "adaLN_modulation.1.bias"]
        # Fused qkv rows are [q; k; v], each D rows (Attention reshapes to (B, N, 3, h, d)).
        q, k, v = sd[src + "attn.qkv.weight"].chunk(3, dim=0)  # each D, D
        qb, kb, vb = sd[src + "attn.qkv.bias"].chunk(3, dim=0)  # each D
        for name, w, b in (("to_q", q, qb), ("to_k", k, kb), ("to_v", v, vb)):
            out[f"{dst}attn1.{name}.weight"] = w
            out[f"{dst}attn1.{name}.bias"] = b
        out[dst + "attn1.to_out.0.weight"] = sd[src + "attn.proj.weight"]
        out[dst + "attn1.to_out.0.bias"] = sd[src + "attn.proj.bias"]
        out[dst + "ff.net.0.proj.weight"] = sd[src + "mlp.fc1.weight"]
        out[dst + "ff.net.0.proj.bias"] = sd[src + "mlp.fc1.bias"]
        out[dst + "ff.net.2.weight"] = sd[src + "mlp.fc2.weight"]
        out[dst + "ff.net.2.bias"] = sd[src + "mlp.fc2.bias"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def dit_to_diffusers(model: DiT):
    """A ``diffusers.DiTTransformer2DModel`` (eval mode) carrying ``model``'s weights.

    Only the release's architecture maps: adaLN-Zero conditioning and ``mlp_ratio`` 4 (diffusers'
    feed-forward width is fixed at 4×); anything else raises :class:`VitditError`. The timestep
    shift is set to DiT's 0 on the returned object; it does not survive ``save_pretrained`` (see the
    module docstring for the measured difference and :func:`set_dit_timestep_shift`).
    """
    from diffusers import DiTTransformer2DModel

    if not isinstance(model, DiT):
        raise VitditError(f"dit_to_diffusers needs a vitdit DiT, got {type(model).__name__}")
    cfg = model.config
    if cfg.conditioning != "adaLN-Zero":
        raise VitditError(
            f"dit_to_diffusers: conditioning {cfg.conditioning!r} has no diffusers equivalent; "
            "only 'adaLN-Zero' (the release's) exports"
        )
    if cfg.mlp_ratio != 4.0:
        raise VitditError(f"dit_to_diffusers: mlp_ratio {cfg.mlp_ratio} is not 4.0, diffusers' fixed width")

    param = next(model.parameters())
    transformer = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=cfg.num_classes,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,  # DiT's; diffusers defaults to 1e-5
    )
    transformer.load_state_dict(_diffusers_state_dict(model), strict=True)
    set_dit_timestep_shift(transformer, 0.0)
    transformer = transformer.to(param.device)
    if param.dtype != torch.float32:
        transformer = transformer.to(param.dtype)
    return transformer.eval()


# --- MM-DiT (Stable Diffusion 3) <-> diffusers' SD3Transformer2DModel ---------------------------------
#
# Our keys are the SD3 release's (``joint_blocks`` renamed ``blocks``); the mapping is the one of
# diffusers' ``scripts/convert_sd3_to_diffusers.py``:
#
# =============================================  ==============================================================
# vitdit MMDiT                                   diffusers ``SD3Transformer2DModel``
# =============================================  ==============================================================
# ``pos_embed`` (1, M², D) buffer                ``pos_embed.pos_embed`` (persistent buffer, same table)
# ``x_embedder.proj``                            ``pos_embed.proj``
# ``t_embedder.mlp.0`` / ``.2``                  ``time_text_embed.timestep_embedder.linear_1`` / ``_2``
# ``y_embedder.mlp.0`` / ``.2``                  ``time_text_embed.text_embedder.linear_1`` / ``_2``
# ``context_embedder``                           ``context_embedder``
# ``blocks.N.x_block.attn.qkv`` (fused)          ``transformer_blocks.N.attn.to_q`` / ``to_k`` / ``to_v``
# ``blocks.N.context_block.attn.qkv`` (fused)    ``transformer_blocks.N.attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``
# ``blocks.N.x_block.attn.ln_q`` / ``ln_k``      ``transformer_blocks.N.attn.norm_q`` / ``norm_k``
# ``blocks.N.context_block.attn.ln_q`` / ``ln_k``  ``transformer_blocks.N.attn.norm_added_q`` / ``norm_added_k``
# ``blocks.N.x_block.attn.proj``                 ``transformer_blocks.N.attn.to_out.0``
# ``blocks.N.context_block.attn.proj``           ``transformer_blocks.N.attn.to_add_out`` (not in the last block)
# ``blocks.N.x_block.attn2.*``                   ``transformer_blocks.N.attn2.*`` (dual-attention blocks)
# ``blocks.N.x_block.adaLN_modulation.1``        ``transformer_blocks.N.norm1.linear``
# ``blocks.N.context_block.adaLN_modulation.1``  ``transformer_blocks.N.norm1_context.linear`` (last: halves swapped)
# ``blocks.N.x_block.mlp.fc1`` / ``fc2``         ``transformer_blocks.N.ff.net.0.proj`` / ``ff.net.2``
# ``blocks.N.context_block.mlp.fc1`` / ``fc2``   ``transformer_blocks.N.ff_context.net.0.proj`` / ``.net.2``
# ``final_layer.adaLN_modulation.1``             ``norm_out.linear`` (halves swapped)
# ``final_layer.linear``                         ``proj_out``
# =============================================  ==============================================================
#
# diffusers' ``AdaLayerNormContinuous`` (final norm, last text block) splits its projection as
# (scale, shift); ours and the release's as (shift, scale): those rows are swapped both ways. The
# timestep: ``MMDiT.forward(x, t, ...)`` equals diffusers' ``forward(x, timestep=1000·t, ...)``.


def _mmdit_key_map(cfg) -> list[tuple[str, tuple[str, ...], str]]:
    """(our key, diffusers key(s), how): "copy", "qkv" (our fused rows [q; k; v] ↔ three keys) or
    "swap" (the two halves of the rows exchanged: (shift, scale) ↔ (scale, shift))."""
    out: list[tuple[str, tuple[str, ...], str]] = [("pos_embed", ("pos_embed.pos_embed",), "copy")]

    def linear(ours: str, theirs: str, how: str = "copy") -> None:
        for p in ("weight", "bias"):
            out.append((f"{ours}.{p}", (f"{theirs}.{p}",), how))

    def qkv(ours: str, names: tuple[str, str, str]) -> None:
        for p in ("weight", "bias"):
            out.append((f"{ours}.{p}", tuple(f"{n}.{p}" for n in names), "qkv"))

    def qk_norm(ours: str, theirs_q: str, theirs_k: str) -> None:
        if cfg.qk_norm:
            out.append((f"{ours}.ln_q.weight", (f"{theirs_q}.weight",), "copy"))
            out.append((f"{ours}.ln_k.weight", (f"{theirs_k}.weight",), "copy"))

    linear("x_embedder.proj", "pos_embed.proj")
    linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    linear("context_embedder", "context_embedder")
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        x, c, d = f"blocks.{i}.x_block.", f"blocks.{i}.context_block.", f"transformer_blocks.{i}."
        qkv(x + "attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"))
        qkv(c + "attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"))
        qk_norm(x + "attn", d + "attn.norm_q", d + "attn.norm_k")
        qk_norm(c + "attn", d + "attn.norm_added_q", d + "attn.norm_added_k")
        linear(x + "attn.proj", d + "attn.to_out.0")
        if i in cfg.dual_attention_layers:
            qkv(x + "attn2.qkv", (d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"))
            qk_norm(x + "attn2", d + "attn2.norm_q", d + "attn2.norm_k")
            linear(x + "attn2.proj", d + "attn2.to_out.0")
        linear(x + "adaLN_modulation.1", d + "norm1.linear")
        linear(c + "adaLN_modulation.1", d + "norm1_context.linear", "swap" if last else "copy")
        linear(x + "mlp.fc1", d + "ff.net.0.proj")
        linear(x + "mlp.fc2", d + "ff.net.2")
        if not last:
            linear(c + "attn.proj", d + "attn.to_add_out")
            linear(c + "mlp.fc1", d + "ff_context.net.0.proj")
            linear(c + "mlp.fc2", d + "ff_context.net.2")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    linear("final_layer.linear", "proj_out")
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)  # rows: (shift, scale) ↔ (scale, shift)
    return torch.cat([b, a], dim=0)


def _sd3_kwargs(cfg) -> dict:
    return dict(
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=tuple(cfg.dual_attention_layers),
        qk_norm=cfg.qk_norm,
    )


def mmdit_to_diffusers(model):
    """A ``diffusers.SD3Transformer2DModel`` (eval mode, ``model``'s device and dtype) carrying
    ``model``'s weights: ``transformer(x, encoder_hidden_states=context, pooled_projections=pooled,
    timestep=1000 * t).sample`` equals ``model(x, t, context, pooled)``.

    diffusers' feed-forward width is fixed at 4×: another ``mlp_ratio`` raises :class:`VitditError`.
    The conversion survives ``save_pretrained`` / ``from_pretrained`` unchanged (every convention
    is in the config or the weights).
    """
    from diffusers import SD3Transformer2DModel

    from vitdit.models.mmdit import MMDiT

    if not isinstance(model, MMDiT):
        raise VitditError(f"mmdit_to_diffusers needs a vitdit MMDiT, got {type(model).__name__}")
    cfg = model.config
    if cfg.mlp_ratio != 4.0:
        raise VitditError(f"mmdit_to_diffusers: mlp_ratio {cfg.mlp_ratio} is not 4.0, diffusers' fixed width")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in _mmdit_key_map(cfg):
        if how == "qkv":
            out.update(zip(theirs, sd[ours].chunk(3, dim=0)))  # rows [q; k; v]
        else:
            out[theirs[0]] = _swap_halves(sd[ours]) if how == "swap" else sd[ours]
    param = next(model.parameters())
    transformer = SD3Transformer2DModel(**_sd3_kwargs(cfg))
    transformer.load_state_dict({k: v.clone().contiguous() for k, v in out.items()}, strict=True)
    transformer = transformer.to(param.device)
    if param.dtype != torch.float32:
        transformer = transformer.to(param.dtype)
    return transformer.eval()


def mmdit_from_diffusers(source):
    """A vitdit :class:`~vitdit.models.mmdit.MMDiT` (eval mode) from an ``SD3Transformer2DModel`` or
    a directory written by its ``save_pretrained`` (e.g. a pipeline's ``transformer/`` folder).

    ``context_len`` (not part of diffusers' config) keeps its default, SD3's 333. Configurations
    this model does not express raise :class:`VitditError`: a caption projection narrower or wider
    than the hidden size, no position table (``pos_embed_max_size=None``), a qk-norm other than
    RMS.
    """
    import os

    from diffusers import SD3Transformer2DModel

    from vitdit.models.mmdit import MMDiT, MMDiTConfig

    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise VitditError(
                f"mmdit_from_diffusers: {source} has no config.json (not a save_pretrained dir)"
            )
        source = SD3Transformer2DModel.from_pretrained(source)
    if not isinstance(source, SD3Transformer2DModel):
        raise VitditError(
            f"mmdit_from_diffusers needs an SD3Transformer2DModel or its directory, got {type(source).__name__}"
        )
    c = source.config
    hidden = c.num_attention_heads * c.attention_head_dim
    if c.caption_projection_dim != hidden:
        raise VitditError(
            f"mmdit_from_diffusers: caption_projection_dim {c.caption_projection_dim} differs from the "
            f"hidden size {hidden}; the joint attention needs both streams at one width"
        )
    if c.pos_embed_max_size is None:
        raise VitditError("mmdit_from_diffusers: pos_embed_max_size is None (no cropped SD3 position table)")
    if c.qk_norm not in (None, "rms_norm"):
        raise VitditError(f"mmdit_from_diffusers: qk_norm {c.qk_norm!r} is not None or 'rms_norm'")
    cfg = MMDiTConfig(
        input_size=c.sample_size,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels if c.out_channels is not None else c.in_channels,
        depth=c.num_layers,
        hidden_size=hidden,
        num_heads=c.num_attention_heads,
        mlp_ratio=4.0,
        context_dim=c.joint_attention_dim,
        pooled_dim=c.pooled_projection_dim,
        pos_embed_max_size=c.pos_embed_max_size,
        qk_norm=c.qk_norm,
        dual_attention_layers=tuple(sorted(c.dual_attention_layers or ())),
    )
    theirs = {k: v.detach() for k, v in source.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    for ours, keys, how in _mmdit_key_map(cfg):
        if how == "qkv":
            sd[ours] = torch.cat([theirs[k] for k in keys], dim=0)  # rows [q; k; v]
        else:
            sd[ours] = _swap_halves(theirs[keys[0]]) if how == "swap" else theirs[keys[0]]
    param = next(source.parameters())
    with torch.device("meta"):
        model = MMDiT(cfg)  # no initialisation: every tensor is assigned below
    model.load_state_dict({k: v.clone().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    return model.to(device=param.device, dtype=param.dtype).eval()


__all__ = ["dit_to_diffusers", "mmdit_from_diffusers", "mmdit_to_diffusers", "set_dit_timestep_shift"]
