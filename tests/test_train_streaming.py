"""The training data path with the in-memory cache off (``--cache-rows 0``, what data sets too large
for a worker's memory take): Ray Data's equal streaming split, as Ray Train makes it for
``datasets_to_split=["train"]``, read by two workers' ``EpochIterator``s. Every row is seen exactly once
per epoch across the workers, each epoch in a new order.

Budget: ~10 s on the shared Ray session (512 digit latents, 2 epochs).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from _train_utils import write_digit_latents

from pipelines.latents import read_latents
from pipelines.train.data import EpochIterator
from vitdit import latents as L

pytestmark = pytest.mark.ray


def test_streaming_epochs_see_every_row_exactly_once_across_two_workers(ray_session, tiny_vae_dir, tmp_path):
    def row_number(batch):  # digit/00012.png -> 12 (tensors only past here); nested: pickled by value
        rows = np.array([int(i.rsplit("/", 1)[1].split(".")[0]) for i in batch[L.ID]], dtype=np.int64)
        return {"row": rows, **{k: v for k, v in batch.items() if k != L.ID}}

    n, workers, micro, epochs = 512, 2, 16, 2
    uri = write_digit_latents(str(tmp_path / "latents"), tiny_vae_dir, n=n)
    ds, _ = read_latents(uri, columns=[L.ID, L.LABEL, L.MEAN, L.STD])
    # As DiTTask.datasets() and the trainer build it: a seeded block order, order preserved in execution.
    ds = ds.randomize_block_order(seed=0).map_batches(row_number)
    ds.context.execution_options.preserve_order = True
    shards = ds.streaming_split(workers, equal=True)  # Ray Train's DataConfig splits "train" this way
    per_worker = n // workers // micro  # batches per worker per epoch (n divides: nothing dropped)
    seen = [[[] for _ in range(epochs)] for _ in range(workers)]
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            it = EpochIterator(shards[rank], micro, seed=7, epoch=0, skip=0, device=torch.device("cpu"),
                               shuffle_buffer=64, cache=False)  # fmt: skip
            assert it.cache is None  # the streaming path, not the in-memory one
            for e in range(epochs):
                for _ in range(per_worker):
                    batch = it.next()
                    assert it.epoch == e and batch[L.MEAN].shape[0] == micro
                    seen[rank][e].extend(batch["row"].tolist())
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for e in range(epochs):
        rows = [r for rank in range(workers) for r in seen[rank][e]]
        assert len(rows) == n and sorted(rows) == list(range(n)), f"epoch {e}: rows lost or seen twice"
        assert all(len(seen[rank][e]) == n // workers for rank in range(workers))
    # The seeded local shuffle gives each epoch its own order.
    assert seen[0][0] != seen[0][1]
