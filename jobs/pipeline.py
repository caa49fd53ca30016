"""``vitdit pipeline``: run a recipe's stages (data → VAE → encode → ViT → DiT → sample → evaluate) in order.

    vitdit pipeline configs/digits.yaml                     # locally, each stage in this process
    vitdit pipeline configs/digits.yaml --dry-run           # print each stage's command and state
    vitdit pipeline configs/digits.yaml -v                  # with Ray's own logs
    vitdit pipeline configs/imagenet-256.yaml --address http://127.0.0.1:8265   # one Ray job per stage

A stage whose output is complete is skipped; a failed pipeline re-runs from the stage that failed.
With ``--address`` the workdir must be storage the cluster can reach (a URI, or a shared path).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main


@dataclasses.dataclass
class PipelineConfig:
    address: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Ray job server (http://host:8265): submit each stage as a Ray job; default: run here"
        },
    )
    working_dir: str = dataclasses.field(
        default=".", metadata={"help": "with --address: directory uploaded with each job"}
    )
    python: str | None = dataclasses.field(
        default=None,
        metadata={"help": "with --address: interpreter on the cluster (default: see vitdit submit)"},
    )
    redo: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "comma-separated stages to run even when their output is complete"}
    )
    dry_run: bool = dataclasses.field(default=False, metadata={"help": "print the plan and exit"})


def job_flags(module: str) -> set[str]:
    """The long flags that ``jobs.<module>`` accepts, read from its own ``--help``."""
    import contextlib
    import importlib
    import io
    import re

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        importlib.import_module(f"jobs.{module}").main(["--help"])
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", out.getvalue()))


def check_stage_flags(recipe) -> None:
    """Every key of every stage is a flag of that stage's job: a typo fails before anything runs."""
    from pipelines.recipe import check_stage_keys

    check_stage_keys(recipe, lambda stage: job_flags(stage.module))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "vitdit pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="recipe YAML, e.g. configs/digits.yaml")
    add_dataclass_arguments(parser, PipelineConfig)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's logs and library warnings")
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(PipelineConfig, args)

    def body() -> int:
        from pipelines.progress import quiet_logs
        from pipelines.recipe import cluster_runner, in_process_runner, load_recipe, run_recipe

        recipe = load_recipe(args.recipe)
        check_stage_flags(recipe)
        if not cfg.dry_run:
            quiet_logs(args.verbose)
        runner = cluster_runner(cfg.address, cfg.working_dir, cfg.python) if cfg.address else None
        if not cfg.address and not cfg.dry_run:
            from pipelines.runtime import init_ray

            init_ray(None)  # one local session shared by every stage
        log_dir = None if args.verbose or "://" in recipe.workdir else recipe.path("logs")
        runner = runner or in_process_runner("jobs", log_dir=log_dir)
        return run_recipe(recipe, runner, redo=cfg.redo, dry_run=cfg.dry_run, local=cfg.address is None)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
