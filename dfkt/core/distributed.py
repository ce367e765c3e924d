"""torch.distributed helpers: rank, world size, all-gather of batch statistics, DDP wrapping.

Everything is a no-op in a single process, so methods call these unconditionally.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_dist()
    backend = "nccl" if (device is not None and device.type == "cuda") else "gloo"
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from all ranks along dim 0, keeping gradients for the local part."""
    if not is_dist():
        return t
    import torch.distributed.nn.functional as dnnf

    return torch.cat(dnnf.all_gather(t.contiguous()), 0)


def all_reduce_sum(t: torch.Tensor, differentiable: bool = True) -> torch.Tensor:
    if not is_dist():
        return t
    if differentiable and t.requires_grad:
        import torch.distributed.nn.functional as dnnf

        return dnnf.all_reduce(t)
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world_size()


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(t, src)
    return t


def shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous 1/world part (dim 0) of a tensor drawn identically on every rank.

    Drawing the *global* batch (noise, labels) with the shared seed and keeping a shard makes a
    run on N processes see the same global batch as one process.
    """
    if not is_dist():
        return t
    n, w, r = t.shape[0], world_size(), rank()
    per = -(-n // w)
    return t[r * per:(r + 1) * per]


class _GlobalBatchNorm:
    """BatchNorm over the global batch under torchrun, on any device and backend (gloo included).

    ``nn.SyncBatchNorm`` runs only on GPUs; this mixin all-reduces per-channel sums (differentiably),
    so a data-parallel run normalises like one process with the same global batch, and every rank
    keeps the same running statistics. Outside a process group, or in eval mode, it is the plain
    BatchNorm it extends (``isinstance(m, nn.BatchNorm2d)`` stays true).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or not self.track_running_stats
        if not (is_dist() and use_batch):     # one process, or eval with the running statistics
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        local_n = x.new_full((1,), float(x.numel() // max(c, 1)))
        stats = all_reduce_sum(torch.cat([x.sum(dims), (x * x).sum(dims), local_n]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d normalising over the global batch under torchrun."""


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d normalising over the global batch under torchrun."""


class GlobalBatchNorm3d(_GlobalBatchNorm, nn.BatchNorm3d):
    """nn.BatchNorm3d normalising over the global batch under torchrun."""


_GLOBAL_BN = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Make the BatchNorm layers of ``module`` normalise over the global batch (in place: same
    modules, parameters and buffers, only their class changes); returns ``module``."""
    for m in module.modules():
        cls = _GLOBAL_BN.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return module


def ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``module`` in DistributedDataParallel when running under torchrun, else return it.

    Its BatchNorm layers then normalise over the global batch (:class:`GlobalBatchNorm`), so the
    gradients, the running statistics and everything computed from them (pseudo-labels, the
    evaluated model) are those of one process with the same global batch, identical on all ranks.
    """
    if not is_dist() or not any(p.requires_grad for p in module.parameters()):
        return module
    module = global_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                               find_unused_parameters=True)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
