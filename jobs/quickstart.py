"""``vitdit quickstart``: the whole system on one machine, on real data, in minutes (no GPU, no network).

    vitdit quickstart                          # ./quickstart: every stage, ~10 min on 2 CPU cores
    vitdit quickstart --workdir /tmp/qs        # elsewhere; a second run skips the finished stages
    vitdit quickstart --smoke-test             # the same stages at tiny sizes, a minute or two
    vitdit quickstart -v                       # with Ray's own logs and the libraries' warnings
    vitdit quickstart --print-recipe > my.yaml # the recipe, to edit and run with `vitdit pipeline`
    vitdit quickstart --task numbers           # text-to-image: two-digit numbers from their names

Runs the packaged recipe (vitdit/recipes/quickstart.yaml, whose comments give the reason for each
setting) through ``vitdit pipeline``'s orchestration on a local Ray cluster:

1. ``data``: scikit-learn's handwritten digits exported at 16 px (``WORKDIR/data/{train,val}``);
2. ``vae`` + ``encode``: a small AutoencoderKL (Ray Train), then the train split encoded to
   8×8×4 latents (Ray Data, ``WORKDIR/latents/manifest.json``);
3. ``vit``: a ViT classifier on the train images, validated on val (Ray Train);
4. ``dit``: a class-conditional DiT on the latents (Ray Train, compiled);
5. ``sample`` + ``evaluate``: 20 samples of every class (Ray Data actors, ``WORKDIR/samples``),
   scored by the ViT (accuracy per class, FD, KID, precision/recall) against the real val images
   and the VAE's reconstruction floor; then the memorisation check (``vitdit.memorization``);
6. one MLflow store (``WORKDIR/mlflow.db``) with a run of experiment vitdit-quickstart that spans
   the whole run, a summary table, ``WORKDIR/summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main

# The machine report's helpers, where tests/test_machine_accounting.py imports them from.
from pipelines.quickstart import STEAL_WARNING, cpu_matmul_gflops, machine_lines  # noqa: F401


@dataclasses.dataclass
class QuickstartConfig:
    workdir: str = dataclasses.field(
        default="./quickstart",
        metadata={"help": "every stage writes under it; a re-run skips finished stages"},
    )
    task: str = dataclasses.field(
        default="digits",
        metadata={
            "help": "digits: class-conditional DiT on the digits; numbers: text-to-image MM-DiT drawing "
            "two-digit numbers from their names (vitdit/recipes/numbers.yaml)",
            "choices": ("digits", "numbers"),
        },
    )
    smoke_test: bool = dataclasses.field(
        default=False,
        metadata={"help": "the same stages at tiny sizes (a minute or two; no accuracy targets)"},
    )
    tracking_uri: str | None = dataclasses.field(
        default=None, metadata={"help": "MLflow store (default: sqlite:///WORKDIR/mlflow.db, absolute)"}
    )
    redo: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "comma-separated stages to run even when their output is complete"}
    )
    dry_run: bool = dataclasses.field(
        default=False, metadata={"help": "print each stage's command and state, exit"}
    )
    print_recipe: bool = dataclasses.field(
        default=False, metadata={"help": "print the recipe as YAML (for `vitdit pipeline`) and exit"}
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "vitdit quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(parser, QuickstartConfig)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's logs and library warnings")
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(QuickstartConfig, args)

    def body() -> int:
        from pipelines import quickstart

        if cfg.print_recipe:
            print(quickstart.recipe_yaml(cfg.smoke_test, cfg.task), end="")
            return 0
        from jobs.pipeline import check_stage_flags
        from pipelines.progress import quiet_logs

        quiet_logs(args.verbose)
        return quickstart.run_quickstart(
            cfg.workdir,
            "jobs",
            verbose=args.verbose,
            tracking_uri=cfg.tracking_uri,
            smoke_test=cfg.smoke_test,
            redo=cfg.redo,
            check_flags=check_stage_flags,
            dry_run=cfg.dry_run,
            task=cfg.task,
        )

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
