"""Sample and evaluate every checkpoint of a training run exactly once (scheduled evaluation).

Runbook::

    # one pass over the checkpoints without an evaluation, then exit (cron, or a periodic job)
    python -m jobs.scheduled_eval --watch runs/dit --reference data/digits16 \\
        --classifier runs/vit --num-samples 200 --cfg-scale 3
    # keep polling every 30 minutes
    vitdit evaluate --watch <MLFLOW_RUN_ID> --every 30m --reference ... --classifier ...

    # crontab: every 30 minutes, on the cluster
    */30 * * * * ray job submit --address http://head:8265 --working-dir . -- \\
        python -m jobs.scheduled_eval --watch s3://bucket/runs/dit --reference ... --classifier ...

Several watchers may run at once: a claim protocol on MLflow (pipelines/scheduled_eval.py, whose
docstring lists the tag names) lets exactly one evaluate each checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_dataclass_arguments, run_main


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from pipelines.evaluate import EvalConfig
    from pipelines.sample import SampleConfig
    from pipelines.scheduled_eval import _EVAL_SKIP, _SAMPLE_SKIP, WatchConfig

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_arguments(parser, WatchConfig)
    add_dataclass_arguments(parser.add_argument_group("sampling"), SampleConfig, skip=_SAMPLE_SKIP)
    add_dataclass_arguments(parser.add_argument_group("evaluation"), EvalConfig, skip=_EVAL_SKIP)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from pipelines.scheduled_eval import run_watch

    return run_main(lambda: run_watch(args))


if __name__ == "__main__":
    sys.exit(main())
