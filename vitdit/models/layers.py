"""Pieces shared by ViT and DiT: patch embedding, multi-head self-attention and the transformer MLP.

Parameter names follow timm (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``), which is also
what the facebookresearch/DiT release uses, so published checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Attention implementations. "sdpa" is torch's fused scaled_dot_product_attention (the default);
# "math" is an explicit matmul → softmax → matmul, which trains faster under bf16 autocast on CPUs
# with bf16 matrix units (measured: benchmarks/RESULTS.md, "CPU with AMX"). Both compute the same
# function; tests/test_layers.py checks they agree.
ATTN_IMPLS = ("sdpa", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    """softmax(q kᵀ / √d) v for (B, heads, N, d) tensors."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if impl == "math":
        scale = q.shape[-1] ** -0.5
        weights = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)  # B, h, N, N
        return weights @ v  # B, h, N, d
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTN_IMPLS}")


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """(B, N, C) → (B, N, C); with ``num_queries`` only the first Q tokens attend (to all N), so
        only their outputs (B, Q, C) are computed: the same values as ``forward(x)[:, :Q]``."""
        B, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        if num_queries is None:
            qkv = self.qkv(x).reshape(B, N, 3, h, d)  # B, N, 3, h, d
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, h, N, d
        else:
            w, b = self.qkv.weight, self.qkv.bias  # rows: q, k, v
            q = F.linear(x[:, :num_queries], w[:C], None if b is None else b[:C])  # B, Q, C
            q = q.reshape(B, num_queries, h, d).transpose(1, 2)  # B, h, Q, d
            kv = F.linear(x, w[C:], None if b is None else b[C:]).reshape(B, N, 2, h, d)  # B, N, 2, h, d
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, h, N, d
        x = attention(q, k, v, self.attn_impl)  # B, h, Q|N, d
        x = x.transpose(1, 2).reshape(B, q.shape[2], C)  # B, Q|N, C
        return self.proj(x)


# √(2/π), doubled: 0.5·(1 + tanh(z)) = sigmoid(2z).
_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, x·½(1 + tanh(√(2/π)(x + 0.044715x³))) (DiT's activation).

    Eager runs ``F.gelu(x, approximate="tanh")``. Under ``torch.compile`` the same function is
    written as x·sigmoid(2√(2/π)(x + 0.044715x³)), since ½(1 + tanh(z)) = sigmoid(2z), computed in
    float32 whatever the input dtype (as aten's kernel does). Inductor's CPU code vectorises that
    exp far faster than its tanh: for a (2048, 1536) bf16 activation, 2 cores, forward plus backward
    ~6 ms against ~14 ms (benchmarks/RESULTS.md, "GELU"); the two agree to float32 round-off.
    """
    if not torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    xf = x.float()
    return (xf * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class TanhGELU(nn.Module):
    """``nn.GELU(approximate="tanh")`` computed by :func:`gelu_tanh` (no parameters, same function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


class Mlp(nn.Module):
    """fc1 → GELU → fc2. DiT uses the tanh approximation of GELU, ViT the exact one."""

    def __init__(self, dim: int, hidden_dim: int, approximate_gelu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = TanhGELU() if approximate_gelu else nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def patch_tokens(x: torch.Tensor, proj: nn.Conv2d) -> torch.Tensor:
    """(B, C, H, W) images → (B, H/p · W/p, D) tokens: ``proj``, a p×p stride-p convolution, applied
    as one linear over the flattened patches (row-major, as ``proj(x).flatten(2).transpose(1, 2)``).

    The same function as the convolution (its weight (D, C, p, p) flattens in the patch's (C, p, p)
    order), computed as a matmul: on CPU under bf16 autocast, forward and weight gradient of ViT-S/16's
    patch embedding (batch 8, 224 px) took ~4 ms against ~16 ms through oneDNN's convolution.
    Sizes that are not multiples of p (and any other kind of convolution) take the convolution, which
    drops the remainder.
    """
    p = proj.stride[0]
    B, C, H, W = x.shape
    plain = proj.kernel_size == proj.stride and proj.padding in ((0, 0), "valid") and proj.groups == 1
    if not plain or proj.dilation != (1, 1) or H % p or W % p:
        return proj(x).flatten(2).transpose(1, 2)
    gh, gw = H // p, W // p
    patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
    return F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)  # B, N, D


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → (B, N, D) tokens, as a strided convolution ``proj``.

    timm's ``PatchEmbed`` structure (a ``proj`` Conv2d), so the keys are ``patch_embed.proj.*`` in the
    ViT (timm's checkpoints) and ``x_embedder.proj.*`` in the DiT (the facebookresearch/DiT release).
    """

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_tokens(x, self.proj)  # B, N, D (row-major patches; a matmul, see patch_tokens)


def set_attn_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every Attention in ``model`` to ``impl`` (a run-time choice, not part of the weights)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTN_IMPLS}")
    for m in model.modules():
        if isinstance(m, Attention) or hasattr(m, "attn_impl"):
            m.attn_impl = impl
    return model


def attention_macs(num_tokens: int, dim: int, num_queries: int | None = None) -> int:
    """MACs of one self-attention layer on one sample: qkv, q·kᵀ, weights·v, proj (with
    ``num_queries``, the layer computing only those tokens' outputs: q and proj for Q tokens)."""
    n, d = num_tokens, dim
    q = n if num_queries is None else num_queries
    return q * d * d + n * d * 2 * d + q * n * d + q * n * d + q * d * d


def mlp_macs(num_tokens: int, dim: int, hidden_dim: int) -> int:
    return 2 * num_tokens * dim * hidden_dim
