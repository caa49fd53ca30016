"""``vitdit data numbers``: handwritten two-digit numbers captioned in words, a text-to-image set.

    vitdit data numbers --output /tmp/numbers [--resolution 16] [--per-number-train 40] [--per-number-val 8]

writes ``/tmp/numbers/{train,val}/<NN>/<k>.png`` with the caption beside each in ``<k>.txt``
("forty-seven", "the number forty seven", ...) and ``/tmp/numbers/numbers.json``. Each image is two
scikit-learn digits side by side; train/ and val/ take their glyphs from the split of
``vitdit data digits``, and the held-out numbers (``vitdit.numbers.HELD_OUT``) appear in val/ only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main


@dataclasses.dataclass
class NumbersConfig:
    output: str = dataclasses.field(
        metadata={"help": "directory to write train/, val/ and numbers.json into"}
    )
    resolution: int = dataclasses.field(
        default=16, metadata={"help": "image side, even and at least 16 (each glyph is half of it)"}
    )
    per_number_train: int = dataclasses.field(
        default=40, metadata={"help": "images of each number in train/ (held-out numbers get none)"}
    )
    per_number_val: int = dataclasses.field(default=8, metadata={"help": "images of each number in val/"})
    seed: int = dataclasses.field(
        default=0, metadata={"help": "seed of the glyph and caption choice (the digits' split is fixed)"}
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, NumbersConfig)
    cfg = dataclass_from_args(NumbersConfig, parser.parse_args(argv))

    def body() -> int:
        from vitdit.errors import VitditError
        from vitdit.numbers import HELD_OUT, export_numbers

        try:
            counts = export_numbers(
                cfg.output,
                resolution=cfg.resolution,
                per_number_train=cfg.per_number_train,
                per_number_val=cfg.per_number_val,
                seed=cfg.seed,
            )
        except VitditError as e:
            # The library names its arguments; the user typed flags.
            msg = str(e)
            for name in ("resolution", "per_number_train", "per_number_val", "output"):
                if msg.startswith(name + " "):
                    msg = "--" + name.replace("_", "-") + msg[len(name) :]
                    break
            raise VitditError(msg) from e
        except OSError as e:
            raise VitditError(f"--output {cfg.output}: cannot write ({e})") from e
        held = ", ".join(map(str, HELD_OUT))
        print(f"numbers: wrote {json.dumps(counts)} to {cfg.output} (held out of train: {held})")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
