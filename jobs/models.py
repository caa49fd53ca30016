"""``vitdit models``: the model presets with parameter counts and forward GMACs, computed here.

GMACs are billions of multiply-accumulates of one forward pass on one image: the unit the DiT paper
calls "Gflops". Training costs about 6× this in FLOPs (3× forward, 2 FLOPs per MAC).

    vitdit models                 # the table, as Markdown
    vitdit models --write-docs    # rewrite the table in docs/models.md (tests/unit/test_docs.py checks it)
"""

from __future__ import annotations

import argparse
import sys

from vitdit.models.table import (  # noqa: F401 - re-exported for tests and scripts
    DOCS_BEGIN,
    DOCS_END,
    DOCS_PATH,
    markdown_table,
    preset_table,
    with_table,
    write_docs,
)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("vit", "dit", "mmdit"), default=None, help="only this model family")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="rewrite the table between the markers of docs/models.md (in a repository checkout)",
    )
    args = p.parse_args(argv)
    if args.write_docs:

        def body() -> int:
            changed = write_docs()
            print(f"{DOCS_PATH}: {'table updated' if changed else 'already up to date'}")
            return 0

        from jobs._common import run_main

        return run_main(body)
    print(markdown_table(preset_table(args.kind)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
