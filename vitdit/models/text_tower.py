"""A text tower trained jointly with an MM-DiT: text-to-image with no pretrained text encoder.

Offline there is no CLIP or T5 to download. Instead the tokenizer is built from the training
captions (a word-level vocabulary with the ``tokenizers`` library) and the tower is a small
transformers ``CLIPTextModel``, randomly initialised and trained with the MM-DiT through the flow
loss. The MM-DiT sees exactly what it would see from a real encoder (token states L × width and a
pooled vector), so switching to a real CLIP or T5 is a matter of encoding the data set with
``--text-encoder`` and nothing else changes.

The tokenizer travels inside the checkpoint's config.json (its JSON is a few KB for a caption
vocabulary), so a checkpoint samples from text with nothing beside it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from vitdit.captions import BOS_ID, EOS_ID, PAD_ID
from vitdit.errors import VitditError
from vitdit.models.layers import attention_macs, mlp_macs
from vitdit.models.mmdit import MMDiT, MMDiTConfig

TOWER_KIND = "own"  # config.json "text.kind" of a checkpoint whose text tower trained with it


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
    """A CLIP-style text transformer (causal attention, final layer norm, pooled at the EOS token)."""

    vocab_size: int
    max_length: int = 16  # tokens per caption, [BOS] and [EOS] included
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0


class TextConditionedMMDiT(nn.Module):
    """An MM-DiT and its own text tower: ``forward(x, t, input_ids)``.

    ``mmdit`` is a plain :class:`MMDiT` whose context and pooled widths are the tower's width, so its
    weights are those of an MM-DiT fed by any encoder of that width.
    """

    def __init__(self, mmdit_config: MMDiTConfig, tower: TextTowerConfig):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        if (mmdit_config.context_dim, mmdit_config.pooled_dim) != (tower.hidden_size, tower.hidden_size):
            mmdit_config = dataclasses.replace(
                mmdit_config,
                context_dim=tower.hidden_size,
                pooled_dim=tower.hidden_size,
                context_len=tower.max_length,
            )
        self.tower_config = tower
        self.mmdit = MMDiT(mmdit_config)
        self.text_tower = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=tower.vocab_size,
                hidden_size=tower.hidden_size,
                intermediate_size=int(tower.hidden_size * tower.mlp_ratio),
                num_hidden_layers=tower.num_layers,
                num_attention_heads=tower.num_heads,
                max_position_embeddings=tower.max_length,
                pad_token_id=PAD_ID,
                bos_token_id=BOS_ID,
                eos_token_id=EOS_ID,  # pooled output: the state at the first [EOS]
            )
        )

    @property
    def config(self) -> MMDiTConfig:
        return self.mmdit.config

    @property
    def blocks(self) -> nn.ModuleList:
        """The MM-DiT's joint blocks (what gradient checkpointing wraps)."""
        return self.mmdit.blocks

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens N×L×width, pooled N×width) of token ids N×L."""
        out = self.text_tower(input_ids=input_ids)
        return out.last_hidden_state, out.pooler_output  # N, L, D ; N, D

    def forward(self, x: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        tokens, pooled = self.encode_text(input_ids)
        return self.mmdit(x, t, tokens, pooled)

    def forward_macs(self) -> int:
        """MACs of one forward on one sample: the MM-DiT at L text tokens plus the tower."""
        t = self.tower_config
        per_layer = attention_macs(t.max_length, t.hidden_size) + mlp_macs(
            t.max_length, t.hidden_size, int(t.hidden_size * t.mlp_ratio)
        )
        return int(self.mmdit.forward_macs()) + t.num_layers * per_layer


def tower_from_config(config: dict) -> TextConditionedMMDiT:
    """Rebuild the model of a checkpoint config.json whose ``text.kind`` is :data:`TOWER_KIND`."""
    from vitdit.models import config_from_dict

    text = config.get("text") or {}
    if text.get("kind") != TOWER_KIND:
        raise VitditError(f"config.json text kind {text.get('kind')!r} has no text tower")
    tower = TextTowerConfig(**text["tower"])
    return TextConditionedMMDiT(config_from_dict("mmdit", config["model_config"]), tower)
