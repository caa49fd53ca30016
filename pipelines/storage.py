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


# Object storage that does not answer must fail in bounded time. pyarrow's S3 defaults (AWS SDK:
# no low-speed limit per request, 3 attempts per call and several calls per operation) took 100 s
# for one `get_file_info` against an endpoint that accepts connections and never replies
# (measured, pyarrow 25). `request_timeout` is curl's low-speed limit (less than 1 byte/s for that
# long), not a cap on a whole transfer, so large uploads are unaffected. Override with
# VITDIT_S3_CONNECT_TIMEOUT_S / VITDIT_S3_REQUEST_TIMEOUT_S / VITDIT_S3_MAX_ATTEMPTS.
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 3


def _s3_with_timeouts(fs):
    """``fs`` (from ``FileSystem.from_uri``) rebuilt with bounded connect/request timeouts and retries.

    Facts (pyarrow 25): ``FileSystem.from_uri("s3://...")`` reads the endpoint from
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, but the ``S3FileSystem()`` constructor does
    not (it went to s3.<region>.amazonaws.com): the endpoint is passed on here explicitly. The
    region is the one ``from_uri`` resolved. Credentials are not passed: the rebuilt filesystem
    (also when pickled to Ray workers) resolves them from each process's environment, so no key
    travels inside a pickled task or lands in a log.
    """
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return pafs.S3FileSystem(
        region=fs.region,
        endpoint_override=endpoint or None,
        connect_timeout=float(os.environ.get("VITDIT_S3_CONNECT_TIMEOUT_S", S3_CONNECT_TIMEOUT_S)),
        request_timeout=float(os.environ.get("VITDIT_S3_REQUEST_TIMEOUT_S", S3_REQUEST_TIMEOUT_S)),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(
            max_attempts=int(os.environ.get("VITDIT_S3_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))
        ),
    )


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI (``s3://``, ``gs://``, ``file://``...) or a local path.

    S3 gets bounded timeouts (``_s3_with_timeouts``) unless the URI carries its own options
    (``?endpoint_override=...``). A location that cannot be opened raises VitditError naming it.
    """
    import pyarrow.fs as pafs

    if not is_uri(uri):
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        if isinstance(fs, pafs.S3FileSystem) and "?" not in uri:
            fs = _s3_with_timeouts(fs)
    except (OSError, ValueError) as e:  # unknown scheme, unreachable storage, missing credentials
        raise VitditError(f"{uri}: cannot open this location ({storage_error(e)})") from e
    return fs, path


def storage_error(e: BaseException) -> str:
    """A one-line reason for a pyarrow filesystem error, with the likely fix for the usual S3 ones."""
    text = " ".join(str(e).split())
    if "AWS Error" in text and not _aws_credentials_configured():
        # Without credentials the AWS SDK sends the request unsigned: S3 answers 403, moto 500.
        return (
            f"{text} — no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or give the machine a role)"
        )
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return (
            f"{text} — access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the "
            "machine's role) and that they may read and write this bucket"
        )
    if "NETWORK_CONNECTION" in text or "Timeout was reached" in text:
        return f"{text} — the storage endpoint does not answer: check AWS_ENDPOINT_URL and the network"
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return f"{text} — the bucket does not exist"
    return text


def _aws_credentials_configured() -> bool:
    """Some source of AWS credentials is configured for this process (variables, a profile, a
    web identity, a container role, a credentials file). An instance role cannot be seen from here."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_PROFILE") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return True
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return True
    files = [env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")]
    return any(f != os.devnull and os.path.isfile(f) and os.path.getsize(f) > 0 for f in files) or (
        env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"
    )


def check_bucket(fs, path: str, uri: str) -> None:
    """Raise VitditError when the bucket of ``path`` (``bucket/key``) does not exist or cannot be
    reached. pyarrow reports a missing key in a missing bucket as plain NotFound, which would
    otherwise read as "no such file"."""
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.S3FileSystem) and type(fs).__name__ != "GcsFileSystem":
        return
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise VitditError(f"{uri}: cannot reach its bucket ({storage_error(e)})") from e
    if info.type == pafs.FileType.NotFound:
        raise VitditError(f"{uri}: bucket {bucket!r} does not exist (or these credentials cannot see it)")


def exists(path: str) -> bool:
    """A file or directory exists at ``path`` (local or URI)."""
    local = _local(path)
    if local is not None:
        return os.path.exists(local)
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    try:
        found = fs.get_file_info(p).type != pafs.FileType.NotFound
    except OSError as e:
        raise VitditError(f"{path}: cannot check whether it exists ({storage_error(e)})") from e
    if not found:
        check_bucket(fs, p, path)  # a missing bucket is an error, not "not there yet"
    return found


def write_json(path: str, payload: Any, indent: int | None = 2) -> None:
    """Write ``payload`` as JSON (sorted keys; non-JSON values as ``str``), all or nothing.

    Local: a temporary sibling renamed over ``path`` (parent directories are created). Object
    storage: one put.
    """
    text = json.dumps(payload, indent=indent, sort_keys=True, default=str)
    local = _local(path)
    if local is None:
        fs, p = filesystem(path)
        try:
            with fs.open_output_stream(p) as f:
                f.write(text.encode())
        except OSError as e:
            check_bucket(fs, p, path)
            raise VitditError(f"{path}: cannot write ({storage_error(e)})") from e
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

            fs, p = filesystem(path)
            if fs.get_file_info(p).type == pafs.FileType.NotFound:
                check_bucket(fs, p, path)
                return None
            with fs.open_input_stream(p) as f:
                text = f.read().decode("utf-8")
        value = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = storage_error(e) if isinstance(e, OSError) else e
        raise VitditError(f"{path}: unreadable JSON ({reason})") from e
    if not isinstance(value, dict):
        raise VitditError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def local_dir(path: str) -> str:
    """A local directory with the contents of ``path``: ``path`` itself when it is local, else a
    download of the remote directory (a diffusers model on ``s3://``...) into a cache shared by the
    processes of this machine.

    The cache key is the URI and its listing (names, sizes, modification times), so a directory
    rewritten in place is fetched again. The copy is made under a temporary name and renamed into
    place: concurrent actors on one node never see half a model.
    """
    local = _local(path)
    if local is not None:
        return local
    import hashlib
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        check_bucket(fs, root, path)
        raise VitditError(f"{path}: cannot list ({storage_error(e)})") from e
    files = sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)
    if not files:
        check_bucket(fs, root, path)
        raise VitditError(f"{path}: no such directory (or it is empty)")
    key = hashlib.sha256(json.dumps([path, files]).encode()).hexdigest()[:20]
    cache = os.path.join(tempfile.gettempdir(), "vitdit-remote", key)
    if os.path.isdir(cache):
        return cache
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        pafs.copy_files(root, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(tmp, cache)
        except OSError:  # another process got there first: its copy is the same
            if not os.path.isdir(cache):
                raise
    except OSError as e:
        raise VitditError(f"{path}: cannot download ({storage_error(e)})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def copy_dir(src: str, dst: str) -> None:
    """Copy a directory tree between any two of local paths and URIs (pyarrow's ``copy_files``),
    creating ``dst`` first (a local destination must exist; object stores ignore it)."""
    import pyarrow.fs as pafs

    local = _local(dst)
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    try:
        if local is not None:
            os.makedirs(local, exist_ok=True)
        else:
            dst_fs.create_dir(dst_path, recursive=True)
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except OSError as e:
        check_bucket(dst_fs, dst_path, dst)
        raise VitditError(f"copying {src} to {dst}: {storage_error(e)}") from e


__all__ = [
    "check_bucket",
    "copy_dir",
    "exists",
    "filesystem",
    "is_uri",
    "join",
    "read_json",
    "storage_error",
    "write_json",
]
