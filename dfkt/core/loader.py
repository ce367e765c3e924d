"""Batches on the training device.

In-memory data sets (anything with ``.tensors = (images, labels)``, e.g. ``ArrayDataset``) are moved
to the device once and sliced by a seeded permutation: no per-sample Python, no host round trips.
Other data sets (image lists, folders, torchvision) go through a DataLoader with a
DistributedSampler under torchrun. Every batch is ``(x, y, idx)``: the sample index is always there.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import DataError
from .distributed import rank, world_size


def dataset_len(dataset: Dataset) -> int:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"data set {type(dataset).__name__} has no length; dfkt needs a map-style data set "
                        f"(with __len__ and __getitem__).") from None
    if n == 0:
        name = getattr(dataset, "name", type(dataset).__name__)
        raise DataError(f"data set {name!r} is empty (0 samples); check its path/split/filter.")
    return n


def non_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices (into ``x``'s first dimension) of the samples holding NaN/inf values."""
    return (~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).nonzero().flatten()


def _refuse_non_finite(idx: list[int], n: int | None = None) -> None:
    of = f" of {n}" if n is not None else ""
    raise DataError(f"{len(idx)}{of} input sample(s) hold NaN/inf values (sample indices {idx[:10]}"
                    f"{' ...' if len(idx) > 10 else ''}); remove or repair them: they would turn BatchNorm "
                    f"statistics and the model into NaN.")


class TensorLoader:
    """Seeded shuffled batches sliced from device-resident tensors; yields (x, y, idx).

    Images with NaN/inf values are refused (one check when the loader is made)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, shuffle: bool,
                 drop_last: bool, device: torch.device, generator: torch.Generator | None = None,
                 shard: bool = True):
        self.x = images.to(device)
        if images.is_floating_point() and not bool(torch.isfinite(self.x).all()):
            _refuse_non_finite(non_finite_rows(self.x).tolist(), self.x.shape[0])
        n = self.x.shape[0]
        self.y = labels.to(device) if labels is not None else torch.full((n,), -1, dtype=torch.long, device=device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.device, self.generator = device, generator
        self.rank, self.world = (rank(), world_size()) if shard else (0, 1)

    def _order(self) -> torch.Tensor:
        n = self.x.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if self.world > 1:  # same permutation on every rank (same seed); each takes its shard
            per = n // self.world
            order = order[: per * self.world][self.rank::self.world]
        return order.to(self.device)

    def __len__(self) -> int:
        n = self.x.shape[0] // self.world
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order()
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[idx], self.y[idx], idx


class DeviceLoader:
    """A DataLoader whose (x, y, idx) batches are moved to the device (non-blocking).

    Each batch is checked for NaN/inf inputs while still on the host (no device sync); a bad sample
    is refused with its index before any model sees it."""

    def __init__(self, loader: DataLoader, device: torch.device, sampler: DistributedSampler | None):
        self.loader, self.device, self.sampler, self.epoch = loader, device, sampler, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for batch in self.loader:
            if not (isinstance(batch, (list, tuple)) and len(batch) == 3):
                raise DataError("the data set must yield (x, y, index) triples; wrap it with "
                                "dfkt.data.IndexedDataset(dataset) so that methods with memory banks "
                                "know which sample each row is.")
            x, y, idx = batch
            if torch.is_tensor(x) and x.is_floating_point() and x.device.type == "cpu" \
                    and not bool(torch.isfinite(x).all()):
                rows = non_finite_rows(x).tolist()
                _refuse_non_finite([int(torch.as_tensor(idx)[r]) for r in rows])
            nb = self.device.type == "cuda"
            yield (x.to(self.device, non_blocking=nb), torch.as_tensor(y).to(self.device, non_blocking=nb),
                   torch.as_tensor(idx).to(self.device, non_blocking=nb))


def make_loader(dataset: Dataset, batch_size: int, device: torch.device, shuffle: bool = True,
                drop_last: bool = False, generator: torch.Generator | None = None, num_workers: int = 0,
                shard: bool = True):
    """The right loader for ``dataset`` on ``device`` (see module docstring)."""
    n = dataset_len(dataset)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    per_rank = n // (world_size() if shard else 1)
    if drop_last and batch_size > per_rank:
        raise DataError(f"batch_size {batch_size} is larger than the data set ({per_rank} samples per process) "
                        f"with drop_last=True, so no batch would ever be produced; use batch_size <= {per_rank}.")
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) == 2 and all(torch.is_tensor(t) for t in tensors):
        images, labels = tensors
        return TensorLoader(images, labels, batch_size, shuffle, drop_last, device, generator, shard)
    sampler = None
    if shard and world_size() > 1:
        sampler = DistributedSampler(dataset, shuffle=shuffle, drop_last=drop_last,
                                     seed=int(torch.randint(2**31, (1,), generator=generator)) if generator else 0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                        drop_last=drop_last, num_workers=num_workers, generator=generator,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    return DeviceLoader(loader, device, sampler)
