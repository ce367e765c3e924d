"""The run context every method receives, and the training settings shared by all methods."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from ..errors import ConfigError, NonFiniteError
from ..models.split import Parts, split
from . import distributed as dist
from .device import choose_memory_format
from .loader import make_loader

log = logging.getLogger("dfkt")


@dataclass
class TrainConfig:
    """Settings of the one loop. ``None`` means: the method's default (see ``Method.defaults``)."""

    epochs: Optional[int] = None            # SFDA: passes over the target; DFKD: epochs of iters_per_epoch
    iters_per_epoch: Optional[int] = None   # DFKD (synthetic data has no natural epoch)
    batch_size: Optional[int] = None        # global batch (split over ranks under torchrun)
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True                        # bf16 autocast on CUDA; ignored on CPU
    num_workers: int = 0
    checkpoint_dir: Optional[str] = None    # resume.pt written there every checkpoint_every epochs
    checkpoint_every: int = 1
    max_bad_steps: int = 10                 # consecutive NaN/inf steps before the run stops
    eval_every: int = 1
    time_budget_s: Optional[float] = None   # stop after this much training time (checked per step)
    progress: Optional[bool] = None         # progress bars; None: only when stderr is a terminal
    log_dir: Optional[str] = None           # experiment logs: steps.csv, epochs.csv (+ TensorBoard events)
    on_collapse: Literal["rollback", "warn", "stop"] = "rollback"   # SFDA: the label-free collapse guard
    neighbour_index: Literal["auto", "exact", "ivf", "hnsw"] = "auto"   # feature-bank kNN (NRC, AaD,
    #                                       AdaContrast): auto = exact below 50k rows / on GPU, else IVF (core.neighbors)
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"   # layout of the run's conv
    #                                       weights: auto = channels_last for conv nets on the CPU (core.device)

    def validate(self) -> None:
        for name in ("epochs", "iters_per_epoch", "batch_size", "checkpoint_every", "eval_every", "max_bad_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {v}.")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}.")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}.")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0, got {self.num_workers}.")
        if not -(2 ** 63) <= self.seed < 2 ** 64:   # the range torch.manual_seed accepts
            raise ConfigError(f"train.seed must be a 64-bit integer, got {self.seed}.")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"train.time_budget_s must be > 0 (or null for no limit), got {self.time_budget_s}.")

    def resolved(self, defaults: dict) -> "TrainConfig":
        """Fill ``None`` fields from a method's defaults, then from global ones."""
        base = {"epochs": 10, "iters_per_epoch": 100, "batch_size": 64, "lr": 0.01, "weight_decay": 0.0}
        base.update(defaults)
        out = TrainConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        for k, v in base.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        return out


def _scalar(v) -> float:
    t = torch.as_tensor(v).detach().float()
    return float(t) if t.numel() == 1 else float(t.sum())


def _describe(loss: torch.Tensor, terms: dict | None) -> str:
    """'loss=nan, terms: ce=nan, reg=0.5; non-finite: ce' (host syncs: only on bad steps)."""
    vals = {k: _scalar(v) for k, v in (terms or {}).items()}
    bad = [k for k, v in vals.items() if not math.isfinite(v)]
    shown = ", ".join(f"{k}={v:.4g}" for k, v in vals.items()) or "none given"
    return (f"loss={_scalar(loss):.4g}, terms: {shown}; non-finite: "
            f"{', '.join(bad) if bad else 'gradients only (the loss terms are finite)'}")


class StepGuard:
    """Backward + optimiser step with a NaN/inf guard (and a GradScaler for fp16 AMP).

    A step whose loss or gradients are not finite is skipped and logged with its loss terms; after
    ``max_bad`` consecutive bad steps *of one stream* the run stops with :class:`NonFiniteError`.
    Streams name independent kinds of update (``'main'``: the learner; ``'synthesis'``: DFKD's
    generator/pixel steps), so a good student step does not hide a generator that keeps failing.
    """

    def __init__(self, max_bad: int, scaler: "torch.amp.GradScaler | None" = None):
        self.max_bad, self.scaler = max_bad, scaler
        self.skipped = 0
        self.in_a_row: dict[str, int] = {}

    @property
    def bad_in_a_row(self) -> int:
        """The longest current run of consecutive bad steps over all streams."""
        return max(self.in_a_row.values(), default=0)

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, step: int,
                 terms: dict[str, torch.Tensor] | None = None, retain_graph: bool = False,
                 stream: str = "main", max_norm: float | None = None) -> bool:
        """``max_norm``: clip the global gradient norm to it before the step (no host sync)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.scale(loss).backward(retain_graph=retain_graph)
            self.scaler.unscale_(optimizer)
        else:
            loss.backward(retain_graph=retain_graph)
        grads = [p.grad for p in params if p.grad is not None]
        finite = torch.isfinite(loss.detach())
        if grads:
            norm = torch.stack(torch._foreach_norm(grads)).norm()
            finite = finite & torch.isfinite(norm)
            if max_norm:
                torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        ok = bool(finite)  # one sync per optimiser step (as GradScaler does)
        if ok:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return self.record(ok, loss, step, terms, stream)

    def record(self, ok: bool, loss: torch.Tensor, step: int, terms: dict[str, torch.Tensor] | None = None,
               stream: str = "main") -> bool:
        """Count a step of ``stream`` as good or bad (for updates applied by hand); log, and stop after
        ``max_bad`` consecutive bad ones. Returns ``ok``."""
        if ok:
            self.in_a_row[stream] = 0
            return True
        self.skipped += 1
        n = self.in_a_row[stream] = self.in_a_row.get(stream, 0) + 1
        what = "step" if stream == "main" else f"{stream} step"
        report = _describe(loss, terms)
        log.warning("step %d: non-finite loss or gradient, %s skipped (%d in a row); %s", step, what, n, report)
        if n >= self.max_bad:
            raise NonFiniteError(
                f"{n} consecutive non-finite {what}s, the last at step {step}: {report}. "
                f"Lower the lr{'' if stream == 'main' else ' of the ' + stream}, check the inputs, "
                f"or raise train.max_bad_steps.")
        return False


@dataclass
class Context:
    """What a method works with: models, device, settings, data, counters and helpers."""

    learner: nn.Module                      # the model being trained (student / adapted model)
    teacher: Optional[nn.Module]            # frozen knowledge source (teacher / source model copy)
    train: TrainConfig
    device: torch.device
    num_classes: int
    input_shape: tuple
    target: Any = None                      # SFDA: the unlabeled target data set
    rng: torch.Generator = field(default_factory=torch.Generator)
    step: int = 0
    epoch: int = 0
    steps_per_epoch: int = 1                # set by the method at setup (for lr schedules)
    time_base: float = 0.0                  # training seconds of the finished epochs (restored on resume)
    epoch_t0: Optional[float] = None        # perf_counter() at the start of the running epoch
    last_pass: Optional[dict] = None        # SFDA: the latest no-grad pass over the target (see share_pass)
    reference: Any = None                   # SFDA: dfkt.core.guard.Reference (the AdaBN source's predictions)
    parts: Parts = field(init=False)

    def __post_init__(self) -> None:
        # the run's own copies of the models take the layout their convolutions run fastest in on this
        # device (train.memory_format); the weights are the same numbers, only their strides change
        self.layout_changed = False
        for m in (self.learner, self.teacher):
            if m is not None:
                fmt = choose_memory_format(m, self.device, self.train.memory_format)
                if fmt is not None:
                    was_nchw = any(p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)
                                   for p in m.parameters())
                    m.to(memory_format=fmt)
                    # the caller's layout comes back with the returned model (api._run)
                    self.layout_changed |= m is self.learner and fmt == torch.channels_last and was_nchw
        self.parts = split(self.learner)
        # BatchNorm running statistics of the learner as of the last good step: a step the guard skips
        # (NaN/inf loss or gradients) puts them back, so a bad batch never leaves them non-finite
        self._bn_live = [b for m in self.learner.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                         for b in (m.running_mean, m.running_var) if b is not None]
        self._bn_good = [b.detach().clone() for b in self._bn_live]
        use_amp = self.train.amp and self.device.type == "cuda"
        self.amp_dtype = None
        scaler = None
        if use_amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if self.amp_dtype == torch.float16:
                scaler = torch.amp.GradScaler("cuda")
        self.guard = StepGuard(self.train.max_bad_steps, scaler)

    # -- helpers used by methods -------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def elapsed_s(self) -> float:
        """Training time so far (evaluation excluded; the time before a resume included), as the
        loop counts it against ``train.time_budget_s``."""
        running = time.perf_counter() - self.epoch_t0 if self.epoch_t0 is not None else 0.0
        return self.time_base + running

    def optimize(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                 terms: dict[str, torch.Tensor] | None = None, retain_graph: bool = False,
                 stream: str = "main", max_norm: float | None = None) -> bool:
        """Backward, guard against NaN/inf, (clip the gradient norm to ``max_norm``,) step and zero the
        gradients (``stream``: see StepGuard). A skipped step also restores the learner's BatchNorm
        running statistics to the last good step's."""
        ok = self.guard(loss, optimizer, self.step, terms, retain_graph, stream, max_norm)
        if self._bn_live:
            with torch.no_grad():
                if ok:
                    torch._foreach_copy_(self._bn_good, self._bn_live)
                else:
                    torch._foreach_copy_(self._bn_live, self._bn_good)
        return ok

    def loader(self, dataset, shuffle: bool = True, drop_last: bool = False, batch_size: int | None = None,
               shard: bool = True):
        """Batches of (x, y, idx) on the device; the batch size is per process (global / world size)."""
        bs = batch_size or self.train.batch_size
        per_rank = max(1, bs // dist.world_size()) if shard else bs
        return make_loader(dataset, per_rank, self.device, shuffle=shuffle, drop_last=drop_last,
                           generator=self.rng, num_workers=self.train.num_workers, shard=shard)

    def share_pass(self, outputs: dict) -> None:
        """Offer a full no-grad pass over the target (logits, features, labels in index order) made with
        the weights of the current step, so that other readers at the same step (the next epoch's
        pseudo-labels, memory banks) reuse it instead of running the same pass again."""
        self.last_pass = {"step": self.step, **outputs}

    def shared_pass(self) -> Optional[dict]:
        """The pass offered at the current step, if any (weights unchanged since)."""
        lp = self.last_pass
        return lp if lp is not None and lp["step"] == self.step and "features" in lp else None

    def caller_layout(self, model: nn.Module) -> nn.Module:
        """``model`` (a run's result) back in the layout the caller gave when the run changed it
        (``train.memory_format``: channels_last on the CPU); the values are untouched."""
        return model.to(memory_format=torch.contiguous_format) if self.layout_changed else model

    def ddp(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DDP under torchrun (gradients averaged over ranks), else itself."""
        return dist.ddp(module, self.device)

    @property
    def batch_per_rank(self) -> int:
        return max(1, self.train.batch_size // dist.world_size())

    @property
    def total_steps(self) -> int:
        """Total optimisation steps the schedule expects (for lr decay)."""
        return max(1, self.train.epochs * self.steps_per_epoch)
