"""``vitdit data digits``: scikit-learn's 1,797 handwritten digits as an ImageFolder tree.

    vitdit data digits --output /tmp/digits [--resolution 16]

writes ``/tmp/digits/{train,val}/<digit>/<index>.png`` with a fixed, seeded, stratified split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main


@dataclasses.dataclass
class DigitsConfig:
    output: str = dataclasses.field(metadata={"help": "directory to write train/ and val/ into"})
    resolution: int = dataclasses.field(
        default=16, metadata={"help": "image side (the digits are 8×8, upscaled)"}
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, DigitsConfig)
    cfg = dataclass_from_args(DigitsConfig, parser.parse_args(argv))

    def body() -> int:
        from pipelines import storage
        from vitdit.digits import export_digits
        from vitdit.errors import VitditError

        try:
            if storage.is_uri(cfg.output) and not cfg.output.startswith("file://"):
                # Object storage: write the tree locally, then upload it (one put per file).
                import tempfile

                with tempfile.TemporaryDirectory(prefix="vitdit-digits-") as tmp:
                    counts = export_digits(tmp, resolution=cfg.resolution)
                    storage.copy_dir(tmp, cfg.output)
            else:
                counts = export_digits(cfg.output.removeprefix("file://"), resolution=cfg.resolution)
        except ValueError as e:
            raise VitditError(f"--resolution {cfg.resolution}: {e}") from e
        except OSError as e:
            raise VitditError(f"--output {cfg.output}: cannot write ({e})") from e
        print(f"digits: wrote {counts} to {cfg.output} {json.dumps(counts)}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
