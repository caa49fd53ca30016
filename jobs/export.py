"""Export a DiT checkpoint as a diffusers ``DiTPipeline`` directory.

Runbook::

    vitdit export runs/dit/checkpoint_00002800 exported/dit-digits       # EMA weights, the run's VAE
    vitdit export DiT-XL-2-256.pt exported/dit-xl --vae stabilityai/sd-vae-ft-ema
    python -c "import vitdit.diffusers_dit, diffusers; \\
        p = diffusers.DiTPipeline.from_pretrained('exported/dit-digits'); \\
        p(class_labels=p.get_label_ids(['3']), guidance_scale=3.0).images[0].save('3.png')"

The transformer is saved as ``vitdit.diffusers_dit.DiTReleaseTransformer2DModel`` (DiT's timestep
frequencies, which diffusers' own class loses on reload): import that module before
``from_pretrained``. ``--portable`` saves diffusers' ``DiTTransformer2DModel`` instead, which loads
without vitdit but samples measurably different images (vitdit/export_pipeline.py). A checkpoint
the pipeline cannot sample faithfully (a rectified-flow model, a VAE that does not fit) is refused,
and so is an OUT that exists and is not empty, unless --overwrite; both exit 2.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint dir, run dir or DiT release .pt")
    p.add_argument("output", metavar="OUT", help="the pipeline directory to write")
    p.add_argument("--vae", default=None, help="VAE name or local diffusers dir (default: the checkpoint's)")
    p.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (--no-ema: raw)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument(
        "--portable",
        action="store_true",
        help="diffusers' own transformer class: loads without vitdit, but with diffusers' timestep "
        "frequencies (not DiT's), so samples differ",
    )
    args = p.parse_args(argv)

    def body() -> int:
        from vitdit.export_pipeline import export_dit_pipeline

        record = export_dit_pipeline(
            args.checkpoint,
            args.output,
            vae=args.vae,
            use_ema=args.ema,
            overwrite=args.overwrite,
            portable=args.portable,
        )
        print(
            f"DiTPipeline written to {args.output} ({record['weights']} weights of {record['checkpoint']}, "
            f"transformer {record['transformer_class']})"
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
