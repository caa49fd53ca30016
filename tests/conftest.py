"""Shared fixtures: one local Ray session, one real `mlflow server`, a tiny saved VAE, the digits.

Ray start-up costs seconds and a TorchTrainer.fit ~20 s here, so the whole suite shares one Ray
session (``ray_session``) with 4 logical CPUs (docs/facts.md: 2 training workers at 1 CPU plus a Ray
Data stream hang on 2).
"""

from __future__ import annotations

import os
import shutil

import pytest
from _vae_utils import make_tiny_vae  # noqa: F401 - also used by tests that build their own

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # the default 10 s fails on a busy machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# --precision auto caches its probe per machine; the tests probe afresh in a cache of their own (Ray
# workers and job subprocesses inherit it).
if "VITDIT_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["VITDIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="vitdit-test-cache-")
# Ray Train's controller polls its workers every 2 s by default; that interval is how late it sees
# a worker finish or die. A test's fit lasts seconds (a real one hours), and the default cost each
# fit ~4 s between its worker's last line and the fit returning (measured on the tiny task: 4.0 s
# at 2 s, 0.2 s at 0.5 s). The workers inherit this from the raylet that ray.init starts here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


from _ports import free_port  # noqa: E402,F401  (the fixtures' ports; helpers import it from _ports)


@pytest.fixture(scope="session")
def ray_session():
    """The suite's one local Ray cluster (4 logical CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=True,
        )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a SQLite backend; yields its http:// URI."""
    from _cluster_utils import start_mlflow_server, stop_process_group

    root = tmp_path_factory.mktemp("mlflow_server")
    uri, proc = start_mlflow_server(root, str(root / "artifacts"))
    yield uri
    # `mlflow server` starts uvicorn and huey consumers: stop the whole process group, not just
    # the parent, or they outlive the test session.
    stop_process_group(proc, graceful=False)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL saved with save_pretrained (the real loading path)."""
    return make_tiny_vae(tmp_path_factory.mktemp("tiny_vae") / "vae")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The bundled digits at 16 px as an ImageFolder tree with train/ and val/."""
    from vitdit.digits import export_digits

    root = tmp_path_factory.mktemp("digits") / "digits16"
    export_digits(str(root), resolution=16)
    return str(root)


@pytest.fixture
def clean_dir(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


from _cluster_utils import ray_head  # noqa: E402,F401  (session fixture: a Ray head with a job server)
