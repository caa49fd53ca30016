"""Generate samples from a DiT checkpoint with a Ray Data actor pool (DiT + VAE decoder per actor).

Runbook::

    # a vitdit checkpoint (or its run directory: the latest checkpoint); the VAE is the checkpoint's
    vitdit sample --checkpoint runs/dit/checkpoint_00002800 --num-samples 200 --cfg-scale 3 \\
        --sampler ddim --sampling-steps 50 --output samples/step2800
    # a facebookresearch/DiT release file, with its VAE; 50K samples for the ADM evaluator
    vitdit sample --checkpoint DiT-XL-2-256.pt --vae stabilityai/sd-vae-ft-ema --num-samples 50000 \\
        --cfg-scale 1.5 --sampler ddpm --sampling-steps 250 --num-actors 8 --batch-size 64 --output s50k

Writes ``OUTPUT/images/<index:06d>_<label>.png``, ``OUTPUT/samples.npz``, ``OUTPUT/grid.png`` and
``OUTPUT/sampling.json``; a re-run with the same flags finishes an interrupted job. The grid and the
config go to MLflow (experiment ``vitdit-sample``, tagged ``vitdit.training_run_id``).
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from pipelines.sample import SampleConfig

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_arguments(parser, SampleConfig)
    args = parser.parse_args(argv)

    def body() -> int:
        from pipelines.sample import run_sampling

        result = run_sampling(dataclass_from_args(SampleConfig, args))
        print(
            f"{result.num_samples} samples in {result.output} ({result.num_generated} generated now, "
            f"{result.seconds:.1f} s); MLflow run: {result.mlflow_run_id}"
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
