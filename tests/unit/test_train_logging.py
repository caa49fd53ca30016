"""Rank 0's logging and start-up work: the validation prefetch and the task's warm-up in a background
thread, the MLflow logger (mlflow imported in its thread), and the backfill of steps a killed run
logged to its file but never sent to MLflow."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from pipelines.train.loop import TrainTask, _Background, _logged_rows, _start_warm_up, _ValidationBatches
from pipelines.train.mlflow_logger import AsyncRunLogger, RunHandle


class _Shard:
    """Stands in for a Ray DataIterator: counts the passes made over ``rows`` rows."""

    def __init__(self, rows: int):
        self.rows, self.passes = rows, 0
        self.threads: set[str] = set()

    def iter_torch_batches(self, batch_size: int):
        self.passes += 1
        self.threads.add(threading.current_thread().name)
        for start in range(0, self.rows, batch_size):
            yield {"x": torch.arange(start, min(start + batch_size, self.rows))}


def _rows(batches) -> list[int]:
    return [int(v) for b in batches for v in b["x"]]


def test_prefetch_caches_a_small_validation_set_in_the_background():
    shard = _Shard(20)
    val = _ValidationBatches(shard, micro=8, cache_rows=100)
    task = TrainTask()
    warmed = []
    task.warm_up = lambda: warmed.append(threading.current_thread().name)
    _start_warm_up(task, val).result()
    assert shard.threads == {"vitdit-warm-up"} and warmed == ["vitdit-warm-up"]
    assert _rows(val) == list(range(20)) and _rows(val) == list(range(20))
    assert shard.passes == 1  # every validation after the prefetch reads the cache


def test_prefetch_gives_up_on_a_large_validation_set_which_then_streams():
    shard = _Shard(50)
    val = _ValidationBatches(shard, micro=8, cache_rows=16)
    val.prefetch()
    assert val.cached is None and val.too_big
    assert _rows(val) == list(range(50)) and _rows(val) == list(range(50))
    assert shard.passes == 3  # the abandoned prefetch, then one read per validation


def test_background_errors_reach_the_caller():
    def boom():
        time.sleep(0.05)
        raise OSError("val shard unreadable")

    job = _Background(boom)
    with pytest.raises(OSError, match="val shard unreadable"):
        job.result()


def test_async_logger_imports_mlflow_in_its_thread_and_logs(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("warm")).info.run_id
    logger = AsyncRunLogger(uri, run_id)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    logger.set_tag("checkpoint.latest", "/x")
    assert logger.client.get_run(run_id).info.run_id == run_id  # waits for the thread's client
    assert logger.close() is True
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [0.5]
    assert client.get_run(run_id).data.tags["checkpoint.latest"] == "/x"


def test_async_logger_with_an_unusable_uri_costs_nothing_at_close():
    logger = AsyncRunLogger("notascheme://nowhere", "0" * 32, close_timeout_s=30)
    for step in range(5):
        logger.log_metrics({"train/loss": 1.0}, step=step)
    with pytest.raises(RuntimeError, match="no MLflow client"):
        logger.client  # noqa: B018
    t0 = time.monotonic()
    assert logger.close() is False
    assert time.monotonic() - t0 < 1.0


def test_backfill_sends_the_logged_steps_mlflow_missed(tmp_path):
    """A run killed after step 6 (checkpoint at 4) whose MLflow thread had sent steps 1-2 only: the
    continued run sends 3-4 from its log file and re-does 5-6 itself; MLflow ends with each once."""
    log_path = tmp_path / "train_log.jsonl"
    with open(log_path, "w") as f:
        for step in range(1, 7):
            f.write(json.dumps({"step": step, "train/loss": 1.0 / step, "train/epoch": 0}) + "\n")
        f.write(json.dumps({"step": 4, "val/loss": 0.9}) + "\n")
        f.write('{"step": 7, "train/lo')  # a line cut by the SIGKILL
    handle = RunHandle(f"sqlite:///{tmp_path / 'mlflow.db'}", "backfill")
    run_id = handle.start("run")
    assert handle.log_metric_rows([(1, {"train/loss": 1.0}), (2, {"train/loss": 0.5})])
    assert handle.last_logged_step() == 2

    rows = _logged_rows(str(log_path), after=handle.last_logged_step(), upto=4)
    assert [step for step, _ in rows] == [3, 4, 4]
    assert rows[-1] == (4, {"val/loss": 0.9})
    assert handle.log_metric_rows(rows)
    history = handle.client.get_metric_history(run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25})
    assert [m.step for m in handle.client.get_metric_history(run_id, "val/loss")] == [4]
    assert _logged_rows(str(log_path), after=4, upto=4) == []
