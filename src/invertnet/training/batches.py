r"""Batches of training data for :func:`~invertnet.training.fit` and the :class:`~invertnet.training.Trainer`.

Training data are one of

- a tensor (N, ...) or a tuple of tensors with N rows each, e.g. ``(images, labels)``;
- a map-style :class:`torch.utils.data.Dataset` of N samples, collated with
  :func:`torch.utils.data.default_collate`;
- a :class:`torch.utils.data.DataLoader`, whose batches are taken as it yields them (its own batch size,
  sampler and workers; ``TrainConfig.batch_size`` does not apply).

For tensors and Datasets the batch of step t is a function of (seed, t): epoch e = t // (N // B) visits the
samples in the order ``randperm(N)`` drawn from a generator seeded with ``seed + e``, B at a time (the last
N mod B samples of an epoch are left out), so a resumed run sees exactly the batches of an uninterrupted one.
A DataLoader is iterated in order and restarted when exhausted; to reach step t out of order (a resumed run)
a fresh pass skips the first t mod len(loader) batches, which gives the uninterrupted run's batches only when
every pass of the loader yields the same batches (e.g. ``shuffle=False``).

Batches keep the structure of the data: a tensor, or a tuple of tensors (a DataLoader's lists become tuples);
a one-element tuple, as ``TensorDataset(x)`` yields, is unwrapped to its tensor.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

__all__ = ["Batch", "BatchSource", "TrainData", "batch_source", "shard"]

Batch = Tensor | tuple[Tensor, ...]
TrainData = Tensor | tuple[Tensor, ...] | Dataset | DataLoader


class BatchSource(Protocol):
    """The batch of every step: ``source.batch(step)``."""

    def batch(self, step: int) -> Any: ...


def _unwrap(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)):
        return batch[0] if len(batch) == 1 else tuple(batch)
    return batch


def shard(batch: Any, rank: int, world_size: int) -> Any:
    """Rows ``rank::world_size`` of every tensor of a batch (a rank's part under DistributedDataParallel)."""
    if world_size == 1:
        return batch
    if isinstance(batch, tuple):
        return tuple(part[rank::world_size] for part in batch)
    return batch[rank::world_size]


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, tuple):
        return tuple(_to_device(part, device) for part in batch)
    return batch.to(device) if isinstance(batch, Tensor) else batch


class _Indexed:
    """Batches of B samples drawn without replacement from N, in an order fixed by (seed, epoch)."""

    def __init__(self, n: int, take: Any, batch_size: int, seed: int, device: torch.device | None) -> None:
        self.n, self.take, self.batch_size, self.seed, self.device = n, take, batch_size, seed, device
        self._order: tuple[int, Tensor] | None = None

    def batch(self, step: int) -> Any:
        epoch, position = divmod(step, self.n // self.batch_size)
        if self._order is None or self._order[0] != epoch:  # one permutation per epoch, not per step
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(self.n, generator=generator))
        index = self._order[1][position * self.batch_size : (position + 1) * self.batch_size]
        return _to_device(_unwrap(self.take(index)), self.device)


class _Loader:
    """A DataLoader's batches in the order it yields them, restarted when exhausted."""

    def __init__(self, loader: DataLoader, device: torch.device | None) -> None:
        self.loader, self.device = loader, device
        self._iterator: Any = None
        self._next = 0  # the step whose batch the iterator yields next
        self._last: tuple[int, Any] | None = None

    def _advance(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                raise ValueError("training data: the DataLoader yields no batches") from None

    def batch(self, step: int) -> Any:
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if self._iterator is None or step != self._next:
            self._iterator = iter(self.loader)
            skip = step if isinstance(self.loader.dataset, IterableDataset) else step % len(self.loader)
            for _ in range(skip):
                self._advance()
        batch = _to_device(_unwrap(self._advance()), self.device)
        self._next, self._last = step + 1, (step, batch)
        return batch


def _rows(data: tuple[Any, ...]) -> int:
    if not data or not all(isinstance(part, Tensor) for part in data):
        types = ", ".join(type(part).__name__ for part in data)
        raise TypeError(f"training data: a tuple must hold tensors with the same rows, got ({types})")
    rows = {len(part) if part.dim() else 0 for part in data}
    if len(rows) > 1:
        raise ValueError(f"training data: the tensors of the tuple have different rows {[len(p) for p in data]}")
    return rows.pop()


def _take_rows(data: tuple[Tensor, ...], index: Tensor) -> tuple[Tensor, ...]:
    return tuple(part[index] for part in data)


def _collate(dataset: Dataset, index: Tensor) -> Any:
    return default_collate([dataset[i] for i in index.tolist()])


def batch_source(
    data: TrainData, batch_size: int, seed: int, device: torch.device | None = None, world_size: int = 1
) -> BatchSource:
    """The batches of ``data`` (see the module docstring), moved to ``device`` when given.

    Arguments:
        data: A tensor (N, ...), a tuple of tensors with N rows, a map-style Dataset or a DataLoader.
        batch_size: B, the samples per batch (ignored for a DataLoader).
        seed: Seed of the batch order (ignored for a DataLoader).
        device: Where batches go, e.g. the model's device; ``None`` leaves them where they are.
        world_size: Number of processes sharing every batch; B must be divisible by it.

    Raises:
        TypeError: ``data`` is of another type (a list, a numpy array, an IterableDataset without a loader).
        ValueError: ``data`` is empty, has fewer than B samples, or B is not divisible by ``world_size``.
    """
    if isinstance(data, DataLoader):
        loader_batch = data.batch_size
        if not isinstance(data.dataset, IterableDataset) and len(data) == 0:
            raise ValueError("training data: the DataLoader yields no batches (its dataset is empty)")
        if loader_batch is not None and loader_batch % world_size:
            raise ValueError(
                f"training data: the DataLoader's batch_size={loader_batch} is not divisible by {world_size} processes"
            )
        return _Loader(data, device)
    if isinstance(data, Tensor):
        n, take = (len(data) if data.dim() else 0), data.__getitem__
    elif isinstance(data, tuple):
        n, take = _rows(data), functools.partial(_take_rows, data)
    elif isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        n, take = len(data), functools.partial(_collate, data)  # type: ignore[arg-type]
    else:
        raise TypeError(
            f"training data: expected a tensor, a tuple of tensors, a Dataset with __len__ or a DataLoader, got "
            f"{type(data).__name__} (wrap arrays with torch.as_tensor, iterable datasets in a DataLoader)"
        )
    if n == 0:
        raise ValueError("training data: no samples (the data set is empty)")
    if n < batch_size:
        raise ValueError(f"training data: {n} samples, fewer than batch_size={batch_size}; lower batch_size")
    if batch_size % world_size:
        raise ValueError(f"training data: batch_size={batch_size} is not divisible by {world_size} processes")
    return _Indexed(n, take, batch_size, seed, device)
