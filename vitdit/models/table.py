"""The preset table: parameter counts and forward GMACs of every registered model, computed here.

GMACs are billions of multiply-accumulates of one forward pass on one image: the unit the DiT paper
calls "Gflops". Training costs about 6× this in FLOPs (3× forward, 2 FLOPs per MAC). Models are
built on the meta device, so even SD3.5-Large costs no memory. ``vitdit models`` prints it and
``vitdit models --write-docs`` rewrites docs/models.md, which tests/unit/test_docs.py compares.
"""

from __future__ import annotations

import os

import torch

# The generated table in docs/models.md sits between these markers.
DOCS_BEGIN = "<!-- models:begin -->"
DOCS_END = "<!-- models:end -->"
# In a repository checkout: <repo>/docs/models.md (vitdit/models/table.py is three levels down).
DOCS_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "models.md"
)


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
    """The rows of ``preset_table`` as a Markdown table (what docs/models.md holds)."""
    lines = ["| preset | input | parameters | forward GMACs |", "| --- | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['input']} | {r['params'] / 1e6:.2f}M | {r['gmacs']:.4g} |")
    return "\n".join(lines)


def with_table(text: str, table: str) -> str:
    """``text`` with what lies between ``DOCS_BEGIN`` and ``DOCS_END`` replaced by ``table``."""
    from vitdit.errors import VitditError

    start, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if start < 0 or end < start:
        raise VitditError(f"no {DOCS_BEGIN} ... {DOCS_END} markers, in this order, in the text")
    return text[: start + len(DOCS_BEGIN)] + "\n" + table + "\n" + text[end:]


def write_docs(path: str = DOCS_PATH) -> bool:
    """Regenerate the preset table in ``path`` (docs/models.md); True when the file changed."""
    from vitdit.errors import VitditError

    if not os.path.isfile(path):
        raise VitditError(f"{path}: no such file (--write-docs works in a repository checkout)")
    with open(path, encoding="utf-8") as f:
        old = f.read()
    new = with_table(old, markdown_table(preset_table()))
    if new != old:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != old
