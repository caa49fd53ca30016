"""MLflow for training: the driver opens the run, rank 0 logs into it without blocking training.

Rank 0 hands metrics, images and tags to :class:`AsyncRunLogger`, whose one background thread talks
to MLflow. A tracking server that is away therefore costs the training loop nothing per step; the
HTTP waits of each call are bounded (``pipelines.tracking.bound_http_waits``), a queue that fills
up drops the oldest work, and ``close`` waits at most ``close_timeout_s``. So the delay an
unreachable server adds to a run is at most that close timeout plus the driver's bounded calls.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from pipelines.tracking import (
    bound_http_waits,
    get_or_create_experiment,
    resolve_tracking_uri,
    training_run_name,
)

log = logging.getLogger(__name__)

# The driver's MLflow calls (create run, log params, end run) use tighter HTTP bounds than the
# jobs' defaults: they happen before and after fit(), where an absent server must not add minutes.
DRIVER_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def bound_driver_http_waits() -> None:
    """Tight HTTP bounds for this process unless the user chose otherwise."""
    import os

    for k, v in DRIVER_HTTP_ENV.items():
        os.environ.setdefault(k, v)
    bound_http_waits()


class RunHandle:
    """The driver's side: experiment, run creation or reuse, params, final status.

    Every call is guarded: when the server is unreachable the run continues without tracking
    (``run_id`` None) and a warning says so.
    """

    def __init__(self, tracking_uri: str | None, experiment: str):
        bound_driver_http_waits()
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self.client = None
        self._new_run_name: str | None = None  # set when start() created the run: log_params renames it
        try:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        except Exception as e:  # a malformed URI
            log.warning("MLflow at %s unusable, training without tracking: %s", self.tracking_uri, e)

    def start(self, run_name: str, resume_run_id: str | None = None) -> str | None:
        """Create a run (or reopen ``resume_run_id``); returns its id or None when unreachable."""
        if self.client is None:
            return None
        t0 = time.monotonic()
        try:
            if resume_run_id:
                try:
                    self.client.update_run(resume_run_id, status="RUNNING")
                    self.run_id = resume_run_id
                    return self.run_id
                except Exception as e:
                    log.warning("cannot reopen MLflow run %s (%s); starting a new run", resume_run_id, e)
            exp_id = get_or_create_experiment(self.client, self.experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            self._new_run_name = run_name
        except Exception as e:
            log.warning(
                "MLflow at %s unreachable after %.1f s, training without tracking: %s",
                self.tracking_uri,
                time.monotonic() - t0,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            self.client = None
            self.run_id = None
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Params are immutable in MLflow: a resumed run logs only keys it does not have yet.

        A run that ``start`` created is renamed from the params (``dit DiT-digits/2 · 3000 steps``):
        the output directory's name alone ("dit") says little in a list of runs.
        """
        if self.client is None or self.run_id is None:
            return
        if self._new_run_name is not None:
            kind = self.experiment.removeprefix("vitdit-")
            try:
                name = training_run_name(kind, params, self._new_run_name)
                self.client.update_run(self.run_id, name=name)
            except Exception as e:
                log.warning("MLflow run rename failed: %s", e)
            self._new_run_name = None
        try:
            from mlflow.entities import Param

            have = self.client.get_run(self.run_id).data.params
            new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
            changed = {
                f"resumed_with.{k}": str(v) for k, v in params.items() if k in have and have[k] != str(v)
            }
            for i in range(0, len(new), 100):
                self.client.log_batch(self.run_id, params=new[i : i + 100])
            for k, v in changed.items():
                self.client.set_tag(self.run_id, k, v)
        except Exception as e:
            log.warning("MLflow log_params failed: %s", e)

    def last_logged_step(self, key: str = "train/loss") -> int | None:
        """The highest step already logged under ``key`` (-1 if none, None when the history cannot
        be read): a resumed run logs after it."""
        if self.client is None or self.run_id is None:
            return -1
        try:
            history = self.client.get_metric_history(self.run_id, key)
            return max((m.step for m in history), default=-1)
        except Exception as e:
            log.warning("cannot read the MLflow history of run %s: %s", self.run_id, e)
            return None

    def log_metric_rows(self, rows: list[tuple[int, dict[str, float]]]) -> bool:
        """Log (step, metrics) rows (a resumed run's backfill); True when all were sent."""
        if self.client is None or self.run_id is None:
            return False
        try:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            metrics = [Metric(k, float(v), ts, step) for step, row in rows for k, v in row.items()]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
            return True
        except Exception as e:
            log.warning("MLflow backfill failed: %s", e)
            return False

    def set_tag(self, key: str, value: str) -> None:
        if self.client is None or self.run_id is None:
            return
        try:
            self.client.set_tag(self.run_id, key, value)
        except Exception as e:
            log.warning("MLflow set_tag failed: %s", e)

    def end(self, status: str = "FINISHED") -> None:
        if self.client is None or self.run_id is None:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            log.warning("MLflow set_terminated failed: %s", e)


class AsyncRunLogger:
    """Rank 0's logger: a background thread sends metrics, images and tags to one MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str, max_queue: int = 1000, close_timeout_s: float = 15.0):
        bound_http_waits()
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.close_timeout_s = close_timeout_s
        self.failures = 0
        self._client = None
        self._client_ready = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        # The thread imports mlflow (1-3 s on a small CPU) while training starts.
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    @property
    def client(self):
        """The MlflowClient (waits for the logger thread to have imported mlflow)."""
        self._client_ready.wait()
        if self._client is None:
            raise RuntimeError(f"no MLflow client for {self.tracking_uri}")
        return self._client

    def _put(self, item: tuple) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:  # the server is away: drop the oldest, keep the newest
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._queue.put_nowait(item)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(("metrics", dict(metrics), step, int(time.time() * 1000)))

    def log_image(self, image: Any, key: str, step: int) -> None:
        self._put(("image", image, key, step))

    def set_tag(self, key: str, value: str) -> None:
        self._put(("tag", key, value))

    def log_params(self, params: dict[str, Any]) -> None:
        self._put(("params", {k: str(v)[:6000] for k, v in params.items()}))

    def _work(self) -> None:
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric, Param

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        except Exception as e:  # a broken install or URI: training goes on without tracking
            log.warning("MLflow unusable at %s, not logging: %s", self.tracking_uri, e)
            return
        finally:
            self._client_ready.set()
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if item[0] == "metrics":
                    _, metrics, step, ts = item
                    self._client.log_batch(
                        self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()]
                    )
                elif item[0] == "image":
                    _, image, key, step = item
                    self._client.log_image(self.run_id, image, key=key, step=step)
                elif item[0] == "tag":
                    self._client.set_tag(self.run_id, item[1], item[2])
                elif item[0] == "params":  # immutable in MLflow: a resumed run keeps what it has
                    have = self._client.get_run(self.run_id).data.params
                    new = [Param(k, v) for k, v in item[1].items() if k not in have]
                    if new:
                        self._client.log_batch(self.run_id, params=new)
            except Exception as e:
                self.failures += 1
                if self.failures <= 3:
                    log.warning(
                        "MLflow logging failed (%s): %s", item[0], str(e).splitlines()[0] if str(e) else e
                    )

    def close(self) -> bool:
        """Flush for at most ``close_timeout_s``; True when everything was sent."""
        if not self._thread.is_alive():  # MLflow was unusable: nothing will be sent
            return False
        try:
            self._queue.put(None, timeout=self.close_timeout_s)
        except queue.Full:
            return False
        self._thread.join(self.close_timeout_s)
        return not self._thread.is_alive()
