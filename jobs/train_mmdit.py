r"""``vitdit train mmdit``: train an MM-DiT (Stable Diffusion 3's transformer) with rectified flow.

The latent data set must carry text embeddings: encode captioned images with a text encoder first.

Runbook::

    # captioned images (a <name>.txt beside each image), a local CLIP text encoder directory
    vitdit encode --input images/ --output out/latents --vae out/vae --text-encoder clip-text/
    vitdit train mmdit --latents out/latents --model MMDiT-digits --output out/mmdit \
        --steps 3000 --global-batch-size 128 --lr 1e-3 --warmup-steps 100 --lr-schedule cosine
    vitdit sample --checkpoint out/mmdit --prompt "a seven" --prompt "a two" --output out/samples

    # SD3-Medium's size on a GPU cluster
    vitdit train mmdit --latents s3://bucket/latents --model SD3-Medium --output s3://bucket/runs/sd3m \
        --num-workers 8 --use-gpu --global-batch-size 256 --shift 3.0 --precision bf16

    # continue a stopped run (same MLflow run, same data order)
    vitdit train mmdit ... --resume out/mmdit
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main
from pipelines.train.loop import TrainConfig


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from pipelines.train.mmdit import MMDiTTrainConfig

    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.train_mmdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_dataclass_arguments(parser, MMDiTTrainConfig)
    add_dataclass_arguments(parser.add_argument_group("training"), TrainConfig)
    args = parser.parse_args(argv)

    def body() -> int:
        from pipelines.train.loop import run_training
        from pipelines.train.mmdit import MMDiTTask

        task = MMDiTTask(dataclass_from_args(MMDiTTrainConfig, args))
        run_training(task, dataclass_from_args(TrainConfig, args))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
