"""Device choice and seeding."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> $DFKT_DEVICE if set (e.g. the test suite's DFKT_TEST_DEVICE), else cuda (this rank's GPU
    under torchrun) if available, else mps, else cpu.

    Asking for CUDA on a machine without it falls back to the CPU with a warning naming the fallback.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").lower()
    if spec == "auto" and os.environ.get("DFKT_DEVICE", "auto").strip().lower() not in ("", "auto"):
        spec = os.environ["DFKT_DEVICE"].strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _local_gpu())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            log.warning("device %r requested but CUDA is not available on this machine: "
                        "falling back to 'cpu' (set device: cpu to silence this).", spec)
            return torch.device("cpu")
        if spec == "cuda" and "LOCAL_RANK" in os.environ:
            return torch.device("cuda", _local_gpu())
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None


def _local_gpu() -> int:
    """This rank's GPU under torchrun (LOCAL_RANK), 0 otherwise; one GPU per process, so more processes per
    node than GPUs is an error rather than two ranks silently sharing a card (NCCL refuses that later)."""
    rank, n = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if rank >= n:
        raise ConfigError(f"torchrun started local rank {rank} but this machine has {n} GPU(s): use "
                          f"--nproc_per_node={n} (one process per GPU), or device: cpu for CPU processes (gloo).")
    return rank


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU torch.Generator for the run's own draws."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (cpu when it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
