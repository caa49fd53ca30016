"""Fixtures of the cluster tests: one two-node Ray cluster on loopback for the session (tests/_two_nodes.py).

``two_nodes`` hands each test the cluster with exactly one live worker node beside the head: a test
that killed the worker node, or started a replacement, leaves the next one a fresh worker.
"""

from __future__ import annotations

import pytest
from _two_nodes import TwoNodes, start_two_nodes


@pytest.fixture(scope="session")
def _two_node_cluster():
    cluster = start_two_nodes()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def two_nodes(_two_node_cluster: TwoNodes) -> TwoNodes:
    cluster = _two_node_cluster
    live = [p for p in cluster.workers if p.poll() is None]
    for extra in live[1:]:  # replacements a test started
        cluster.kill_worker(extra)
    if not live:
        cluster.start_worker()
    cluster.workers = [p for p in cluster.workers if p.poll() is None]
    return cluster
