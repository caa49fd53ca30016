r"""``vitdit train dit``: train a DiT on a latent data set with Ray Train.

Runbook::

    # the quickstart's DiT, on a laptop (local Ray cluster, ./mlflow.db)
    vitdit train dit --latents out/latents --model DiT-digits/2 --output out/dit \
        --steps 2500 --global-batch-size 128 --lr 3e-3 --warmup-steps 100 --lr-schedule cosine \
        --ema-decay 0.998 --cpus-per-worker 2 --compile

    # the paper's recipe on a GPU cluster
    vitdit train dit --latents s3://bucket/imagenet256-latents --model DiT-XL/2 \
        --output s3://bucket/runs/dit-xl2 --num-workers 8 --use-gpu --global-batch-size 256 \
        --steps 400000 --checkpoint-every 50000 --keep-every 100000

    # continue a stopped run (same MLflow run, same data order)
    vitdit train dit ... --resume out/dit
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main
from pipelines.train.loop import TrainConfig


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from pipelines.train.dit import DiTTrainConfig

    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.train_dit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_dataclass_arguments(parser, DiTTrainConfig)
    add_dataclass_arguments(parser.add_argument_group("training"), TrainConfig)
    args = parser.parse_args(argv)

    def body() -> int:
        from pipelines.train.dit import DiTTask
        from pipelines.train.loop import run_training

        task = DiTTask(dataclass_from_args(DiTTrainConfig, args))
        run_training(task, dataclass_from_args(TrainConfig, args))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
