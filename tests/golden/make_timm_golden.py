"""Regenerate ``timm_vit_b16.json``: timm's ``vit_base_patch16_224`` state-dict keys and shapes.

Offline (``pretrained=False``; the layout does not depend on the weights). Built on the meta device,
so it allocates nothing. Run from the repository root:

    .venv/bin/python tests/golden/make_timm_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch


def main() -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    golden = {
        "source": "timm.create_model('vit_base_patch16_224', pretrained=False).state_dict()",
        "timm_version": timm.__version__,
        "num_params": sum(p.numel() for p in model.parameters()),
        "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
    }
    out = Path(__file__).with_name("timm_vit_b16.json")
    # One tensor per line, so a diff of the golden file reads as a diff of the layout.
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in golden["state_dict"].items()]
    head = json.dumps({k: v for k, v in golden.items() if k != "state_dict"}, indent=1)[
        :-2
    ]  # drop the closing "\n}"
    out.write_text(head + ',\n "state_dict": {\n' + ",\n".join(lines) + "\n }\n}\n")
    print(f"wrote {out}: {len(golden['state_dict'])} tensors, {golden['num_params']:,} parameters")


if __name__ == "__main__":
    main()
