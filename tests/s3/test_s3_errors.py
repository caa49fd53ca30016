"""Bad object-storage input gets one readable line, in bounded time, against a real S3 server.

No Ray: the listing and the small reads and writes happen in the driver, which is where a missing
bucket, bad credentials or a dead endpoint must be reported. Budget: ~10 s (the moto server starts
in ~1 s; the dead-endpoint cases are bounded by the timeouts they set).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from pipelines import storage
from pipelines.images import read_image_source
from vitdit.errors import VitditError


def test_a_bucket_that_does_not_exist_is_named(s3):
    with pytest.raises(
        VitditError, match=r"s3://no-such-bucket/images: bucket 'no-such-bucket' does not exist"
    ):
        read_image_source("s3://no-such-bucket/images")
    with pytest.raises(VitditError, match=r"bucket 'no-such-bucket' does not exist"):
        storage.write_json("s3://no-such-bucket/run/summary.json", {"a": 1})
    with pytest.raises(VitditError, match=r"bucket 'no-such-bucket' does not exist"):
        storage.exists("s3://no-such-bucket/run/checkpoint_00000003/model.safetensors")


def test_a_path_with_no_images_says_so(s3):
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="errors/notes/readme.txt", Body=b"not an image")
    with pytest.raises(VitditError, match=rf"s3://{s3.bucket}/errors/notes: no images found"):
        read_image_source(f"s3://{s3.bucket}/errors/notes")
    with pytest.raises(VitditError, match=rf"s3://{s3.bucket}/errors/empty: no such file or directory"):
        read_image_source(f"s3://{s3.bucket}/errors/empty")


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789"}, "wrong secret"),
        ({"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7NOTAUSER"}, "unknown key"),
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "no credentials"),
    ],
)
def test_wrong_or_missing_credentials_are_access_denied_without_the_key(s3, monkeypatch, env, reason):
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="errors/creds/0/a.png", Body=b"x")
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k)
        else:
            monkeypatch.setenv(k, v)
    with pytest.raises(VitditError) as e:
        read_image_source(f"s3://{s3.bucket}/errors/creds")
    msg = str(e.value)
    expected = (
        "no AWS credentials found" if reason == "no credentials" else "access denied: check AWS_ACCESS_KEY_ID"
    )
    assert "\n" not in msg and expected in msg, (reason, msg)
    assert s3.secret_key not in msg and "wrong-secret" not in msg


@contextlib.contextmanager
def _silent_endpoint():
    """A TCP port that accepts connections and never answers (a hung proxy, a stuck server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(srv.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        srv.close()


def test_an_endpoint_that_does_not_answer_fails_in_bounded_time(s3, monkeypatch):
    monkeypatch.setenv("VITDIT_S3_REQUEST_TIMEOUT_S", "1")
    monkeypatch.setenv("VITDIT_S3_MAX_ATTEMPTS", "2")
    with _silent_endpoint() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        t0 = time.monotonic()
        with pytest.raises(VitditError, match=r"s3://b/images.*the storage endpoint does not answer"):
            read_image_source("s3://b/images")
        took = time.monotonic() - t0
    # 2 attempts × 1 s plus the retry back-off; pyarrow's defaults took 100 s here.
    assert took < 10, took


def test_a_refused_endpoint_fails_in_bounded_time(s3, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(VitditError, match=r"the storage endpoint does not answer"):
        storage.read_json("s3://b/run/summary.json")
    assert time.monotonic() - t0 < 15  # the default 3 attempts with back-off
