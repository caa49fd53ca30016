"""Shared plumbing of the job entrypoints: dataclass configs as flags, error handling."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable

from vitdit.errors import VitditError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Every field of a config dataclass becomes a ``--kebab-case`` flag (docs/design.md, Conventions).

    Field metadata may carry ``help`` and ``choices``. bool fields become ``--x / --no-x``. The
    default is appended to the help as ``(default: X)`` unless the help already says it in words
    (``default: ...``) or there is no value to show (None, empty).
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
        if typing.get_origin(base) in (tuple, list) and f.metadata.get("repeat"):
            # A repeatable flag (``--prompt A --prompt B``): values may contain commas.
            kwargs.update(action="append", type=typing.get_args(base)[0], default=None)
        elif typing.get_origin(base) in (tuple, list):
            inner = typing.get_args(base)[0]
            kwargs["type"] = lambda s, inner=inner: tuple(inner(x) for x in s.split(",") if x != "")
        elif base in (int, float, str):
            kwargs["type"] = base
        if required:
            kwargs.pop("default")
            kwargs["required"] = True
        says_default = re.search(r"\bdefault:", kwargs["help"]) is not None
        empty = default is None or (isinstance(default, (tuple, list, str)) and len(default) == 0)
        if not (required or f.metadata.get("repeat") or says_default or empty):
            shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
            kwargs["help"] = (kwargs["help"] + f" (default: {shown})").strip()
        parser.add_argument(_flag(f.name), **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    for name, f in fields.items():  # repeatable flags: argparse gives a list or None
        if f.metadata.get("repeat") and name in values:
            values[name] = tuple(values[name] or ())
    return cls(**values)


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a job body: VitditError → message on stderr, exit 2; KeyboardInterrupt → 130."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(fn() or 0)
    except VitditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # A path given on the command line that is a file where a directory belongs (or the reverse),
        # or not writable: the user's input, not a bug.
        detail = f"{e.filename}: {e.strerror or e}" if e.filename is not None else str(e)
        print(f"error: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted; every job resumes where it stopped: run the same command again\n  {resume_command()}",
            file=sys.stderr,
        )
        return 130


def resume_command() -> str:
    """This process's command line, pasteable (``vitdit ...`` when started through the console script)."""
    import shlex

    argv = list(sys.argv) or ["vitdit"]
    head, name = os.path.split(argv[0])
    if name == "vitdit":
        argv[0] = "vitdit"
    elif name.endswith(".py") and os.path.basename(head) == "jobs":  # python -m jobs.<name>
        argv[:1] = ["python", "-m", f"jobs.{name[:-3]}"]
    return " ".join(shlex.quote(a) for a in argv)
