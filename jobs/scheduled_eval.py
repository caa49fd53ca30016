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
import dataclasses
import os
import sys

from jobs._common import add_dataclass_arguments, run_main

# Flags that the sampling and evaluation configs share or that watch mode sets per checkpoint.
_SAMPLE_SKIP = ("checkpoint", "output", "mlflow_run_id", "mlflow", "tracking_uri", "experiment", "overwrite")
_EVAL_SKIP = (
    "samples",
    "mlflow_run",
    "step",
    "report",
    "mlflow",
    "tracking_uri",
    "experiment",
    "vae",
    "batch_size",
)


@dataclasses.dataclass
class WatchConfig:
    watch: str = dataclasses.field(metadata={"help": "training run directory or MLflow run id"})
    every: str | None = dataclasses.field(
        default=None, metadata={"help": "keep polling, e.g. 30m (default: one pass)"}
    )
    samples_root: str | None = dataclasses.field(
        default=None, metadata={"help": "where samples go (default: RUN_DIR/eval_samples)"}
    )
    claim_timeout: str = dataclasses.field(
        default="2h", metadata={"help": "a claim without heartbeat this long is stale"}
    )
    tracking_uri: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "MLflow store for claims, samples and metrics (default: the one the run's checkpoints "
            "recorded, else $MLFLOW_TRACKING_URI, else ./mlflow.db)"
        },
    )
    experiment: str = dataclasses.field(
        default="vitdit-eval", metadata={"help": "MLflow experiment of the claim (= evaluation) runs"}
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from pipelines.evaluate import EvalConfig
    from pipelines.sample import SampleConfig

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_arguments(parser, WatchConfig)
    add_dataclass_arguments(parser.add_argument_group("sampling"), SampleConfig, skip=_SAMPLE_SKIP)
    add_dataclass_arguments(parser.add_argument_group("evaluation"), EvalConfig, skip=_EVAL_SKIP)
    return parser


def run_watch(args: argparse.Namespace) -> int:
    from pipelines import scheduled_eval as se
    from pipelines.evaluate import EvalConfig, run_evaluation
    from pipelines.sample import SampleConfig, run_sampling

    values = vars(args)
    for flag in ("reference", "classifier"):
        if not values.get(flag):
            raise se.VitditError(f"--{flag} is required with --watch")
    pick = lambda cls, skip: {
        f.name: values[f.name] for f in dataclasses.fields(cls) if f.name not in skip and f.name in values
    }

    # One store for the claims, the sampling and the evaluation (se.store_of says which).
    uri = se.store_of(args.watch, args.tracking_uri)
    print(f"watching {args.watch}; claims and results in MLflow at {uri}")

    def evaluate(ref, run_id):
        root = args.samples_root or os.path.join(os.path.dirname(ref.path), "eval_samples")
        out = os.path.join(root, os.path.basename(ref.path))
        common = {"tracking_uri": uri, "mlflow": True}
        run_sampling(SampleConfig(**pick(SampleConfig, _SAMPLE_SKIP), checkpoint=ref.path, output=out, mlflow_run_id=run_id, **common))  # fmt: skip
        report = run_evaluation(EvalConfig(**pick(EvalConfig, _EVAL_SKIP), samples=out, mlflow_run=run_id, step=ref.step, vae=values.get("vae"), **common))  # fmt: skip
        return report["metrics"]

    handled = se.watch(
        args.watch, evaluate, tracking_uri=uri, experiment=args.experiment,
        every_s=se.parse_duration(args.every), claim_timeout_s=se.parse_duration(args.claim_timeout),
    )  # fmt: skip
    for r in handled:
        print(f"step {r['step']}: {r['state']} (MLflow run {r['run_id']})")
    if not handled:
        print("nothing to evaluate: every checkpoint has an evaluation or a live claim")
    return 1 if any(r["state"] == "failed" for r in handled) else 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    return run_main(lambda: run_watch(args))


if __name__ == "__main__":
    sys.exit(main())
