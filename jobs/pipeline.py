"""``vitdit pipeline``: run a recipe's stages (data → VAE → encode → ViT → DiT → sample → evaluate) in order.

    vitdit pipeline configs/digits.yaml                     # locally, each stage in this process
    vitdit pipeline configs/digits.yaml --dry-run           # print each stage's command and state
    vitdit pipeline configs/imagenet-256.yaml --address http://127.0.0.1:8265   # one Ray job per stage

A stage whose output is complete is skipped; a failed pipeline re-runs from the stage that failed.
With ``--address`` the workdir must be storage the cluster can reach (a URI, or a shared path).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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
    import difflib

    from pipelines.recipe import STAGES
    from vitdit.errors import VitditError

    for stage in STAGES:
        keys = recipe.stages.get(stage.name)
        if not keys:
            continue
        flags = job_flags(stage.module)
        for key in keys:
            flag = "--" + str(key).replace("_", "-")
            if flag not in flags:
                near = difflib.get_close_matches(flag, sorted(flags), n=1)
                hint = f" (did you mean {near[0][2:].replace('-', '_')}?)" if near else ""
                raise VitditError(
                    f"{recipe.source}: stages.{stage.name}.{key}: not a flag of `vitdit {stage.module}`{hint}"
                )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "vitdit pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="recipe YAML, e.g. configs/digits.yaml")
    add_dataclass_arguments(parser, PipelineConfig)
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(PipelineConfig, args)

    def body() -> int:
        from pipelines.recipe import cluster_runner, load_recipe, local_runner, plan, run_pipeline
        from pipelines.tracking import resolve_tracking_uri

        recipe = load_recipe(args.recipe)
        check_stage_flags(recipe)
        if cfg.dry_run:
            for stage, stage_argv, complete in plan(recipe, strict=False):
                state = {True: "complete, skip", False: "to run", None: "output unreachable"}[complete]
                print(f"{stage.name:9s} [{state}] vitdit-job {stage.module} {' '.join(stage_argv)}")
            return 0
        # Every stage logs to one store: the recipe's, else the environment's, else ./mlflow.db (absolute).
        uri = recipe.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri or cfg.address is None:
            os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(uri)
        if cfg.address:
            runner = cluster_runner(cfg.address, cfg.working_dir, cfg.python)
        else:
            from pipelines.runtime import init_ray

            init_ray(None)  # one local session shared by every stage
            runner = local_runner
        results = run_pipeline(recipe, runner, redo=cfg.redo)
        print(f"\npipeline {recipe.name} ({recipe.workdir}):")
        for r in results:
            extra = f" in {r.seconds:.0f} s" if r.status in ("done", "failed") else ""
            code = f" (exit {r.exit_code})" if r.status == "failed" else ""
            print(f"  {r.name:9s} {r.status}{extra}{code}")
        failed = [r for r in results if r.status == "failed"]
        if failed:
            print(
                f"stage {failed[0].name} failed; re-run the same command to resume from it", file=sys.stderr
            )
            return failed[0].exit_code or 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
