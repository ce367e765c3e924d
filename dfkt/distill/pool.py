"""An on-device ring buffer of synthesized inputs and the teacher's logits on them.

Synthesis (a generator step, or pixel optimisation) is the expensive part of DFKD on small nets;
re-using each synthesized batch for several student steps amortises it (Fast/CMI keep such a pool).
The pool lives on the device and is saved in resume checkpoints (``Method.track``); nothing is
written to disk as images.
"""
from __future__ import annotations

import torch

from ..core import distributed as dist


class DataPool:
    """Fixed-capacity ring buffer of (x, teacher logits); ``sample`` draws uniformly from what is filled."""

    def __init__(self, capacity: int, input_shape: tuple, num_classes: int, device: torch.device):
        if capacity < 1:
            raise ValueError(f"pool capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.x = torch.zeros((self.capacity, *input_shape), device=device)
        self.logits = torch.zeros((self.capacity, num_classes), device=device)
        self.size = 0      # host-side counters: no device sync needed
        self.head = 0

    def __len__(self) -> int:
        return self.size

    def add(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        x, logits = x.detach(), logits.detach().float()
        n = x.shape[0]
        if n >= self.capacity:
            x, logits, n = x[-self.capacity:], logits[-self.capacity:], self.capacity
        idx = (torch.arange(n, device=self.x.device) + self.head) % self.capacity
        self.x[idx] = x.to(self.x.dtype)
        self.logits[idx] = logits
        self.head = (self.head + n) % self.capacity
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size == 0:
            raise RuntimeError("the data pool is empty: add a synthesized batch first")
        idx = dist.shard(torch.randint(0, self.size, (n * dist.world_size(),), generator=generator)).to(self.x.device)
        return self.x[idx], self.logits[idx]

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:self.size], self.logits[:self.size]

    def state_dict(self) -> dict:
        return {"x": self.x[:self.size].detach().cpu().clone(), "logits": self.logits[:self.size].detach().cpu().clone(),
                "head": self.head, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        n = int(state["size"])
        self.x[:n] = state["x"].to(self.x.device)
        self.logits[:n] = state["logits"].to(self.logits.device)
        self.size, self.head = n, int(state["head"])
