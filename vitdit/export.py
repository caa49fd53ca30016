"""Export a vitdit DiT to diffusers' ``DiTTransformer2DModel`` (usable in ``DiTPipeline``).

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
N(0, 0.2) it reaches 63% on ``DiT-test/2``; FACTS.md reports about 6% on its random weights. Call
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


__all__ = ["dit_to_diffusers", "set_dit_timestep_shift"]
