"""Local paths and object-storage URIs (``s3://``, ``gs://``, ...) behind one small API.

Jobs take either a local path or a URI for their outputs. Local files are written atomically (a
temporary name in the same directory, then ``os.replace``), so a reader never sees half a file; on
object storage one ``put`` is already all-or-nothing. ``file://`` URIs are treated as the local
paths they name (the atomic route). URIs go through pyarrow's filesystems, imported only when a
URI is used.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

from vitdit.errors import VitditError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain local path."""
    return bool(_SCHEME.match(path))


def _local(path: str) -> str | None:
    """The local path of ``path`` (a plain path or a ``file://`` URI); None for remote storage."""
    if path.startswith("file://"):
        return path.removeprefix("file://")
    return None if is_uri(path) else path


def join(base: str, *names: str) -> str:
    """``base`` / names: with ``/`` for URIs, ``os.path.join`` for local paths."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(base, *names)


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:  # unknown scheme, unreachable storage, missing credentials
        raise VitditError(f"{uri}: cannot open its filesystem ({e})") from e


def exists(path: str) -> bool:
    """A file or directory exists at ``path`` (local or URI)."""
    local = _local(path)
    if local is not None:
        return os.path.exists(local)
    import pyarrow.fs as pafs

    fs, p = _filesystem(path)
    try:
        return fs.get_file_info(p).type != pafs.FileType.NotFound
    except OSError as e:
        raise VitditError(f"{path}: cannot check whether it exists ({e})") from e


def write_json(path: str, payload: Any, indent: int | None = 2) -> None:
    """Write ``payload`` as JSON (sorted keys; non-JSON values as ``str``), all or nothing.

    Local: a temporary sibling renamed over ``path`` (parent directories are created). Object
    storage: one put.
    """
    text = json.dumps(payload, indent=indent, sort_keys=True, default=str)
    local = _local(path)
    if local is None:
        fs, p = _filesystem(path)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
        return
    parent = os.path.dirname(os.path.abspath(local))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(local)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``; None when there is no such file. A file that cannot be read
    or is not a JSON object raises VitditError naming it."""
    local = _local(path)
    try:
        if local is not None:
            if not os.path.exists(local):
                return None
            with open(local, encoding="utf-8") as f:
                text = f.read()
        else:
            import pyarrow.fs as pafs

            fs, p = _filesystem(path)
            if fs.get_file_info(p).type == pafs.FileType.NotFound:
                return None
            with fs.open_input_stream(p) as f:
                text = f.read().decode("utf-8")
        value = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitditError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(value, dict):
        raise VitditError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def copy_dir(src: str, dst: str) -> None:
    """Copy a directory tree between any two of local paths and URIs (pyarrow's ``copy_files``),
    creating ``dst`` first (a local destination must exist; object stores ignore it)."""
    import pyarrow.fs as pafs

    local = _local(dst)
    if local is not None:
        os.makedirs(local, exist_ok=True)
    else:
        fs, path = _filesystem(dst)
        fs.create_dir(path, recursive=True)
    pafs.copy_files(src, dst)


__all__ = ["copy_dir", "exists", "is_uri", "join", "read_json", "write_json"]
