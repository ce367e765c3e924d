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


def choose_memory_format(model: torch.nn.Module, device: torch.device,
                         choice: str = "auto") -> torch.memory_format | None:
    """The layout a run gives ``model``'s 4-d weights (``train.memory_format``), or None to leave it as is.

    ``auto``: ``channels_last`` for a model with 2-d convolutions on the CPU, else None. oneDNN runs
    convolutions and max-pooling in channels-last (NHWC) without reordering, while the contiguous (NCHW)
    CPU max-pool is a slow path: measured on one CPU thread (torch 2.14, batch 64), a SHOT LeNet training
    step 44 -> 27 ms and its no-grad pass 2x faster, max_pool2d on 64x20x24x24 6.8 -> 0.8 ms; ResNet-18
    and WRN-16-2 (CIFAR) steps 10-15 % faster. On GPUs channels-last pays off only with tensor-core
    dtypes, so ``auto`` leaves CUDA/MPS models as they are; ``channels_last`` / ``contiguous`` force a layout.
    The weights' values are unchanged; results agree with the other layout up to float rounding (the
    kernels sum in another order)."""
    if choice == "channels_last":
        return torch.channels_last
    if choice == "contiguous":
        return torch.contiguous_format
    if choice != "auto":
        raise ConfigError(f"unknown train.memory_format {choice!r}; use 'auto', 'channels_last' or 'contiguous'.")
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return torch.channels_last if device.type == "cpu" and has_conv else None


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA kernels run asynchronously), so that a wall-clock
    reading covers it; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
