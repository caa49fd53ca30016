"""``vitdit models``: the model presets with parameter counts and forward GFLOPs, computed here.

GFLOPs are the papers' unit: billions of multiply-accumulates of one forward pass on one image
(the DiT paper's "Gflops"). Training costs about 6× this in FLOPs (3× forward, 2 FLOPs per MAC).
"""

from __future__ import annotations

import argparse
import sys

import torch


def preset_table(kind: str | None = None) -> list[dict]:
    """One row per preset: name, parameters, forward GMACs per image, input size."""
    from vitdit.models import create_model, list_models

    rows = []
    for name in list_models(kind):
        with torch.device("meta"):
            model = create_model(name)
        cfg = model.config
        size = getattr(cfg, "image_size", None) or getattr(cfg, "input_size", None)
        rows.append(
            {
                "name": name,
                "params": sum(p.numel() for p in model.parameters()),
                "gmacs": model.forward_macs() / 1e9,
                "input": f"{size}×{size}"
                + (f"×{cfg.in_channels}" if hasattr(cfg, "in_channels") else "")
                # MM-DiT's cost depends on the text length too: counted at the length it is sized for.
                + (f" + {cfg.context_len} text" if hasattr(cfg, "context_len") else ""),
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| preset | input | parameters | forward GMACs |", "| --- | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['input']} | {r['params'] / 1e6:.2f}M | {r['gmacs']:.4g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("vit", "dit", "mmdit"), default=None, help="only this model family")
    args = p.parse_args(argv)
    print(markdown_table(preset_table(args.kind)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
