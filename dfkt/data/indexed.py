"""Wrapper that makes any data set yield ``(x, y, idx)``."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wraps a data set yielding ``(x, y, ...)`` or ``x``; yields ``(x, y or -1, idx)``.

    The index lets memory-bank methods (NRC, AaD) address per-sample state. Other attributes
    (``targets``, ``classes``, ...) are forwarded to the wrapped data set.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        item = self.dataset[idx]
        if isinstance(item, (tuple, list)):
            return (item[0], item[1] if len(item) > 1 else -1, idx)
        return item, -1, idx

    def __getattr__(self, name: str) -> Any:
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"IndexedDataset({self.dataset!r})"


class Subset(Dataset):
    """Rows ``indices`` of a data set yielding ``(x, y, idx)``, re-indexed ``0..len-1``; attributes
    (``classes``, ``num_classes``, ``eval_view``...) are those of the whole set (``eval_view`` subset alike)."""

    def __init__(self, dataset: Any, indices) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        view = getattr(dataset, "eval_view", None)
        if view is not None:
            self.eval_view = Subset(view, self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int):
        item = self.dataset[self.indices[idx]]
        return item[0], item[1], idx

    @property
    def samples(self):
        return [self.dataset.samples[i] for i in self.indices]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
