"""Weight converters between vitdit's ViT and other libraries' layouts.

- timm → vitdit: the names already match (vitdit's ViT uses timm's), so :func:`timm_to_vitdit`
  (defined in :mod:`vitdit.models.vit`, which needs it to load checkpoints) only unwraps and
  validates: it strips wrapper prefixes and refuses timm variants this ViT does not implement
  (register tokens, distillation token, layer scale, average pooling), naming the keys.
- vitdit → transformers: :func:`vit_to_transformers` builds a ``transformers`` ``ViTModel`` (or
  ``ViTForImageClassification``) with the config mapped and our weights copied in, the fused ``qkv``
  split into query/key/value. Its ``last_hidden_state`` equals our ``forward_features`` (tested to
  <= 1e-5 relative in fp32). transformers is imported only inside these functions (a test extra).

transformers renamed ViT's modules in 5.x (``layers.N.attention.q_proj``, ``o_proj``, ``mlp.fc1``)
from 4.x (``encoder.layer.N.attention.attention.query``, ``attention.output.dense``,
``intermediate.dense``); the converter reads which one the installed model has and loads with
``strict=True``, so a layout it does not know fails loudly instead of leaving random weights.
Only the 5.x layout is exercised by the tests (transformers 5.24 is installed).
"""

from __future__ import annotations

import torch

from vitdit.errors import VitditError

# timm_to_vitdit lives beside the model that loads with it and is re-exported here, so imports go
# convert → models.vit only, never back.
from vitdit.models.vit import ViT, ViTConfig, timm_to_vitdit  # noqa: F401


def vit_to_transformers_config(config: ViTConfig, num_labels: int | None = None):
    """The ``transformers.ViTConfig`` describing the same network as ``config``."""
    from transformers import ViTConfig as HFViTConfig

    kwargs = {}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    return HFViTConfig(
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_hidden_dim,
        hidden_act="gelu",  # exact (erf) GELU, as ours
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=config.layer_norm_eps,  # transformers' default 1e-12 would differ from timm's 1e-6
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.in_chans,
        qkv_bias=config.qkv_bias,
        encoder_stride=config.patch_size,
        pooler_output_size=config.representation_size,
        pooler_act="tanh",
        **kwargs,
    )


def _block_names(layout: str, i: int) -> dict[str, str]:
    """Our block-i module names → transformers' for the given layout ("v5" or "v4")."""
    if layout == "v5":
        p = f"layers.{i}."
        return {
            "norm1": p + "layernorm_before",
            "q": p + "attention.q_proj",
            "k": p + "attention.k_proj",
            "v": p + "attention.v_proj",
            "attn.proj": p + "attention.o_proj",
            "norm2": p + "layernorm_after",
            "mlp.fc1": p + "mlp.fc1",
            "mlp.fc2": p + "mlp.fc2",
        }
    p = f"encoder.layer.{i}."
    return {
        "norm1": p + "layernorm_before",
        "q": p + "attention.attention.query",
        "k": p + "attention.attention.key",
        "v": p + "attention.attention.value",
        "attn.proj": p + "attention.output.dense",
        "norm2": p + "layernorm_after",
        "mlp.fc1": p + "intermediate.dense",
        "mlp.fc2": p + "output.dense",
    }


def vit_to_transformers_state_dict(model: ViT, layout: str = "v5", classifier: bool = False) -> dict:
    """Our ViT's weights in transformers' names (``ViTModel``; ``ViTForImageClassification`` when
    ``classifier``), as fp32 CPU tensors. ``layout`` is "v5" (transformers >= 5) or "v4"."""
    if layout not in ("v5", "v4"):
        raise VitditError(f"transformers layout {layout!r}; expected 'v5' or 'v4'")
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    base = "vit." if classifier else ""
    out = {
        base + "embeddings.cls_token": sd.pop("cls_token"),
        base + "embeddings.position_embeddings": sd.pop("pos_embed"),
        base + "layernorm.weight": sd.pop("norm.weight"),
        base + "layernorm.bias": sd.pop("norm.bias"),
    }
    for t in ("weight", "bias"):
        out[f"{base}embeddings.patch_embeddings.projection.{t}"] = sd.pop(f"patch_embed.proj.{t}")
    for i in range(model.config.depth):
        names = _block_names(layout, i)
        for t in ("weight", "bias"):
            qkv = sd.pop(f"blocks.{i}.attn.qkv.{t}", None)
            if qkv is not None:
                # Our qkv output is ordered (3, heads, head_dim) (see layers.Attention), so three
                # equal chunks are q, k and v, each (heads, head_dim) as transformers expects.
                for part, tensor in zip("qkv", qkv.chunk(3, dim=0)):
                    out[f"{base}{names[part]}.{t}"] = tensor.clone()
            for ours in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{base}{names[ours]}.{t}"] = sd.pop(f"blocks.{i}.{ours}.{t}")
    if model.config.representation_size:
        if classifier:
            raise VitditError(
                "transformers' ViTForImageClassification has no pre-logits layer; this ViT has "
                f"representation_size={model.config.representation_size} (export it as a ViTModel instead)"
            )
        for t in ("weight", "bias"):
            out[f"pooler.dense.{t}"] = sd.pop(f"pre_logits.fc.{t}")
    if classifier:
        for t in ("weight", "bias"):
            out[f"classifier.{t}"] = sd.pop(f"head.{t}")
    else:
        sd.pop("head.weight", None)
        sd.pop("head.bias", None)
    if sd:
        raise VitditError(f"ViT weights with no transformers counterpart: {sorted(sd)}")
    return out


def vit_to_transformers(model: ViT, classifier: bool = False):
    """A transformers ``ViTModel`` (or ``ViTForImageClassification``) carrying ``model``'s weights.

    ``ViTModel`` gets a pooler only when the ViT has the pre-training head (``representation_size``):
    its tanh pooler is that layer. Returned in eval mode, fp32, on the CPU.
    """
    from transformers import ViTForImageClassification, ViTModel

    c = model.config
    if classifier and c.num_classes == 0:
        raise VitditError("this ViT has no classifier (num_classes=0); export it as a ViTModel")
    hf_config = vit_to_transformers_config(c, num_labels=c.num_classes if classifier else None)
    if classifier:
        hf = ViTForImageClassification(hf_config)
    else:
        hf = ViTModel(hf_config, add_pooling_layer=bool(c.representation_size))
    keys = set(hf.state_dict())
    prefix = "vit." if classifier else ""
    if f"{prefix}layers.0.attention.q_proj.weight" in keys or c.depth == 0:
        layout = "v5"
    elif f"{prefix}encoder.layer.0.attention.attention.query.weight" in keys:
        layout = "v4"
    else:
        raise VitditError("the installed transformers' ViTModel has a module layout vitdit does not know")
    hf.load_state_dict(vit_to_transformers_state_dict(model, layout, classifier), strict=True)
    return hf.eval()
