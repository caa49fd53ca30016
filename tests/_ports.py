"""Free loopback ports for the servers the tests start.

Its own module because test helpers cannot import it from ``conftest``: tests/s3 and tests/cluster
have conftest.py files of their own, and under pytest's default import mode the last conftest
imported owns the module name ``conftest``.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
