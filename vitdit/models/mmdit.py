"""Multimodal Diffusion Transformer (MM-DiT), as in Esser et al., "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis" (Stable Diffusion 3, 2024), with SD3.5-Medium's extra image-only
attention ("MMDiT-X").

Two token streams, image patches and text tokens, each with its own weights (adaLN modulation, qkv,
output projection, MLP), meet in ONE attention over the concatenated sequence (paper Sec. 4, Fig. 2).
Both streams are modulated by the same conditioning vector c = t-embedding + pooled-text embedding
(adaLN-Zero). The last block's text stream only contributes keys and values: nothing reads the text
tokens after it, so it has no output projection and no MLP (diffusers' ``context_pre_only``).

Module and parameter names follow the SD3 release (``x_embedder``, ``t_embedder``, ``y_embedder``,
``context_embedder``, ``pos_embed``, ``x_block`` / ``context_block`` with ``attn.qkv``, ``attn.ln_q``,
``attn.ln_k``, ``attn.proj``, ``attn2``, ``adaLN_modulation``, ``mlp.fc1/fc2``, ``final_layer``) except
that the joint blocks live in ``blocks`` (the release's ``joint_blocks``), where the trainer's
gradient checkpointing finds them. :mod:`vitdit.export` converts to and from diffusers'
``SD3Transformer2DModel``.

Conventions that differ silently between implementations (all handled by ``vitdit.export``):

- time: ``forward`` takes rectified-flow time t ∈ [0, 1] (1 = noise); the timestep embedder sees
  ``1000·t``, as SD3 does, so diffusers' model called with ``timestep = 1000·t`` is the same function;
- the final layer's and the last text block's 2-way modulation is (shift, scale) here and in the
  release, (scale, shift) in diffusers' ``AdaLayerNormContinuous``;
- position table: a sin-cos table for a ``pos_embed_max_size``² grid whose positions are scaled so the
  whole table spans ``input_size / patch_size`` units (diffusers' ``base_size``); an h×w patch grid
  uses its centre crop. The table is a persistent buffer, as in the release's checkpoints.

Cost: :func:`mmdit_forward_macs` counts multiply-accumulates of one forward pass on one sample at
``config.context_len`` text tokens (SD3: 77 CLIP + 256 T5 = 333). Training FLOPs ≈ 6 × MACs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitdit.errors import VitditError
from vitdit.models.dit import FREQUENCY_EMBEDDING_SIZE, modulate, timestep_embedding
from vitdit.models.layers import Mlp, PatchEmbed, attention, attention_macs, mlp_macs

# SD3's timestep embedder sees t·1000 for t ∈ [0, 1] (its training used discrete-looking timesteps).
TIMESTEP_SCALE = 1000.0

QK_NORMS = (None, "rms_norm")


@dataclass(frozen=True)
class MMDiTConfig:
    """Hyper-parameters of an MM-DiT (diffusers' names in brackets where they differ)."""

    input_size: int = 128  # latent height = width the model is sized for [sample_size] (1024 px / 8)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    depth: int = 24  # [num_layers]
    hidden_size: int = 1536  # [num_attention_heads · attention_head_dim = caption_projection_dim]
    num_heads: int = 24  # [num_attention_heads]
    mlp_ratio: float = 4.0
    context_dim: int = 4096  # width of the text encoders' tokens [joint_attention_dim]
    pooled_dim: int = 2048  # width of the pooled text vector [pooled_projection_dim]
    pos_embed_max_size: int = 192  # side of the position table, in patches
    qk_norm: str | None = None  # None or "rms_norm" (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # blocks with a 2nd, image-only attention (SD3.5-M)
    context_len: int = 333  # text tokens the model is sized for (77 CLIP + 256 T5): MACs, docs

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise VitditError(f"MMDiT depth {self.depth} must be >= 1")
        if self.input_size % self.patch_size:
            raise VitditError(
                f"MMDiT input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise VitditError(
                f"MMDiT hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            # The 2-D sin-cos table splits the width in 4 (sin/cos × row/column).
            raise VitditError(f"MMDiT hidden_size {self.hidden_size} must be a multiple of 4")
        if self.pos_embed_max_size < self.input_size // self.patch_size:
            raise VitditError(
                f"MMDiT pos_embed_max_size {self.pos_embed_max_size} is smaller than the "
                f"{self.input_size // self.patch_size}-patch grid of input_size {self.input_size}"
            )
        if self.qk_norm not in QK_NORMS:
            raise VitditError(f"MMDiT qk_norm {self.qk_norm!r} is not one of {QK_NORMS}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise VitditError(f"MMDiT dual_attention_layers {bad} are not block indices 0..{self.depth - 1}")
        if self.context_len < 1:
            raise VitditError(f"MMDiT context_len {self.context_len} must be >= 1")

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2


def _depth_rule(depth: int, **overrides) -> MMDiTConfig:
    """The paper's scaling family, parameterised by depth d: hidden size 64·d, d heads of 64 channels."""
    return MMDiTConfig(depth=depth, hidden_size=64 * depth, num_heads=depth, **overrides)


MMDIT_PRESETS: dict[str, MMDiTConfig] = {f"MMDiT-d{d}": _depth_rule(d) for d in (8, 12, 24)}
# The released models (diffusers' transformer/config.json of each): SD3-Medium is the 2B depth-24
# model; SD3.5-Large the 8B depth-38 one with RMS qk-norm; SD3.5-Medium adds qk-norm, a 384-patch
# position table and a second, image-only attention in its first 13 blocks.
MMDIT_PRESETS["SD3-Medium"] = _depth_rule(24, pos_embed_max_size=192)
MMDIT_PRESETS["SD3.5-Large"] = _depth_rule(38, pos_embed_max_size=192, qk_norm="rms_norm")
MMDIT_PRESETS["SD3.5-Medium"] = _depth_rule(
    24, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))
)
MMDIT_PRESETS["MMDiT-tiny"] = MMDiTConfig(
    input_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    depth=2,
    hidden_size=64,
    num_heads=2,
    context_dim=32,
    pooled_dim=32,
    pos_embed_max_size=8,  # larger than the 4×4 grid: the forward pass takes a centre crop
    context_len=8,
)
# A CPU recipe for the digits VAE's 8×8×4 latents at DiT-digits/2's width and depth.
MMDIT_PRESETS["MMDiT-digits"] = MMDiTConfig(
    input_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    depth=4,
    hidden_size=128,
    num_heads=4,
    context_dim=64,
    pooled_dim=64,
    pos_embed_max_size=4,
    context_len=16,
)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions → (M, dim) [sin, cos] features (MAE's frequencies, float64)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # dim/2
    out = np.outer(pos.reshape(-1), omega)  # M, dim/2
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # M, dim


def sincos_table(dim: int, max_size: int, base_size: int) -> np.ndarray:
    """SD3's (max_size², dim) 2-D sin-cos position table, row-major over a max_size² patch grid.

    Grid position i maps to the coordinate i·base_size/max_size, so the whole table spans
    ``base_size`` units whatever its size (diffusers' ``get_2d_sincos_pos_embed`` with
    ``base_size = sample_size // patch_size``). First half of the channels: the column coordinate,
    second half: the row (as DiT/MAE).
    """
    coords = np.arange(max_size, dtype=np.float64) / (max_size / base_size)
    grid_w, grid_h = np.meshgrid(coords, coords)  # each M, M; grid_w varies along columns
    return np.concatenate([_sincos_1d(dim // 2, grid_w), _sincos_1d(dim // 2, grid_h)], axis=1)  # M², dim


class VectorEmbedder(nn.Module):
    """A vector → Linear → SiLU → Linear → (B, D): the timestep and pooled-text embedders."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.mlp(v)  # B, D


def _qk_norm(kind: str | None, head_dim: int) -> nn.Module:
    # Per-head RMS norm of queries and keys (SD3.5), which keeps attention logits bounded in large
    # models (the SD3 paper's mixed-precision instability fix, after ViT-22B's QK normalisation).
    return nn.RMSNorm(head_dim, eps=1e-6) if kind == "rms_norm" else nn.Identity()


def _normed(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` computed in fp32 and returned in x's dtype (the attention needs one dtype): under
    bf16 autocast a bf16 input with an fp32 weight misses torch's fused RMS-norm kernel."""
    return x if isinstance(norm, nn.Identity) else norm(x.float()).to(x.dtype)


class StreamAttention(nn.Module):
    """One stream's attention weights: fused qkv, optional q/k RMS norm, output projection.

    The joint attention itself runs in :class:`JointBlock` over both streams' q, k, v. ``pre_only``:
    the stream's tokens are never read after this layer (the last text block), so no ``proj``.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = _qk_norm(qk_norm, head_dim)
        self.ln_k = _qk_norm(qk_norm, head_dim)
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) → q, k, v, each (B, h, N, d)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # B, N, 3, h, d
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, h, N, d
        return _normed(self.ln_q, q), _normed(self.ln_k, k), v

    def kv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) → k, v, each (B, h, N, d), without computing q (its rows of qkv stay unused)."""
        B, N, D = x.shape
        w, b = self.qkv.weight[D:], self.qkv.bias[D:]  # rows: q, k, v
        kv = F.linear(x, w, b).reshape(B, N, 2, self.num_heads, D // self.num_heads)  # B, N, 2, h, d
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, h, N, d
        return _normed(self.ln_k, k), v


class SelfAttention(StreamAttention):
    """Image-only self-attention: SD3.5-Medium's second attention (``attn2``) in the dual blocks."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, attn_impl: str = "sdpa"):
        super().__init__(dim, num_heads, qk_norm)
        self.attn_impl = attn_impl  # switched by vitdit.models.layers.set_attn_impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv_heads(x)  # each B, h, N, d
        out = attention(q, k, v, self.attn_impl)  # B, h, N, d
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # B, N, D


def _norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


class StreamBlock(nn.Module):
    """One stream's half of a joint block (the release's ``DismantledBlock``).

    adaLN-Zero regresses from c: shift, scale, gate for attention and for the MLP (6·D); the dual
    variant adds shift, scale, gate for ``attn2`` (9·D); a ``pre_only`` stream only needs the
    attention input's (shift, scale) (2·D) and has no MLP.
    """

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        D = cfg.hidden_size
        self.pre_only = pre_only
        self.norm1 = _norm(D)
        self.attn = StreamAttention(D, cfg.num_heads, cfg.qk_norm, pre_only=pre_only)
        self.attn2 = SelfAttention(D, cfg.num_heads, cfg.qk_norm) if dual else None
        if pre_only:
            self.norm2 = self.mlp = None
        else:
            self.norm2 = _norm(D)
            self.mlp = Mlp(D, int(D * cfg.mlp_ratio), approximate_gelu=True)
        chunks = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, chunks * D))


class JointBlock(nn.Module):
    """Image and text streams, separate weights, one attention over [image; text] (paper Fig. 2b)."""

    def __init__(self, cfg: MMDiTConfig, last: bool, dual: bool, attn_impl: str = "sdpa"):
        super().__init__()
        self.attn_impl = attn_impl  # the joint attention's; switched by set_attn_impl
        self.x_block = StreamBlock(cfg, dual=dual)
        self.context_block = StreamBlock(cfg, pre_only=last)
        if last and cfg.qk_norm:
            # The last text stream's queries are never computed; freezing their norm keeps its
            # (release-layout) weight out of the optimiser and out of DDP's gradient reduction.
            self.context_block.attn.ln_q.weight.requires_grad_(False)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) image tokens, context (B, L, D) text tokens, c (B, D) → (x, context or None)."""
        xb, cb = self.x_block, self.context_block
        B, T, D = x.shape
        mod = xb.adaLN_modulation(c).chunk(9 if xb.attn2 is not None else 6, dim=1)  # each B, D
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x_norm = xb.norm1(x)  # B, T, D
        q, k, v = xb.attn.qkv_heads(modulate(x_norm, shift_msa, scale_msa))  # each B, h, T, d
        if cb.pre_only:
            c_shift, c_scale = cb.adaLN_modulation(c).chunk(2, dim=1)  # each B, D
            ck, cv = cb.attn.kv_heads(modulate(cb.norm1(context), c_shift, c_scale))  # each B, h, L, d
            k, v = torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)  # each B, h, T + L, d
        else:
            c_mod = cb.adaLN_modulation(c).chunk(6, dim=1)  # each B, D
            cq, ck, cv = cb.attn.qkv_heads(modulate(cb.norm1(context), c_mod[0], c_mod[1]))  # B, h, L, d
            q, k, v = (torch.cat(pair, dim=2) for pair in ((q, cq), (k, ck), (v, cv)))  # B, h, T + L, d
        out = attention(q, k, v, self.attn_impl)  # B, h, T (+ L), d
        out = out.transpose(1, 2).reshape(B, q.shape[2], D)  # B, T (+ L), D

        x = x + gate_msa.unsqueeze(1) * xb.attn.proj(out[:, :T])  # B, T, D
        if xb.attn2 is not None:
            # SD3.5-Medium: image-only attention on the same normalised input, its own modulation.
            shift2, scale2, gate2 = mod[6:]
            x = x + gate2.unsqueeze(1) * xb.attn2(modulate(x_norm, shift2, scale2))  # B, T, D
        x = x + gate_mlp.unsqueeze(1) * xb.mlp(modulate(xb.norm2(x), shift_mlp, scale_mlp))  # B, T, D
        if cb.pre_only:
            return x, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
        context = context + c_gate_msa.unsqueeze(1) * cb.attn.proj(out[:, T:])  # B, L, D
        h = cb.mlp(modulate(cb.norm2(context), c_shift_mlp, c_scale_mlp))  # B, L, D
        context = context + c_gate_mlp.unsqueeze(1) * h  # B, L, D
        return x, context


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) on a non-affine LayerNorm, then the linear decoder to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each B, D (diffusers: scale, shift)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # B, T, p·p·out


class MMDiT(nn.Module):
    """(noisy latents, t, text tokens, pooled text) → velocity, as SD3's transformer."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_size = cfg.patch_size
        self.out_channels = cfg.out_channels
        D = cfg.hidden_size

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = VectorEmbedder(FREQUENCY_EMBEDDING_SIZE, D)
        self.y_embedder = VectorEmbedder(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        M = cfg.pos_embed_max_size
        self.register_buffer("pos_embed", torch.zeros(1, M * M, D))  # fixed; filled by initialize_weights
        self.blocks = nn.ModuleList(
            [
                JointBlock(cfg, last=i == cfg.depth - 1, dual=i in cfg.dual_attention_layers)
                for i in range(cfg.depth)
            ]
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation applied to both streams (nothing to do on the meta device)."""
        if self.pos_embed.is_meta:
            return

        # Transformer linears: Xavier-uniform weights, zero biases (as ViT/MAE/DiT).
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)

        cfg = self.config
        table = sincos_table(cfg.hidden_size, cfg.pos_embed_max_size, cfg.input_size // cfg.patch_size)
        self.pos_embed.copy_(torch.from_numpy(table).float().unsqueeze(0))  # 1, M², D

        # Patch embedding initialised like a linear layer over its flattened C·p·p fan-in.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

        # Timestep and pooled-text MLPs: small normal weights (DiT's timestep-embedder init).
        for embedder in (self.t_embedder, self.y_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero in both streams: every block starts as the identity on image and text tokens,
        # the final modulation is neutral and the output layer zero (a fresh model predicts v = 0).
        for block in self.blocks:
            for stream in (block.x_block, block.context_block):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The (1, h·w, D) centre crop of the position table for an h×w patch grid (SD3's cropping)."""
        M = self.config.pos_embed_max_size
        top, left = (M - h) // 2, (M - w) // 2
        table = self.pos_embed.reshape(1, M, M, -1)[:, top : top + h, left : left + w]  # 1, h, w, D
        return table.reshape(1, h * w, -1)  # 1, h·w, D

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h·w, p·p·C) patch tokens → (B, C, h·p, w·p) latents."""
        c, p = self.out_channels, self.patch_size
        x = x.reshape(x.shape[0], h, w, p, p, c)  # B, h, w, p, p, C
        x = torch.einsum("nhwpqc->nchpwq", x)  # B, C, h, p, w, p
        return x.reshape(x.shape[0], c, h * p, w * p)  # B, C, H, W

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor):
        cfg, p = self.config, self.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise VitditError(
                f"MMDiT input x has shape {tuple(x.shape)}; expected (B, {cfg.in_channels}, H, W)"
            )
        B, _, H, W = x.shape
        if H % p or W % p or H // p > cfg.pos_embed_max_size or W // p > cfg.pos_embed_max_size:
            raise VitditError(
                f"MMDiT input x is {H}×{W}; each side must be a multiple of patch_size {p} and at most "
                f"pos_embed_max_size·patch_size = {cfg.pos_embed_max_size * p}"
            )
        if t.shape != (B,):
            raise VitditError(f"MMDiT t has shape {tuple(t.shape)}; expected ({B},) times in [0, 1]")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise VitditError(
                f"MMDiT context has shape {tuple(context.shape)}; expected ({B}, L, {cfg.context_dim})"
            )
        if pooled.shape != (B, cfg.pooled_dim):
            raise VitditError(
                f"MMDiT pooled has shape {tuple(pooled.shape)}; expected ({B}, {cfg.pooled_dim})"
            )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """x: (B, C, H, W) latents x_t = (1 - t)·x_0 + t·ε; t: (B,) times in [0, 1] (1 = noise);
        context: (B, L, context_dim) text tokens; pooled: (B, pooled_dim) pooled text vector.

        Returns (B, out_channels, H, W): the velocity ε - x_0.
        """
        self._check_inputs(x, t, context, pooled)
        h, w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        x = self.x_embedder(x)  # B, T, D with T = h·w
        # Added in the embedding's dtype (as DiT here): under bf16 autocast the stream stays bf16.
        x = x + self.cropped_pos_embed(h, w).to(x.dtype)  # B, T, D
        t_emb = self.t_embedder(timestep_embedding(TIMESTEP_SCALE * t, FREQUENCY_EMBEDDING_SIZE))  # B, D
        c = t_emb + self.y_embedder(pooled)  # B, D
        context = self.context_embedder(context)  # B, L, D
        for block in self.blocks:
            x, context = block(x, context, c)  # B, T, D and B, L, D (None after the last block)
        x = self.final_layer(x, c)  # B, T, p·p·out
        return self.unpatchify(x, h, w)  # B, out, H, W

    def forward_macs(self) -> int:
        """Multiply-accumulates of one forward pass on one sample (see :func:`mmdit_forward_macs`)."""
        return mmdit_forward_macs(self.config)


def mmdit_forward_macs(config: MMDiTConfig, context_len: int | None = None) -> int:
    """Multiply-accumulates of one MM-DiT forward pass on one sample at ``input_size`` and
    ``context_len`` text tokens (default ``config.context_len``).

    Counts every matrix product (linears, the patch convolution, attention's q·kᵀ and weights·v) and
    nothing elementwise (norms, activations, softmax, modulation), the convention of DiT's "Gflops"
    and of ``torch.utils.flop_counter`` (FLOPs = 2 × MACs). Training ≈ 6 × MACs FLOPs per sample.
    """
    cfg = config
    L = cfg.context_len if context_len is None else context_len
    D, T = cfg.hidden_size, cfg.num_patches
    hidden = int(D * cfg.mlp_ratio)
    macs = T * cfg.in_channels * cfg.patch_size**2 * D  # patch embedding
    macs += FREQUENCY_EMBEDDING_SIZE * D + D * D  # timestep MLP
    macs += cfg.pooled_dim * D + D * D  # pooled-text MLP
    macs += L * cfg.context_dim * D  # context embedder
    for i in range(cfg.depth):
        dual = i in cfg.dual_attention_layers
        macs += D * (9 if dual else 6) * D  # image adaLN
        macs += mlp_macs(T, D, hidden)  # image MLP
        if dual:
            macs += attention_macs(T, D)  # image-only attention
        if i == cfg.depth - 1:  # text gives keys and values only: queries and projection for T
            macs += D * 2 * D + attention_macs(T + L, D, num_queries=T)
        else:
            macs += D * 6 * D + attention_macs(T + L, D) + mlp_macs(L, D, hidden)
    macs += D * 2 * D + T * D * cfg.patch_size**2 * cfg.out_channels  # final adaLN and decoder
    return macs


__all__ = [
    "MMDIT_PRESETS",
    "MMDiT",
    "MMDiTConfig",
    "QK_NORMS",
    "TIMESTEP_SCALE",
    "mmdit_forward_macs",
    "sincos_table",
]
