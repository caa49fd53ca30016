"""A real S3-compatible server on loopback for the object-storage tests: ``moto_server``.

The server runs with moto's IAM authentication on (``/moto-api/reset-auth``), so a request signed
with a wrong or unknown key is refused with 403 as real S3 refuses it: an IAM user with an
``s3:*`` policy is created first (while the server still lets anything through), then
authentication is switched on. Its access key and (random) secret are the credentials the tests
export.

Clients find the server the standard way, through the environment (docs/object-storage.md lists
which variables each client reads): ``AWS_ENDPOINT_URL`` (boto3 >= 1.28 and pyarrow's S3
filesystem), ``MLFLOW_S3_ENDPOINT_URL`` (MLflow's S3 artifact repository), the key pair and
``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

# tests/conftest.py's free_port, via _cluster_utils: a plain `conftest` import here may find tests/s3/conftest.py.
from _cluster_utils import free_port, stop_process_group

START_TIMEOUT_S = 60


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str  # created, empty at start
    access_key: str
    secret_key: str
    region: str
    log_path: str

    def env(self) -> dict[str, str]:
        """The variables that point every client (boto3, pyarrow, MLflow) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            # Never read ~/.aws of whoever runs the tests.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **overrides):
        """A boto3 S3 client for this server (for setting up and checking buckets in tests)."""
        import boto3

        kw = dict(
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )
        kw.update(overrides)
        return boto3.client("s3", **kw)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _post(url: str, body: bytes) -> None:
    # A form content type (urllib's default) would make Flask parse the body away.
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def start_s3_server(bucket: str = "vitdit-test") -> tuple[S3Server, subprocess.Popen]:
    """``moto_server`` on a free loopback port in its own process group, with one bucket and an
    IAM user whose key pair the returned S3Server carries; authentication is on when it returns."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tempfile.mkdtemp(prefix="vitdit-moto-"), "moto.log")
    moto_server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [moto_server, "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
    deadline = time.time() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited {proc.returncode}: {open(log_path).read()[-2000:]}")
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                break
        except OSError:
            if time.time() > deadline:
                stop_s3_server(proc)
                raise RuntimeError(f"moto_server did not answer in {START_TIMEOUT_S} s") from None
            time.sleep(0.2)
    region = "us-east-1"
    # While authentication is still off any key works: make the user, its key and the bucket.
    boot = dict(
        endpoint_url=endpoint, region_name=region, aws_access_key_id="boot", aws_secret_access_key="boot"
    )
    try:
        iam = boto3.client("iam", **boot)
        iam.create_user(UserName="vitdit")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="vitdit", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="vitdit")["AccessKey"]
        boto3.client("s3", **boot).create_bucket(Bucket=bucket)
        _post(endpoint + "/moto-api/reset-auth", b"0")  # from now on every request is authenticated
    except BaseException:
        stop_s3_server(proc)  # a failed set-up must not leave the server behind
        raise
    server = S3Server(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"], region, log_path)
    return server, proc


def stop_s3_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    stop_process_group(proc)


def upload_digits_subset(digits_root: str, uri: str, tmp_path, per_class=(16, 4)) -> None:
    """The first ``per_class`` train/val images of every digit, uploaded as an ImageFolder tree."""
    sub = tmp_path / "digits_subset"
    for split, n in zip(("train", "val"), per_class):
        for c in sorted(os.listdir(os.path.join(digits_root, split))):
            os.makedirs(sub / split / c)
            for f in sorted(os.listdir(os.path.join(digits_root, split, c)))[:n]:
                shutil.copy(os.path.join(digits_root, split, c, f), sub / split / c / f)
    from pipelines import storage

    storage.copy_dir(str(sub), uri)
