"""Evaluate a samples directory against reference images; ``--watch`` evaluates every checkpoint.

Runbook::

    vitdit evaluate --samples samples/step2800 --reference data/digits16 --classifier runs/vit \\
        [--inception-weights weights-inception-2015-12-05-6726825d.pth] [--mlflow-run RUN_ID]
    vitdit evaluate --watch runs/dit --every 30m --reference data/digits16 --classifier runs/vit

Metrics (``eval/fd``, ``eval/kid``, ``eval/precision``, ``eval/recall``, ``eval/is``,
``eval/accuracy``, ``eval/accuracy/<class>``, the floor ``eval/floor/...``, and with Inception weights
``eval/fid``, ``eval/inception_score``) go to MLflow at the checkpoint's step with the JSON report
(``SAMPLES/evaluation.json``) and the grid. See pipelines/evaluate.py.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--watch" or a.startswith("--watch=") for a in argv):
        from jobs.scheduled_eval import main as watch_main

        return watch_main(argv, prog=prog)
    from pipelines.evaluate import EvalConfig

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_arguments(parser, EvalConfig)
    parser.add_argument(
        "--watch",
        help="training run dir or MLflow run id: sample and evaluate each of its checkpoints once "
        "(watch mode has its own flags: vitdit evaluate --watch RUN --help)",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        import json

        from pipelines.evaluate import run_evaluation

        report = run_evaluation(dataclass_from_args(EvalConfig, args))
        print(json.dumps(report["metrics"], indent=2, sort_keys=True))
        print(f"report: {report['report_path']}; MLflow run: {report.get('mlflow_run_id')}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
