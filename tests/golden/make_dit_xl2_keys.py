"""Writes dit_xl2_keys.json: the state-dict keys and shapes of facebookresearch/DiT's DiT-XL/2 (256 px).

Derived by hand from the release's module structure (``models.py`` at facebookresearch/DiT), not
from vitdit's code, so the golden test is an independent check of our layout:

- ``DiT.__init__`` registers ``x_embedder`` (timm ``PatchEmbed``: ``proj`` Conv2d, ``norm`` Identity),
  ``t_embedder`` (``mlp`` = Sequential(Linear(256, D), SiLU, Linear(D, D))), ``y_embedder``
  (``embedding_table`` = Embedding(num_classes + 1, D) since class_dropout_prob = 0.1 > 0),
  ``pos_embed`` (Parameter (1, T, D), requires_grad=False but still in the state dict),
  ``blocks`` (ModuleList of ``DiTBlock``) and ``final_layer``.
- ``DiTBlock``: ``norm1``/``norm2`` LayerNorm without affine (no keys), timm ``Attention`` (``qkv``
  with bias, ``proj``; q/k norms are Identity), timm ``Mlp`` (``fc1``, ``fc2``), ``adaLN_modulation``
  = Sequential(SiLU, Linear(D, 6D)) → keys ``adaLN_modulation.1.*``.
- ``FinalLayer``: ``norm_final`` (no affine), ``linear`` (D → p·p·out_channels),
  ``adaLN_modulation`` = Sequential(SiLU, Linear(D, 2D)).
- DiT-XL/2: depth 28, D = 1152, 16 heads, patch 2, input 32×32×4 latents, learn_sigma (8 output
  channels), 1000 classes. T = (32 / 2)² = 256.

The same key names appear in diffusers' ``scripts/convert_dit_to_diffusers.py`` (``t_embedder.mlp.0``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ...), which reads the published ``DiT-XL-2-256x256.pt``.
Order is ``Module.state_dict`` order: a module's own parameters first, then its children in
registration order. Run: ``python tests/golden/make_dit_xl2_keys.py``.
"""

import json
from pathlib import Path

D, DEPTH, P, C_IN, INPUT, CLASSES = 1152, 28, 2, 4, 32, 1000
C_OUT = 2 * C_IN  # learn_sigma
T = (INPUT // P) ** 2
MLP = 4 * D


def release_keys() -> dict[str, list[int]]:
    keys: dict[str, list[int]] = {"pos_embed": [1, T, D]}
    keys["x_embedder.proj.weight"] = [D, C_IN, P, P]
    keys["x_embedder.proj.bias"] = [D]
    keys["t_embedder.mlp.0.weight"] = [D, 256]
    keys["t_embedder.mlp.0.bias"] = [D]
    keys["t_embedder.mlp.2.weight"] = [D, D]
    keys["t_embedder.mlp.2.bias"] = [D]
    keys["y_embedder.embedding_table.weight"] = [CLASSES + 1, D]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        keys[b + "attn.qkv.weight"] = [3 * D, D]
        keys[b + "attn.qkv.bias"] = [3 * D]
        keys[b + "attn.proj.weight"] = [D, D]
        keys[b + "attn.proj.bias"] = [D]
        keys[b + "mlp.fc1.weight"] = [MLP, D]
        keys[b + "mlp.fc1.bias"] = [MLP]
        keys[b + "mlp.fc2.weight"] = [D, MLP]
        keys[b + "mlp.fc2.bias"] = [D]
        keys[b + "adaLN_modulation.1.weight"] = [6 * D, D]
        keys[b + "adaLN_modulation.1.bias"] = [6 * D]
    keys["final_layer.linear.weight"] = [P * P * C_OUT, D]
    keys["final_layer.linear.bias"] = [P * P * C_OUT]
    keys["final_layer.adaLN_modulation.1.weight"] = [2 * D, D]
    keys["final_layer.adaLN_modulation.1.bias"] = [2 * D]
    return keys


if __name__ == "__main__":
    out = Path(__file__).with_name("dit_xl2_keys.json")
    source = "facebookresearch/DiT models.py: DiT_XL_2(input_size=32, num_classes=1000, learn_sigma=True)"
    keys = release_keys()
    # One key per line, so a diff of the golden file reads like a diff of the layout.
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
    out.write_text(f'{{\n "source": {json.dumps(source)},\n "keys": {{\n{body}\n }}\n}}\n')
    print(f"wrote {len(keys)} keys to {out}")
