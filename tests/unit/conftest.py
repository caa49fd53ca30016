"""The unit tier: tests that need no Ray cluster and no MLflow server, a few seconds each.

CI runs it first (``python -m pytest tests/unit``, under 90 s on the project's 2-core machine), so a
broken library fails in a minute rather than after the integration tests. A unit test that asks
for the shared Ray session or the MLflow server is an integration test: it belongs in ``tests/``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    pytest.fail("tests/unit is the tier without Ray: move this test to tests/")


@pytest.fixture(scope="session")
def mlflow_server():
    pytest.fail("tests/unit is the tier without an MLflow server: move this test to tests/")


@pytest.fixture(autouse=True)
def _no_ray_started():
    """Fail a unit test that starts Ray itself (ray.init, or a Ray Data execution). In a run of the
    whole suite in one process an integration test may have started Ray before: only a start during
    this test counts."""
    import sys

    def ray_up() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = ray_up()
    yield
    if not before and ray_up():
        pytest.fail("a unit test started Ray: move it to tests/ (the integration tier)")
