"""Start-up work rank 0 does in the background: the validation prefetch, the task's warm-up, and
the MLflow logger's client (mlflow is imported in the logger's thread)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipelines.train.loop import TrainTask, _Background, _start_warm_up, _ValidationBatches
from pipelines.train.mlflow_logger import AsyncRunLogger


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
