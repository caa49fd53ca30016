"""Shared plumbing of the job entrypoints: dataclass configs as flags, error handling."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable

from vitdit.errors import VitditError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Every field of a config dataclass becomes a ``--kebab-case`` flag (STYLE.md).

    Field metadata may carry ``help`` and ``choices``. bool fields become ``--x / --no-x``.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        kwargs: dict = {"help": f.metadata.get("help", ""), "default": default, "dest": f.name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        origin = typing.get_origin(tp)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if origin in (typing.Union, types.UnionType) and len(args) == 1 else tp
        if base is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) in (tuple, list):
            inner = typing.get_args(base)[0]
            kwargs["type"] = lambda s, inner=inner: tuple(inner(x) for x in s.split(",") if x != "")
        elif base in (int, float, str):
            kwargs["type"] = base
        if required:
            kwargs.pop("default")
            kwargs["required"] = True
        kwargs["help"] = (
            (kwargs["help"] + f" (default: {default})").strip() if not required else kwargs["help"]
        )
        parser.add_argument(_flag(f.name), **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a job body: VitditError → message on stderr, exit 2; KeyboardInterrupt → 130."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(fn() or 0)
    except VitditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
