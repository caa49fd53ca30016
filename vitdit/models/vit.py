"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words").

patch embedding (conv, kernel = stride = patch) → [cls] token prepended → learned positional
embedding → pre-norm blocks (self-attention + MLP) → final LayerNorm → [cls] → head.

Parameter names and shapes follow timm's ``VisionTransformer`` (``tests/golden/timm_vit_b16.json``
is timm's ``vit_base_patch16_224`` layout and ``ViT-B/16`` matches it), so timm and AugReg
checkpoints load with ``strict=True``. Positional embeddings are resized bicubically when a
checkpoint made for another image size is loaded (:func:`resize_pos_embed`, applied by a
``load_state_dict`` pre-hook).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitdit.errors import VitditError
from vitdit.models.layers import Attention, Mlp, PatchEmbed, attention_macs, mlp_macs


@dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of a ViT; ``dataclasses.asdict`` of it is what checkpoints store."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0: no classifier, forward returns the pooled features
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # The paper's pre-training head: Linear(D, representation_size) → tanh → classifier.
    # None gives the fine-tuning head, a single Linear (what timm and AugReg checkpoints carry).
    representation_size: int | None = None
    layer_norm_eps: float = 1e-6  # timm's and the JAX release's value (transformers defaults to 1e-12)

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise VitditError(
                f"ViT image_size {self.image_size} is not a positive multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise VitditError(
                f"ViT embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_classes < 0:
            raise VitditError(f"ViT num_classes {self.num_classes} is negative")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def _vit(dim: int, depth: int, heads: int, patch: int, image: int = 224, classes: int = 1000) -> ViTConfig:
    return ViTConfig(
        image_size=image, patch_size=patch, num_classes=classes, embed_dim=dim, depth=depth, num_heads=heads
    )


# Sizes from the ViT paper (Table 1: B, L, H), DeiT (Ti, S) and "How to train your ViT" (AugReg).
VIT_PRESETS: dict[str, ViTConfig] = {
    "ViT-Ti/16": _vit(192, 12, 3, 16),
    "ViT-S/16": _vit(384, 12, 6, 16),
    "ViT-S/8": _vit(384, 12, 6, 8),
    "ViT-B/16": _vit(768, 12, 12, 16),
    "ViT-B/32": _vit(768, 12, 12, 32),
    "ViT-B/8": _vit(768, 12, 12, 8),
    "ViT-L/16": _vit(1024, 24, 16, 16),
    "ViT-L/32": _vit(1024, 24, 16, 32),
    "ViT-H/14": _vit(1280, 32, 16, 14),
    # Small-image variants (CIFAR-size 32 px, 8×8 = 64 patches of 4 px); 10 classes as CIFAR-10,
    # override num_classes for other data sets.
    "ViT-Ti/4": _vit(192, 12, 3, 4, image=32, classes=10),
    "ViT-S/4": _vit(384, 12, 6, 4, image=32, classes=10),
    # Tiny preset for unit tests.
    "ViT-test/4": _vit(32, 2, 2, 4, image=16, classes=10),
    # The quickstarts' classifier until 2026-12-05 (configs/digits.yaml keeps it): 16 patches of
    # 4 px on the 16 px digits, so attention is cheap. Width 192 is what reached
    # 97% in a CPU budget: with AdamW (lr 1e-3, wd 0.05, batch 64, 50 warmup steps, cosine over
    # 40 epochs, clip 1.0, no augmentation) it passed 97% validation accuracy
    # after 28 epochs, 99 s of one CPU thread (96.9% at the end), while width 128 plateaued at
    # 94.7-95.3% and width 96 at 95.8% under the same recipe (tests/unit/test_vit.py::
    # test_digits_preset_learns_the_digits, marked slow, replays it). ~1.8M params, ~31 MMACs/image.
    "ViT-digits/4": _vit(192, 4, 4, 4, image=16, classes=10),
    # The quickstart's classifier since 2026-12-05: the same width and depth on 4 patches of 8 px
    # (each a 4×4 block of the native 8×8 digit), 5 tokens instead of 17, so ~3.3× fewer MACs. In the
    # quickstart's recipe (1,200 steps of 128, crops of >= 80% area, label smoothing 0.1) it reached
    # 98.3-98.9% val accuracy in fp32 (three seeds, 70-75 s at ~2,100 img/s on 2 EPYC threads)
    # against 98.6% in 186 s for ViT-digits/4 (827 img/s); crops of >= 50% area gave 97.2-98.3%.
    "ViT-digits/8": _vit(192, 4, 4, 8, image=16, classes=10),
}


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a (1, prefix + g*g, D) positional embedding to a new_grid × new_grid patch grid.

    The patch positions are interpolated bicubically as a 2-D image (antialiased when shrinking, as
    timm's ``resample_abs_pos_embed`` does, so both give the same tensor); the [cls] position is kept.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise VitditError(f"pos_embed has shape {tuple(pos_embed.shape)}; expected (1, tokens, dim)")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid.shape[1])
    if old_grid * old_grid != grid.shape[1]:
        raise VitditError(f"pos_embed has {grid.shape[1]} patch positions, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # 1, D, g, g
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)  # 1, g'*g', D
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


# timm ViT features that vitdit's ViT does not have: a checkpoint holding them would load wrongly.
_UNSUPPORTED_TIMM_KEYS = {
    "reg_token": "register tokens",
    "dist_token": "a distillation token (DeiT)",
    "head_dist.": "a distillation head (DeiT)",
    "fc_norm.": "average pooling with fc_norm",
    "attn_pool.": "attention pooling",
    ".ls1.": "layer scale",
    ".ls2.": "layer scale",
    ".q_norm.": "qk-norm",
    ".k_norm.": "qk-norm",
    "norm_pre.": "a pre-norm before the blocks (CLIP)",
}


def timm_to_vitdit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict (class-token pooling) in vitdit's names.

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}`` and ``module.`` (DDP) prefixes; raises
    :class:`VitditError` naming keys of timm features vitdit's ViT does not implement.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, what in _UNSUPPORTED_TIMM_KEYS.items():
            if key.startswith(pattern) or pattern in key:
                raise VitditError(
                    f"checkpoint key {key!r} belongs to {what}, which vitdit's ViT does not implement"
                )
        out[key] = value
    return out


class Block(nn.Module):
    """Pre-norm transformer encoder block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden_dim, approximate_gelu=False)  # exact GELU, as the paper

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """(B, 1+N, D) → (B, 1+N, D), or with ``cls_only`` only the [cls] state (B, 1, D) (the same
        values as ``forward(x)[:, :1]``: [cls] attends to every token, the rest is per token)."""
        if cls_only:
            x = x[:, :1] + self.attn(self.norm1(x), num_queries=1)  # B, 1, D
            return x + self.mlp(self.norm2(x))  # B, 1, D
        x = x + self.attn(self.norm1(x))  # B, 1+N, D
        x = x + self.mlp(self.norm2(x))  # B, 1+N, D
        return x


class PreLogits(nn.Module):
    """The pre-training MLP head's hidden layer: Linear → tanh (old timm's ``pre_logits.fc``)."""

    def __init__(self, dim: int, representation_size: int):
        super().__init__()
        self.fc = nn.Linear(dim, representation_size)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class ViT(nn.Module):
    """Vision Transformer classifier; ``forward(images (B, C, H, W)) -> logits (B, num_classes)``."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.num_patches, c.embed_dim))
        self.blocks = nn.ModuleList(
            [
                Block(c.embed_dim, c.num_heads, c.mlp_hidden_dim, c.qkv_bias, c.layer_norm_eps)
                for _ in range(c.depth)
            ]
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        if c.representation_size:
            self.pre_logits = PreLogits(c.embed_dim, c.representation_size)
            self.num_features = c.representation_size
        else:
            self.pre_logits = nn.Identity()
            self.num_features = c.embed_dim
        self.head = nn.Linear(self.num_features, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.initialize_weights()
        # Loading a checkpoint made for another image size resizes its positional embedding.
        self.register_load_state_dict_pre_hook(_resize_pos_embed_hook)

    def initialize_weights(self) -> None:
        """timm / the paper: trunc-normal(0.02) for positions, [cls] and linears, zero biases and head."""
        if self.pos_embed.is_meta:  # shapes only (parameter counting on the meta device)
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The patch embedding keeps PyTorch's conv default (kaiming-uniform, a=√5), as timm does.
        self.patch_embed.proj.reset_parameters()
        # Zero head: the paper's fine-tuning init, so training starts from uniform class scores.
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → normalised token states (B, 1+N, D), [cls] first."""
        x = self._tokens(x)  # B, 1+N, D
        for block in self.blocks:
            x = block(x)  # B, 1+N, D
        return self.norm(x)  # B, 1+N, D

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → [cls] + patch tokens with positions (B, 1+N, D)."""
        if x.shape[-2:] != (self.config.image_size, self.config.image_size):
            raise VitditError(
                f"ViT input has spatial size {tuple(x.shape[-2:])}; this model takes "
                f"{self.config.image_size}×{self.config.image_size} (load weights into a model built for the new size)"
            )
        x = self.patch_embed(x)  # B, N, D
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # B, 1, D
        return torch.cat([cls, x], dim=1) + self.pos_embed  # B, 1+N, D

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Token states (B, 1+N, D) → logits, or with ``pre_logits`` the pooled features
        (B, num_features): the [cls] state, through the tanh layer when ``representation_size`` is set."""
        x = self.pre_logits(features[:, 0])  # B, num_features
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images → logits. The head reads only the [cls] state, so the last block computes only it
        (its q, attention row, projection and MLP for one token instead of 1+N: ViT-S/16 at 224 px
        does ~7% fewer FLOPs per image, with the same logits as ``forward_head(forward_features(x))``)."""
        x = self._tokens(x)  # B, 1+N, D
        for i, block in enumerate(self.blocks):
            x = block(x, cls_only=i == len(self.blocks) - 1)  # B, 1+N, D; B, 1, D after the last
        return self.forward_head(self.norm(x))  # B, num_classes

    def forward_macs(self, all_tokens: bool = False) -> int:
        """Multiply-accumulates of one forward pass on one image (FLOPs ≈ 2 × MACs; training ≈ 3× forward).

        Counts the matmuls and the patch convolution; norms, GELU, softmax and additions are omitted
        (as the ViT and DiT papers do), which is also what ``torch.utils.flop_counter`` counts (it
        misses the two attention matmuls of CPU SDPA, which has no formula there: see the test). The
        last block is counted as :meth:`forward` runs it, for the [cls] token only; ``all_tokens``
        counts it for every token (the usual figure, e.g. 17.56 G for ViT-B/16 at 224 px, and the cost of
        :meth:`forward_features`).
        """
        c = self.config
        tokens = 1 + c.num_patches
        macs = c.num_patches * c.embed_dim * c.in_chans * c.patch_size**2  # patch embedding
        cls_only_last = c.depth > 0 and not all_tokens  # the last block computes only [cls] (see forward)
        macs += (c.depth - cls_only_last) * (
            attention_macs(tokens, c.embed_dim) + mlp_macs(tokens, c.embed_dim, c.mlp_hidden_dim)
        )
        if cls_only_last:
            macs += attention_macs(tokens, c.embed_dim, num_queries=1)
            macs += mlp_macs(1, c.embed_dim, c.mlp_hidden_dim)
        if c.representation_size:
            macs += c.embed_dim * c.representation_size
        macs += self.num_features * c.num_classes
        return macs

    def load_pretrained(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a timm-layout state dict (e.g. a timm or AugReg ViT), resizing positions as needed.

        Keys are normalised by :func:`timm_to_vitdit` (prefixes, unsupported layouts);
        a head whose class count differs from this model's is an error: build the model with the
        checkpoint's ``num_classes`` or drop ``head.*`` and pass ``strict=False``.
        """
        return self.load_state_dict(timm_to_vitdit(state_dict), strict=strict)


def _resize_pos_embed_hook(
    module: ViT, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
):
    key = prefix + "pos_embed"
    if key in state_dict and state_dict[key].shape != module.pos_embed.shape:
        state_dict[key] = resize_pos_embed(state_dict[key], module.config.grid_size)
