"""A worker's data: training micro batches over epochs (resumable at a batch), the validation
batches, and rank 0's start-up work that prefetches them in the background."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch

from pipelines.train.task import TrainTask
from vitdit.errors import VitditError


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of a data epoch: the order of an epoch is a pure function of (seed, epoch)."""
    return (seed * 1_000_003 + epoch * 31_337) % (2**32)


class EpochIterator:
    """Micro batches of the train shard over epochs; resumes at (epoch, batches consumed)."""

    def __init__(
        self, shard, micro: int, seed: int, epoch: int, skip: int, device, shuffle_buffer: int, cache: bool
    ):
        self.shard, self.micro, self.seed, self.device = shard, micro, seed, device
        self.shuffle_buffer = shuffle_buffer
        self.epoch = epoch
        self.batches_in_epoch = 0
        # Small data sets: one pass into memory, then a permutation seeded by (seed, epoch) every
        # epoch. Streaming a few batches per epoch spends most of the step waiting on Ray Data to
        # start each epoch's execution (benchmarks/RESULTS.md, "CPU: training start-up").
        # The cache is filled without a shuffle, in Ray Data's preserved block order, so the order
        # of every epoch is a pure function of (seed, epoch) and a resume is exact.
        self.cache = self._fill_cache() if cache else None
        self._it = self._open()
        self._peeked: dict[str, torch.Tensor] | None = None
        for _ in range(skip):  # the part of this epoch consumed before the checkpoint
            self.next()

    def peek(self) -> dict[str, torch.Tensor]:
        """The batch the next ``next()`` returns, without consuming it."""
        if self._peeked is None:
            self._peeked = self.next()
        return self._peeked

    def _fill_cache(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in self.shard.iter_torch_batches(batch_size=max(self.micro, 256)):
            for k, v in batch.items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items()}

    def _cached_epoch(self) -> Iterator:
        n = len(next(iter(self.cache.values()))) if self.cache else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        for start in range(0, n - self.micro + 1, self.micro):  # drop_last, as when streaming
            idx = order[start : start + self.micro]
            yield {k: v[idx].to(self.device) for k, v in self.cache.items()}

    def _open(self) -> Iterator:
        self.batches_in_epoch = 0
        if self.cache is not None:
            return self._cached_epoch()
        return iter(
            self.shard.iter_torch_batches(
                batch_size=self.micro,
                drop_last=True,
                local_shuffle_buffer_size=self.shuffle_buffer,
                local_shuffle_seed=epoch_seed(self.seed, self.epoch),
                device=self.device,
            )
        )

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro batch; a new epoch (and a new seeded order) when this one runs out."""
        if self._peeked is not None:  # already counted in batches_in_epoch when it was fetched
            batch, self._peeked = self._peeked, None
            return batch
        try:
            batch = next(self._it)
        except StopIteration:
            if self.batches_in_epoch == 0:
                raise self._too_small() from None
            self.epoch += 1  # a new epoch: a new order, seeded by (seed, epoch)
            self._it = self._open()
            try:
                batch = next(self._it)
            except StopIteration:
                raise self._too_small() from None
        self.batches_in_epoch += 1
        return batch

    def _too_small(self) -> VitditError:
        return VitditError(
            f"the training data yields no batch of {self.micro} rows per worker: use a smaller "
            "--global-batch-size or --micro-batch-size, or fewer workers"
        )


def start_warm_up(task: TrainTask, val_batches: ValidationBatches | None) -> Background:
    """``val_batches.prefetch()`` then ``task.warm_up()`` in a daemon thread."""

    def work() -> None:
        if val_batches is not None:
            val_batches.prefetch()
        task.warm_up()

    return Background(work)


class Background:
    """Runs ``fn`` in a daemon thread (a stopping worker never waits for it); ``result`` joins it and
    re-raises what it raised."""

    def __init__(self, fn: Callable[[], None]):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="vitdit-warm-up", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # handed to the training thread by result()
            self._error = e

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class ValidationBatches:
    """The validation shard's batches; kept in memory after the first pass when it is small.

    Small validation sets (at most ``cache_rows`` rows, e.g. the digits' 360 images) are read from
    Ray Data once: the ViT may validate every epoch, and starting a Ray Data execution per
    validation cost more than the validation itself (benchmarks/RESULTS.md, "CPU: training
    start-up").
    The batches are the same either way (the val data set is not shuffled).
    """

    def __init__(self, shard, micro: int, cache_rows: int):
        self.shard, self.micro, self.cache_rows = shard, micro, cache_rows
        self.cached: list[dict[str, torch.Tensor]] | None = None
        self.too_big = False

    def prefetch(self) -> None:
        """Read a small validation set into the cache now; give up (no cache) once it is too big."""
        if self.cached is not None or self.too_big:
            return
        keep: list[dict[str, torch.Tensor]] = []
        rows = 0
        for batch in self.shard.iter_torch_batches(batch_size=self.micro):
            rows += len(next(iter(batch.values()))) if batch else 0
            if rows > self.cache_rows:
                self.too_big = True  # a large one streams at each validation instead
                return
            keep.append(batch)
        self.cached = keep

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.prefetch()  # a no-op after the warm-up thread's prefetch
        if self.cached is not None:
            yield from self.cached
        else:
            yield from self.shard.iter_torch_batches(batch_size=self.micro)
