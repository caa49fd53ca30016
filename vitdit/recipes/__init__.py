"""Recipes shipped with the package (``vitdit quickstart`` runs ``quickstart.yaml``).

Package data rather than ``configs/``: an installed copy has no checkout beside it.
"""

from __future__ import annotations

from importlib import resources

from vitdit.errors import VitditError


def recipe_text(name: str) -> str:
    """The text of the packaged recipe ``<name>.yaml`` (comments included)."""
    path = resources.files(__name__) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir())
        raise VitditError(
            f"no packaged recipe {name!r} (known: {', '.join(k for k in known if '.' not in k)})"
        )
    return path.read_text(encoding="utf-8")
