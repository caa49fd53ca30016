"""``vitdit train vae``: train a small diffusers AutoencoderKL on images with Ray Train.

Runbook (the bundled digits, CPU, about a minute of training)::

    vitdit data digits --output /tmp/digits16 --resolution 16
    vitdit train vae --images /tmp/digits16 --output /tmp/runs/vae --steps 600 \\
        --global-batch-size 64 --lr 1e-3
    vitdit encode --images /tmp/digits16 --vae /tmp/runs/vae/vae --output /tmp/latents16

The final model is saved with ``save_pretrained`` to ``<output>/vae`` with ``scaling_factor`` =
1 / std of its latents on the training images; checkpoints go under ``<output>`` as for every
trainer.
"""

from __future__ import annotations

import argparse
import re
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main

# The working recipe of docs/facts.md: batch 64, lr 1e-3. No EMA: a short run's EMA at 0.9999 would be
# nearly the initial weights.
VAE_DEFAULTS = {"ema_decay": 0.0, "lr": 1e-3, "global_batch_size": 64, "steps": 600}


def _without_default(text: str | None) -> str:
    return re.sub(r"\s*\(default: [^)]*\)$", "", text or "")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from pipelines.train.loop import TrainConfig
    from pipelines.train.vae import VAETaskConfig

    parser = argparse.ArgumentParser(prog=prog or "vitdit train vae", description=__doc__.split("\n")[0])
    add_dataclass_arguments(parser, VAETaskConfig)
    add_dataclass_arguments(parser, TrainConfig)
    parser.set_defaults(**VAE_DEFAULTS)
    for action in parser._actions:  # the help shows the VAE defaults, not TrainConfig's
        if action.dest in VAE_DEFAULTS:
            action.help = _without_default(action.help) + f" (default: {VAE_DEFAULTS[action.dest]})"
    return parser


def train_vae(task_cfg, train_cfg):
    """Run VAE training; returns the loop's TrainResult (``<output>/vae`` is written by finalize)."""
    from pipelines.runtime import init_ray
    from pipelines.train.loop import run_training
    from pipelines.train.vae import VAETask

    task = VAETask(task_cfg, train_cfg)  # validates the architecture before Ray starts
    init_ray(train_cfg.address)
    return run_training(task, train_cfg)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    def body() -> int:
        from pipelines.train.loop import TrainConfig
        from pipelines.train.vae import VAETaskConfig

        train_vae(dataclass_from_args(VAETaskConfig, args), dataclass_from_args(TrainConfig, args))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
