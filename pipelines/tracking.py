"""MLflow plumbing shared by every job: one tracking URI, bounded network waits.

Only the driver or rank 0 calls into this module (docs/design.md, "MLflow").
"""

from __future__ import annotations

import os

DEFAULT_SQLITE = "mlflow.db"

# The HTTP client's defaults (7 retries, backoff 2, 120 s timeout) can block a logging call for
# minutes when the server is away (docs/facts.md). Jobs bound them unless the user set them.
BOUNDED_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else ./mlflow.db; SQLite paths made absolute.

    Ray workers run in another directory, so a relative SQLite path would silently create a second
    store there.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_SQLITE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    elif "://" not in uri:  # a bare path: treat as a SQLite file
        uri = "sqlite:///" + os.path.abspath(uri)
    return uri


def bound_http_waits() -> None:
    """Apply BOUNDED_HTTP_ENV where the user has not chosen otherwise (before mlflow talks HTTP)."""
    for k, v in BOUNDED_HTTP_ENV.items():
        os.environ.setdefault(k, v)
