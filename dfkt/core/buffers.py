"""The one on-device ring buffer: a fixed number of rows of named tensor fields.

Used for the DFKD replay pool of synthesized inputs and teacher logits (:class:`DataPool`), CMI's memory
bank of teacher features, DeepInversion's persistent pixel pool (optimised round-robin) and AdaContrast's
key queue. Counters are host-side ints (no device sync); rows are written at ``head`` and wrap around.
"""
from __future__ import annotations

import torch

from . import distributed as dist


class RingBuffer:
    """``capacity`` rows of each field (``fields``: name -> per-row shape, ``dtypes``: name -> dtype).

    ``slots(n)`` hands out the next ``n`` row indices (wrapping), ``add(**rows)`` writes there, ``sample(n)``
    draws rows uniformly from the filled part, ``filled(name)`` is the filled part of a field. ``save_all``
    saves every row in ``state_dict`` (for buffers whose unfilled rows are state too, e.g. initial pixels).
    """

    def __init__(self, capacity: int, fields: dict[str, tuple], device: torch.device | str,
                 dtypes: dict[str, torch.dtype] | None = None, save_all: bool = False):
        if capacity < 1:
            raise ValueError(f"ring buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.save_all = int(capacity), save_all
        dtypes = dtypes or {}
        self.data = {k: torch.zeros((self.capacity, *shape), device=device, dtype=dtypes.get(k, torch.float32))
                     for k, shape in fields.items()}
        self.size = 0      # host-side counters: no device sync needed
        self.head = 0

    def __len__(self) -> int:
        return self.size

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    def slots(self, n: int) -> torch.Tensor:
        """The next ``n`` row indices (round-robin, on the device); counts them as filled."""
        idx = (torch.arange(n, device=self.device) + self.head) % self.capacity
        self.head = (self.head + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        return idx

    def add(self, **rows: torch.Tensor) -> torch.Tensor:
        """Write one batch of rows (the newest ``capacity`` of them if more); returns their indices."""
        n = next(iter(rows.values())).shape[0]
        if n >= self.capacity:
            rows, n = {k: v[-self.capacity:] for k, v in rows.items()}, self.capacity
        idx = self.slots(n)
        for k, v in rows.items():
            self.data[k][idx] = v.detach().to(self.data[k].dtype)
        return idx

    def sample_indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """This rank's part of ``n * world_size`` uniform draws from the filled rows (the same draw as one
        process would make)."""
        if self.size == 0:
            raise RuntimeError("the ring buffer is empty: add rows first")
        total = n * dist.world_size()
        return dist.shard(torch.randint(0, self.size, (total,), generator=generator)).to(self.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        idx = self.sample_indices(n, generator)
        return {k: v[idx] for k, v in self.data.items()}

    def filled(self, name: str) -> torch.Tensor:
        return self.data[name][:self.size]

    def state_dict(self) -> dict:
        n = self.capacity if self.save_all else self.size
        return {"data": {k: v[:n].detach().cpu().clone() for k, v in self.data.items()},
                "head": self.head, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        # (checkpoints written before the ring buffer had its own layout: fields next to head/size)
        data = state["data"] if "data" in state else {k: v for k, v in state.items() if k not in ("head", "size")}
        for k, v in data.items():
            self.data[k][:v.shape[0]] = v.to(self.device)
        self.size, self.head = int(state["size"]), int(state["head"])


class DataPool(RingBuffer):
    """Synthesized inputs and the teacher's logits on them (the DFKD replay pool): fields ``x`` and ``logits``.

    Synthesis is the expensive part of DFKD on small nets; re-using each synthesized batch for several
    student steps amortises it (Fast/CMI keep such a pool). It lives on the device and is saved in resume
    checkpoints; nothing is written to disk as images.
    """

    def __init__(self, capacity: int, input_shape: tuple, num_classes: int, device: torch.device | str):
        super().__init__(capacity, {"x": tuple(input_shape), "logits": (num_classes,)}, device)

    @property
    def x(self) -> torch.Tensor:
        return self.data["x"]

    @property
    def logits(self) -> torch.Tensor:
        return self.data["logits"]

    def add(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().add(x=x, logits=logits.float())

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        rows = super().sample(n, generator)
        return rows["x"], rows["logits"]

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.filled("x"), self.filled("logits")
