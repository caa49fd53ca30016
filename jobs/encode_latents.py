"""``vitdit encode``: encode images into a latent data set with a diffusers VAE on Ray Data.

Runbook::

    vitdit data digits --output /tmp/digits --resolution 16
    vitdit encode --input /tmp/digits/train --output /tmp/latents --vae ./my_vae --resolution 16
    # captioned images for text-to-image (MM-DiT) training, with a CLIP text tower's embeddings:
    vitdit encode --input ./captioned --output /tmp/latents_t2i --vae ./my_vae \\
        --text-encoder ./sd3/text_encoder
    # a cluster: ray job submit --working-dir . -- python -m jobs.encode_latents \\
    #     --input s3://bucket/shards --output s3://bucket/latents --vae stabilityai/sd-vae-ft-ema --flip

Captions come with the images (``<stem>.txt`` beside a file in a folder, ``<key>.txt`` or
``<key>.json``'s "caption" in a tar, a ``caption`` column in parquet) and are always stored, "" for an
image without one. ``--text-encoder`` also stores each caption's embeddings and the encoding of "";
without it only the captions are stored and the trainer's own text tower tokenizes them.

Re-running the same command resumes (each image is written exactly once); other settings over an
existing output (another text encoder, or none, included) are refused unless ``--overwrite``. Ends
with a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from pipelines.encode import EncodeConfig

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, EncodeConfig)
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(EncodeConfig, args)

    def body() -> int:
        from pipelines.encode import encode_dataset

        summary = encode_dataset(cfg)
        print(
            f"encode: read {summary['read']}, encoded {summary['encoded']}, quarantined {summary['quarantined']}, "
            f"captioned {summary['captioned']}, truncated {summary['truncated']} "
            f"→ {summary['output']} ({summary['parts']} parts, {summary['resumed_parts']} resumed, "
            f"{summary['seconds']} s) {json.dumps(summary)}",
            flush=True,
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
