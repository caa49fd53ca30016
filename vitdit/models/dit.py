"""Diffusion Transformer (DiT), as in Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023).

Module and parameter names follow the facebookresearch/DiT release (``x_embedder``, ``t_embedder``,
``y_embedder``, ``pos_embed``, ``blocks``, ``adaLN_modulation``, ``final_layer``), so its published
checkpoints (``DiT-XL-2-256.pt``) load into ``DiT(get_preset("DiT-XL/2"))`` with ``strict=True``
(``tests/golden/dit_xl2_keys.json`` pins the layout).

The four conditioning mechanisms of the paper's ablation (Sec. 3.2, Fig. 5) are four small block
classes chosen by ``DiTConfig.conditioning``:

- ``"adaLN-Zero"`` (the release, default): adaptive LayerNorm whose shift/scale/gate are regressed
  from ``t + y``, with the gates and the final layer zero-initialised so each block starts as the
  identity.
- ``"adaLN"``: the same regression of shift/scale, no gates and no zero initialisation.
- ``"cross-attention"``: a multi-head cross-attention layer after self-attention, attending to the
  two-token sequence ``[t, y]``.
- ``"in-context"``: ``t`` and ``y`` are two extra tokens prepended to the patch tokens (as ViT
  prepends its cls token), processed by standard ViT blocks and dropped before the final layer.

The final layer of the two adaLN variants is the release's (adaLN shift/scale, linear). The
cross-attention and in-context variants have no conditioning vector left to modulate with, so their
final layer is a plain affine LayerNorm followed by the linear decoder (our choice; the paper does
not release these variants). Every variant zero-initialises the final linear, as the release does, so
a fresh model predicts zero.

Cost: :meth:`DiT.forward_macs` counts multiply-accumulates of one forward pass on one sample from the
config. The paper's "Gflops" are these MACs (DiT-XL/2: 118.6 G at 256×256); training FLOPs ≈ 6 × MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from vitdit.errors import VitditError
from vitdit.models.layers import Attention, Mlp, PatchEmbed, attention, attention_macs, mlp_macs

CONDITIONINGS = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")

# Width of the sinusoidal timestep features fed to the timestep MLP (the release's default).
FREQUENCY_EMBEDDING_SIZE = 256


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of a DiT. ``num_classes`` is also the index of the null ("no class") label."""

    input_size: int = 32  # latent height = width (256 px images through an 8× VAE)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    conditioning: str = "adaLN-Zero"

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise VitditError(f"DiT conditioning {self.conditioning!r} is not one of {CONDITIONINGS}")
        if self.input_size % self.patch_size:
            raise VitditError(
                f"DiT input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise VitditError(
                f"DiT hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            # The 2-D sin-cos embedding splits the width in 4 (sin/cos × row/column).
            raise VitditError(f"DiT hidden_size {self.hidden_size} must be a multiple of 4")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise VitditError(f"DiT class_dropout_prob {self.class_dropout_prob} is not in [0, 1)")

    @property
    def out_channels(self) -> int:
        """Noise channels, plus as many variance channels with ``learn_sigma``."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2


_SIZES = {  # Table 1 of the paper: depth, hidden size, heads
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

DIT_PRESETS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(input_size=32, patch_size=patch, num_classes=1000, **dims)
    for size, dims in _SIZES.items()
    for patch in (2, 4, 8)
}
DIT_PRESETS["DiT-test/2"] = DiTConfig(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10
)
DIT_PRESETS["DiT-digits/2"] = DiTConfig(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=128,
    depth=4,
    num_heads=4,
    num_classes=10,
    learn_sigma=True,
)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: (B, T, D) tokens scaled and shifted by per-sample (B, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) possibly fractional timesteps → (B, dim) features [cos(t·f), sin(t·f)].

    Frequencies f_i = max_period^(-i / (dim/2)), i = 0 … dim/2 - 1 (GLIDE/ADM convention; diffusers'
    ``Timesteps`` with ``downscale_freq_shift=0`` and ``flip_sin_to_cos=True`` is the same function).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # B, half
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # B, 2·half
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # B, dim
    return embedding


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions → (M, dim) [sin, cos] features (MAE's convention, computed in float64)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # dim/2
    out = np.outer(pos.reshape(-1), omega)  # M, dim/2
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # M, dim


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos positional embedding, (grid_size², dim), row-major over the patch grid.

    As the release (after MAE): the first half of the channels encodes the column (w) coordinate and
    the second half the row (h) coordinate, a consequence of ``np.meshgrid`` putting w first.
    """
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # each G, G; grid_w varies along columns
    emb_w = _sincos_1d(dim // 2, grid_w)  # G², dim/2
    emb_h = _sincos_1d(dim // 2, grid_h)  # G², dim/2
    return np.concatenate([emb_w, emb_h], axis=1)  # G², dim


class TimestepEmbedder(nn.Module):
    """Scalar timesteps → 256-d sinusoid → Linear → SiLU → Linear → (B, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # B, 256
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # B, D


class LabelEmbedder(nn.Module):
    """Class labels → (B, D), with label dropout for classifier-free guidance.

    The table has a null row at index ``num_classes`` when ``dropout_prob > 0`` (the release's
    layout: with no dropout there is no null row, and unconditional sampling is impossible).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        rows = num_classes + int(dropout_prob > 0)
        # Passing the (uninitialised) weight skips nn.Embedding's N(0, 1) reset, which
        # DiT.initialize_weights replaces anyway and which costs seconds on the meta device (its
        # normal_ imports torch._dynamo there).
        self.embedding_table = nn.Embedding(rows, hidden_size, _weight=torch.empty(rows, hidden_size))

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class, at random or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # B, D


def _norm(hidden_size: int, affine: bool) -> nn.LayerNorm:
    # eps 1e-6 everywhere, as the release (diffusers' default is 1e-5: see vitdit.export).
    return nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=1e-6)


def _mlp(hidden_size: int, mlp_ratio: float) -> Mlp:
    return Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate_gelu=True)


class DiTBlock(nn.Module):
    """adaLN-Zero block: shift, scale and a residual gate for attention and MLP regressed from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = _norm(hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = _norm(hidden_size, affine=False)
        self.mlp = _mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )  # each B, D
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # B, T, D
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # B, T, D
        return x


class AdaLNBlock(nn.Module):
    """Plain adaLN block (the paper's "adaLN"): shift and scale regressed from c, no gates."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = _norm(hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = _norm(hidden_size, affine=False)
        self.mlp = _mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)  # each B, D
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # B, T, D
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # B, T, D
        return x


class CrossAttention(nn.Module):
    """Multi-head attention of the tokens (queries) over a short context sequence (keys, values)."""

    def __init__(self, dim: int, num_heads: int, attn_impl: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        M = context.shape[1]
        h, d = self.num_heads, C // self.num_heads
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2)  # B, h, N, d
        kv = self.kv(context).reshape(B, M, 2, h, d)  # B, M, 2, h, d
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, h, M, d
        x = attention(q, k, v, self.attn_impl)  # B, h, N, d
        x = x.transpose(1, 2).reshape(B, N, C)  # B, N, C
        return self.proj(x)  # B, N, C


class CrossAttentionBlock(nn.Module):
    """Pre-norm block with cross-attention to [t, y] between self-attention and the MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = _norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = _norm(hidden_size, affine=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm3 = _norm(hidden_size, affine=True)
        self.mlp = _mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # B, T, D
        x = x + self.cross_attn(self.norm2(x), context)  # B, T, D; context B, 2, D
        x = x + self.mlp(self.norm3(x))  # B, T, D
        return x


class InContextBlock(nn.Module):
    """Standard pre-norm ViT block; the conditioning travels as tokens in the sequence."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = _norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = _norm(hidden_size, affine=True)
        self.mlp = _mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # B, 2 + T, D
        x = x + self.mlp(self.norm2(x))  # B, 2 + T, D
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) on a non-affine LayerNorm, then the linear decoder to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _norm(hidden_size, affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each B, D
        x = modulate(self.norm_final(x), shift, scale)  # B, T, D
        return self.linear(x)  # B, T, p·p·out


class PlainFinalLayer(nn.Module):
    """Affine LayerNorm then the linear decoder: the final layer of the token-conditioned variants."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _norm(hidden_size, affine=True)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))  # B, T, p·p·out


_BLOCKS = {
    "adaLN-Zero": DiTBlock,
    "adaLN": AdaLNBlock,
    "cross-attention": CrossAttentionBlock,
    "in-context": InContextBlock,
}


class DiT(nn.Module):
    """Diffusion model with a transformer backbone: (noisy latents, t, y) → (ε, Σ) per pixel."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        # Fixed sin-cos embedding, stored as a frozen parameter (not a buffer) so the key matches the
        # release's checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.hidden_size), requires_grad=False)
        block_cls = _BLOCKS[cfg.conditioning]
        self.blocks = nn.ModuleList(
            [block_cls(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        final_cls = FinalLayer if cfg.conditioning in ("adaLN-Zero", "adaLN") else PlainFinalLayer
        self.final_layer = final_cls(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The release's initialisation (nothing to do on the meta device, where only shapes exist)."""
        if self.pos_embed.is_meta:
            return

        # Transformer linears: Xavier-uniform weights, zero biases (as ViT/MAE).
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)

        # Fixed sin-cos positions (frozen).
        grid = self.config.input_size // self.config.patch_size
        pos = sincos_pos_embed_2d(self.config.hidden_size, grid)  # T, D
        self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))  # 1, T, D

        # Patch embedding initialised like a linear layer (over the flattened C·p·p fan-in), not a conv.
        # Its bias keeps PyTorch's default conv init, as in the release.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

        # Label table and timestep MLP: small normal weights.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        if self.config.conditioning == "adaLN-Zero":
            # adaLN-Zero: gates (and shifts/scales) start at zero, so every block starts as the
            # identity and the final layer's modulation is neutral (Sec. 3.2 of the paper).
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)

        # Output layer zeroed in every variant: a fresh model predicts ε = 0 (and Σ at its midpoint).
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p·p·C) patch tokens → (B, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise VitditError(f"DiT.unpatchify: {x.shape[1]} tokens do not form a square grid")
        x = x.reshape(x.shape[0], h, w, p, p, c)  # B, h, w, p, p, C
        x = torch.einsum("nhwpqc->nchpwq", x)  # B, C, h, p, w, p
        return x.reshape(x.shape[0], c, h * p, w * p)  # B, C, H, W

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise VitditError(
                f"DiT input x has shape {tuple(x.shape)}; expected (B, {', '.join(map(str, expected))})"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) noisy latents; t: (B,) timesteps; y: (B,) labels (``num_classes`` = null).

        Returns (B, out_channels, H, W): ε in the first ``in_channels``, then (learn_sigma) the
        interpolation coefficients of the log-variance.
        """
        self._check_input(x)
        x = self.x_embedder(x)  # B, T, D with T = H·W / p²
        # Added in the embedding's dtype, as diffusers does: under bf16 autocast the token stream
        # stays bf16 (an fp32 table would promote it, costing an activation cast at every mixed op).
        x = x + self.pos_embed.to(x.dtype)
        t = self.t_embedder(t)  # B, D
        y = self.y_embedder(y, self.training)  # B, D
        conditioning = self.config.conditioning
        if conditioning in ("adaLN-Zero", "adaLN"):
            c = t + y  # B, D
            for block in self.blocks:
                x = block(x, c)  # B, T, D
            x = self.final_layer(x, c)  # B, T, p·p·out
        elif conditioning == "cross-attention":
            context = torch.stack([t, y], dim=1)  # B, 2, D
            for block in self.blocks:
                x = block(x, context)  # B, T, D
            x = self.final_layer(x)  # B, T, p·p·out
        else:  # in-context
            x = torch.cat([t.unsqueeze(1), y.unsqueeze(1), x], dim=1)  # B, 2 + T, D
            for block in self.blocks:
                x = block(x)  # B, 2 + T, D
            x = x[:, 2:]  # B, T, D: the conditioning tokens are dropped
            x = self.final_layer(x)  # B, T, p·p·out
        return self.unpatchify(x)  # B, out, H, W

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch laid out as [conditional half; unconditional half].

        ``y`` holds the class labels in its first half and the null label (``num_classes``) in the
        second; only the first half of ``x`` is used (both halves get the same noise). Returns the
        guided ε (identical in both halves) and the conditional branch's remaining channels.

        Quirk kept for reproducibility: the release guides only the first **3** of the 4 latent
        channels (``guidance_channels=3``); the 4th channel keeps each half's own prediction.
        ``guidance_channels=None`` guides all ``in_channels``, the standard form (and diffusers'
        ``DiTPipeline``).
        """
        n = guidance_channels if guidance_channels is not None else self.in_channels
        if not 0 < n <= self.in_channels:
            raise VitditError(
                f"forward_with_cfg: guidance_channels {n} must be in 1..{self.in_channels} (the ε channels)"
            )
        half = x[: len(x) // 2]  # B/2, C, H, W
        combined = torch.cat([half, half], dim=0)  # B, C, H, W
        model_out = self.forward(combined, t, y)  # B, out, H, W
        eps, rest = model_out[:, :n], model_out[:, n:]  # B, n, H, W and B, out - n, H, W
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # each B/2, n, H, W
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # B/2, n, H, W
        eps = torch.cat([half_eps, half_eps], dim=0)  # B, n, H, W
        return torch.cat([eps, rest], dim=1)  # B, out, H, W

    def forward_macs(self) -> int:
        """Multiply-accumulates of one forward pass on one sample (see :func:`dit_forward_macs`)."""
        return dit_forward_macs(self.config)


def dit_forward_macs(config: DiTConfig) -> int:
    """Multiply-accumulates of one DiT forward pass on one sample, from the config.

    Counts every matrix product (linears, the patch convolution, attention's q·kᵀ and weights·v) and
    nothing elementwise (norms, activations, softmax, modulation, residuals, embedding lookups), the
    convention of the paper's "Gflops" column and of ``torch.utils.flop_counter`` (FLOPs = 2 × MACs).
    Training costs ≈ 3 forward passes: 6 × MACs FLOPs per sample.
    """
    cfg = config
    D, T = cfg.hidden_size, cfg.num_patches
    hidden = int(D * cfg.mlp_ratio)
    patch_out = cfg.patch_size * cfg.patch_size * cfg.out_channels
    macs = T * cfg.in_channels * cfg.patch_size**2 * D  # patch embedding
    macs += FREQUENCY_EMBEDDING_SIZE * D + D * D  # timestep MLP (the label lookup is free)
    if cfg.conditioning == "adaLN-Zero":
        block = attention_macs(T, D) + mlp_macs(T, D, hidden) + D * 6 * D
    elif cfg.conditioning == "adaLN":
        block = attention_macs(T, D) + mlp_macs(T, D, hidden) + D * 4 * D
    elif cfg.conditioning == "cross-attention":
        context = 2  # [t, y]
        cross = T * D * D + context * D * 2 * D + 2 * T * context * D + T * D * D  # q, kv, qk, av, proj
        block = attention_macs(T, D) + cross + mlp_macs(T, D, hidden)
    else:  # in-context: two more tokens through every block
        block = attention_macs(T + 2, D) + mlp_macs(T + 2, D, hidden)
    macs += cfg.depth * block
    if cfg.conditioning in ("adaLN-Zero", "adaLN"):
        macs += D * 2 * D  # final adaLN modulation
    macs += T * D * patch_out  # final linear decoder
    return macs


__all__ = [
    "CONDITIONINGS",
    "DIT_PRESETS",
    "DiT",
    "DiTConfig",
    "dit_forward_macs",
    "modulate",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]
