"""Fixtures of the object-storage tests: a real S3 server (moto) and a Ray head that can reach it.

``s3``: ``moto_server`` on loopback with authentication on; its endpoint and key pair are exported
to this process's environment for the session (and removed after), so every client here finds it
the standard way (docs/object-storage.md).

``s3_ray_head``: a Ray head with its job server, started *after* those variables are set. Ray
workers and job drivers take their environment from the raylet that starts them, and the raylet
has the environment of the process that started it: the suite's in-process ``ray_session`` (or
the shared ``ray_head``) may have started before the variables existed, so these tests use a head
of their own. Nothing is passed in a ``runtime_env``: that would put the key into ``ray job`` info.
"""

from __future__ import annotations

import os

import pytest
from _cluster_utils import start_mlflow_server, start_ray_head, stop_process_group, stop_ray_head
from _s3_utils import start_s3_server, stop_s3_server


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server with one empty bucket; its variables are set in os.environ for the session."""
    server, proc = start_s3_server()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_s3_server(proc)


@pytest.fixture(scope="session")
def s3_ray_head(s3):
    """A Ray head (job server, 4 logical CPUs) whose processes see the ``s3`` server's variables."""
    head, proc = start_ray_head()
    try:
        yield head
    finally:
        stop_ray_head(proc, head.temp_dir)


@pytest.fixture(scope="session")
def s3_mlflow_server(s3, tmp_path_factory):
    """``mlflow server`` whose artifact store is ``s3://<bucket>/mlartifacts`` (it finds the server
    through MLFLOW_S3_ENDPOINT_URL and the key pair in its environment); yields its http:// URI."""
    root = tmp_path_factory.mktemp("s3_mlflow")
    uri, proc = start_mlflow_server(root, f"s3://{s3.bucket}/mlartifacts")
    try:
        yield uri
    finally:
        stop_process_group(proc, graceful=False)
