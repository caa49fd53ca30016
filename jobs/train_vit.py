"""``vitdit train vit``: train a ViT classifier on images with Ray Train.

Runbook (the bundled digits, CPU, a minute or two)::

    vitdit data digits --output /tmp/digits16 --resolution 16
    vitdit train vit --images /tmp/digits16 --model ViT-digits/4 --output /tmp/runs/vit \\
        --steps 300 --global-batch-size 128 --lr 1e-3 --warmup-steps 30 --lr-schedule cosine

Validation accuracy on ``<images>/val`` (when the source has train/ and val/) is logged to MLflow
as ``val/accuracy`` and ``val/loss`` every epoch by default and at the end; the checkpoint records
the class names. On a cluster: ``--num-workers 8 --use-gpu --images s3://bucket/imagenet``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main

# A classifier trained for a few thousand steps gains little from an EMA of its weights, and at the
# DiT default (0.9999) the average would lag ~10k steps behind: EMA is off unless asked for.
VIT_DEFAULTS = {"ema_decay": 0.0, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 0}


def _without_default(text: str | None) -> str:
    return re.sub(r"\s*\(default: [^)]*\)$", "", text or "")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from pipelines.train.loop import TrainConfig
    from pipelines.train.vit import ViTTaskConfig

    parser = argparse.ArgumentParser(prog=prog or "vitdit train vit", description=__doc__.split("\n")[0])
    add_dataclass_arguments(parser, ViTTaskConfig)
    add_dataclass_arguments(parser, TrainConfig)
    parser.set_defaults(**VIT_DEFAULTS, eval_every=None)
    for action in parser._actions:  # the help shows the ViT defaults, not TrainConfig's
        if action.dest == "eval_every":
            action.help = "validation cadence in steps (default: once per epoch of the training images)"
        elif action.dest in VIT_DEFAULTS:
            action.help = _without_default(action.help) + f" (default: {VIT_DEFAULTS[action.dest]})"
    return parser


def train_vit(task_cfg, train_cfg):
    """Run ViT training; ``eval_every=None`` means once per epoch of the training images."""
    import dataclasses

    from pipelines.runtime import init_ray
    from pipelines.train.loop import run_training
    from pipelines.train.vit import ViTTask

    init_ray(train_cfg.address)
    task = ViTTask(task_cfg, train_cfg)
    if train_cfg.eval_every is None:
        task.datasets()  # lists the source and counts its rows (cached for run_training)
        per_epoch = math.ceil(
            (task.num_train_rows or train_cfg.global_batch_size) / train_cfg.global_batch_size
        )
        train_cfg = dataclasses.replace(train_cfg, eval_every=max(1, per_epoch))
        task.train_cfg = train_cfg
    return run_training(task, train_cfg)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    def body() -> int:
        from pipelines.train.loop import TrainConfig
        from pipelines.train.vit import ViTTaskConfig

        train_vit(dataclass_from_args(ViTTaskConfig, args), dataclass_from_args(TrainConfig, args))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
