"""Rank 0's metrics: each logged step goes to ``train_log.jsonl`` and to MLflow exactly once.

The two sinks can disagree after a kill: the log file is written synchronously, while MLflow gets
metrics from a background thread (``AsyncRunLogger``) whose queue dies with the worker. So a run
that continues from a checkpoint at step ``c`` first sends MLflow the rows of the log file it missed
up to ``c`` ("backfill"), then logs to each sink only the steps after what that sink already has.
Steps after ``c`` are re-done by the continued run, so they are never backfilled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LastLogged:
    """The last step each sink already had when this fit started (-1: none)."""

    mlflow: int = -1
    file: int = -1


def log_file_rows(path: str | None) -> Iterator[dict[str, Any]]:
    """The rows of train_log.jsonl (none when there is no file), skipping a line cut by SIGKILL."""
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def logged_rows(path: str | None, after: int, upto: int) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) rows of train_log.jsonl with ``after < step <= upto``, in file order.

    A worker killed mid-run loses the metrics its MLflow thread had not sent yet; its log file,
    written synchronously, still has them. A run continued from a checkpoint at ``upto`` never
    re-does those steps, so they are sent to MLflow from here ("backfill").
    """
    rows = []
    for row in log_file_rows(path) if upto > after else ():
        step = int(row.pop("step", -1))
        if after < step <= upto:
            rows.append((step, {k: v for k, v in row.items() if isinstance(v, int | float)}))
    return rows


def last_step_in_log(path: str | None) -> int:
    """The highest train-metrics step in train_log.jsonl, -1 when none."""
    return max((int(row["step"]) for row in log_file_rows(path) if "train/loss" in row), default=-1)


class BackfillTarget(Protocol):
    """The driver's side of an MLflow run (``mlflow_logger.RunHandle``) as the backfill uses it."""

    def last_logged_step(self) -> int | None: ...

    def log_metric_rows(self, rows: list[tuple[int, dict[str, float]]]) -> bool: ...


def backfill_on_resume(
    handle: BackfillTarget, log_path: str | None, *, resumed: bool, reopened: bool, checkpoint_step: int
) -> LastLogged:
    """Driver, before a resumed fit: send MLflow the logged steps up to the checkpoint it missed, and
    return what each sink then has.

    ``log_path`` is None when the run directory is a URI (no local log file); ``reopened`` says the
    MLflow run is the resumed run's own. When MLflow's history cannot be read, MLflow is taken to
    have what the file has: a step missing there is better than a step logged twice.
    """
    in_file = last_step_in_log(log_path) if resumed else -1
    in_mlflow = handle.last_logged_step() if reopened else -1
    if reopened and in_mlflow is not None and log_path is not None:
        rows = logged_rows(log_path, in_mlflow, checkpoint_step)
        if rows and handle.log_metric_rows(rows):
            log.info("sent %d logged steps to MLflow that the stopped run had not", len(rows))
            in_mlflow = max(in_mlflow, checkpoint_step)
    return LastLogged(mlflow=in_file if in_mlflow is None else in_mlflow, file=in_file)


class MetricSink:
    """Rank 0's metric writer (on other ranks both sinks are absent and every call is a no-op).

    ``logger`` is an ``AsyncRunLogger`` or None; ``log_path`` the local train_log.jsonl or None.
    A step goes to a sink only when it is after what that sink had at start: the thresholds do not
    move as steps are written, because the validation metrics of a step follow its train metrics.
    """

    def __init__(self, logger: Any, log_path: str | None, already: LastLogged):
        self.logger, self.log_path = logger, log_path
        self.mlflow_upto, self.file_upto = already.mlflow, already.file

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics of ``step`` to each sink that does not have the step yet."""
        if self.logger is not None and step > self.mlflow_upto:
            self.logger.log_metrics(metrics, step)
        if self.log_path and step > self.file_upto:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_image(self, image: Any, key: str, step: int) -> None:
        """An image of ``step`` to MLflow unless MLflow has the step already."""
        if self.logger is not None and step > self.mlflow_upto:
            self.logger.log_image(image, key=key, step=step)

    def set_tag(self, key: str, value: str) -> None:
        if self.logger is not None:
            self.logger.set_tag(key, value)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

    def catch_up_after_restart(self, run_id: str | None, start_step: int) -> None:
        """A restart within this fit: the steps after the checkpoint at ``start_step`` were logged
        before the failure and are about to be re-done; the steps up to it that MLflow lost with the
        killed worker's queue are sent from the log file. Each sink then gets each step once."""
        self.file_upto = max(self.file_upto, last_step_in_log(self.log_path))
        if self.logger is None:
            return
        try:
            history = self.logger.client.get_metric_history(run_id, "train/loss")
            self.mlflow_upto = max([self.mlflow_upto, *(m.step for m in history)])
            for step, row in logged_rows(self.log_path, self.mlflow_upto, start_step):
                self.logger.log_metrics(row, step)
            self.mlflow_upto = max(self.mlflow_upto, start_step if self.log_path else -1)
        except Exception as e:
            self.mlflow_upto = max(self.mlflow_upto, self.file_upto)  # never twice
            log.warning(
                "cannot read the MLflow history (%s): steps up to %d may be missing there",
                e,
                self.mlflow_upto,
            )


class Throughput:
    """The training throughput of the steps since the last logged step (a "window")."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Open a new window now."""
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0

    def add_step(self, data_wait: float) -> None:
        """One optimizer step done, ``data_wait`` seconds of it spent waiting for batches."""
        self.steps += 1
        self.data_wait += data_wait

    def exclude(self, seconds: float) -> None:
        """Time that is not training (validation, the sample grid) leaves the window."""
        self.start += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def train_metrics(
    *,
    loss: float,
    lr: float,
    grad_norm: float,
    extras: dict[str, float],
    steps: int,
    elapsed: float,
    data_wait: float,
    global_batch_size: int,
    flops_per_sample: float,
    world: int,
    peak_flops: float,
    epoch: int,
) -> dict[str, float]:
    """The ``train/...`` metrics of a logged step from its window of ``steps`` steps in ``elapsed`` s."""
    img_per_s = steps * global_batch_size / elapsed
    return {
        "train/loss": loss,
        "train/lr": lr,
        "train/grad_norm": grad_norm,
        "train/img_per_s": img_per_s,
        # img_per_s counts all workers; the peak is one device's, so divide by the world.
        "train/mfu": flops_per_sample * img_per_s / world / peak_flops if peak_flops else 0.0,
        "train/data_wait_frac": data_wait / elapsed,
        "train/epoch": epoch,
        **{f"train/{k}": v for k, v in extras.items()},
    }
