"""The transfer side of DFKD, the same for every method: the :class:`StudentLearner`.

Vocabulary: one *iteration* (one ``Batch`` from ``batches()``, one ``step()``) = the synthesizer's work
(``g_steps`` generator steps, or pixel optimisation) followed by ``kd_steps`` student steps.
``train.iters_per_epoch`` iterations make an epoch; the student's lr schedule spans
``epochs * iters_per_epoch * kd_steps`` student steps. With ``pool_batches > 0`` every synthesized batch
is added to an on-device replay pool (:class:`~dfkt.core.buffers.DataPool`) and the student steps draw
random batches from it instead of re-using only the fresh batch. The first ``warmup`` epochs only
synthesize (into the pool).

With ``train.time_budget_s`` set, ``time_schedule=True`` (the default) makes the lr schedule follow
``max(step progress, time progress)``: the cosine reaches its floor when the budget runs out even when
the step count was sized for a faster machine. Time progress is the loop's training time
(``ctx.elapsed_s()``: evaluation excluded, the time before a resume included), so a resumed run continues
the schedule where it stopped; a time-limited run is still not bit-reproducible.

Student warm-up and gradient clipping (on by default): a BN-free student (LeNet-5-half) trained with SGD
at lr 0.1 and Nesterov momentum can take one exploding step in its first few dozen steps (the gradient
norm jumps from ~0.5 to 4-13 on synthetic batches); the update kills its ReLUs and it never recovers
(it predicts one class: `dfkt demo` at 10.9 % on some teachers / thread counts). A linear lr warm-up over
the first 5 % of the run and clipping the student's gradient norm at 1 (typical norms are 0.1-0.7)
remove it on every teacher tried.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch

from ..core import distributed as dist
from ..core.buffers import DataPool, RingBuffer
from ..core.context import Context
from ..core.losses import kd_kl, logit_l1
from ..core.method import ema_update
from ..errors import ConfigError
from .augment import mix_pairs, random_shift
from .features import FeatureTransfer, feature_pairs


@dataclass
class DistillOptions:
    """Options every DFKD method has (the student side, the transfer-loss zoo and the schedule)."""

    temperature: float = 1.0            # KD temperature (kd_loss='kl')
    kd_loss: Literal["kl", "l1"] = "kl"  # 'l1': DFAD's mean absolute logit difference
    kd_steps: int = 1                   # student steps per iteration
    warmup: int = 0                     # epochs of synthesis only (into the pool; no student steps)
    pool_batches: int = 0               # replay-pool capacity in synthesized batches; 0 = train on the fresh batch
    synth_batch: Optional[int] = None   # synthesized batch size (default: train.batch_size)
    momentum: float = 0.9
    optimizer: Literal["sgd", "adam"] = "sgd"   # student optimiser (DAFL's MNIST recipe: Adam, lr 2e-3)
    schedule: Literal["cosine", "step", "none"] = "cosine"   # student lr ('step': x0.1 at 50 % and 75 %)
    time_schedule: bool = True          # with train.time_budget_s: progress = max(steps, time) fraction
    lr_warmup: float = 0.05             # linear student lr warm-up over this fraction of the run (0 = off)
    grad_clip: float = 1.0              # clip the student's gradient norm to this (0 = off); see the module doc
    augment: int = 0                    # random shifts of up to this many pixels on student batches
    mixup: float = 0.0                  # > 0: mix student batches pairwise, lambda ~ Beta(mixup, mixup) per
    #                                     sample; the teacher labels the mixed inputs (boundary samples)
    ema: float = 0.0                    # > 0: the deployed/evaluated student is an exponential moving average
    #                                     of the trained one's weights (decay per student step, e.g. 0.99)
    feature_loss: Literal["none", "at", "sp", "pkt", "rkd", "fitnet"] = "none"
    feature_layers: list[str] = field(default_factory=list)   # module names, 'student:teacher' if they differ;
    #                                    'penultimate' = input of the classifier head; [] = auto
    feature_weight: float = 1.0

    def validate(self) -> None:
        for name, lo in (("kd_steps", 1), ("pool_batches", 0), ("warmup", 0)):
            if getattr(self, name) < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.synth_batch is not None and self.synth_batch < 1:
            raise ConfigError(f"synth_batch must be >= 1, got {self.synth_batch}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1) (0 = off; e.g. 0.99), got {self.ema}")
        if self.mixup < 0:
            raise ConfigError(f"mixup must be >= 0 (0 = off; e.g. 1.0), got {self.mixup}")
        if not 0.0 <= self.lr_warmup < 1.0:
            raise ConfigError(f"lr_warmup must be a fraction of the run in [0, 1), got {self.lr_warmup}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


class HostState(dict):
    """Plain counters and small values (tracked for resume like a module's state)."""

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict) -> None:
        self.update(state)


class StudentLearner:
    """The student: optimiser and lr schedule, KD (KL or L1) plus feature losses by module name, the replay
    pool, shifts and mixup, EMA weights. ``learn(x, t, fresh)`` takes the ``kd_steps`` of one iteration."""

    def __init__(self, ctx: Context, opts: DistillOptions, teacher: torch.nn.Module,
                 track: Callable[[str, object], object]):
        o, tc = opts, ctx.train
        self.ctx, self.opts, self.teacher, self.track = ctx, opts, teacher, track
        self.student = ctx.ddp(ctx.learner)
        self.features: FeatureTransfer | None = None
        if o.feature_loss != "none":
            pairs = feature_pairs(o.feature_loss, o.feature_layers, ctx.learner, teacher, ctx.input_shape)
            self.features = track("features", FeatureTransfer(o.feature_loss, pairs, ctx.learner, teacher,
                                                               ctx.input_shape).to(ctx.device))
        params = list(ctx.learner.parameters()) + (list(self.features.parameters()) if self.features else [])
        if o.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=tc.lr, momentum=o.momentum, weight_decay=tc.weight_decay,
                                  nesterov=o.momentum > 0)
        self.opt = track("student_opt", opt)
        self.base_lr = tc.lr
        self.total = max(1, tc.epochs * tc.iters_per_epoch * o.kd_steps)
        self.state = track("state", HostState(s_step=0))
        self.ema_model = None
        if o.ema > 0:
            self.ema_model = track("ema_student", copy.deepcopy(dist.unwrap(ctx.learner)).eval())

    # -- schedule -----------------------------------------------------------------------------
    def progress(self) -> float:
        p = self.state["s_step"] / self.total
        budget = self.ctx.train.time_budget_s
        if budget and self.opts.time_schedule:
            p = max(p, self.ctx.elapsed_s() / budget)   # training time, restored on resume
        return min(p, 1.0)

    def lr_factor(self, p: float, warmup: bool = True) -> float:
        warm = min(1.0, (p + 1e-3) / self.opts.lr_warmup) if warmup and self.opts.lr_warmup > 0 else 1.0
        if self.opts.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * p))
        if self.opts.schedule == "step":
            return warm * (0.01 if p >= 0.75 else 0.1 if p >= 0.5 else 1.0)
        return warm

    # -- data ----------------------------------------------------------------------------------
    def use_replay(self, store: RingBuffer | None, batch: int) -> None:
        """Replay data to draw student batches from: the synthesizer's own ``store`` (persistent pixels), else
        a pool of ``pool_batches`` synthesized batches of ``batch`` rows, else none (the fresh batch)."""
        self.pool = None
        if self.opts.pool_batches > 0 and store is None:
            ctx = self.ctx
            self.pool = self.track("pool", DataPool(self.opts.pool_batches * batch, ctx.input_shape, ctx.num_classes,
                                                    ctx.device))
        self.replay = store if store is not None else self.pool

    def remember(self, x: torch.Tensor, t_logits: torch.Tensor) -> None:
        if self.pool is not None:
            self.pool.add(x, t_logits)

    def learn(self, x: torch.Tensor, t_logits: torch.Tensor,
              fresh: Callable[[int], Optional[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """``kd_steps`` student steps, each on replay data if any, else ``fresh(n)`` (a new synthesizer
        sample, when it makes them), else the iteration's batch ``(x, t_logits)``."""
        n = self.ctx.batch_per_rank

        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            if self.replay is not None and len(self.replay):
                idx = self.replay.sample_indices(n, self.ctx.rng)
                return self.replay.data["x"][idx], self.replay.data["logits"][idx]
            new = fresh(n)
            return new if new is not None else (x, t_logits)

        return self.train(draw, self.opts.kd_steps)

    # -- steps ---------------------------------------------------------------------------------
    def train(self, draw: Callable[[], tuple[torch.Tensor, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
        """``k`` student steps on ``draw()``'s (inputs, teacher logits); the mean of each named term."""
        sums: dict[str, torch.Tensor] = {}
        for _ in range(k):
            for name, v in self.kd_step(*draw()).items():
                sums[name] = sums[name] + v if name in sums else v
        return {name: v / k for name, v in sums.items()}

    def transfer_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        if self.opts.kd_loss == "l1":
            return logit_l1(s_logits, t_logits.detach())
        return kd_kl(s_logits, t_logits, self.opts.temperature)

    def kd_step(self, x: torch.Tensor, t_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One student step on ``x`` (teacher logits given, or computed); returns detached terms."""
        ctx, o = self.ctx, self.opts
        factor = self.lr_factor(self.progress())
        for g in self.opt.param_groups:
            g["lr"] = self.base_lr * factor
        x = x.detach()
        if o.augment:
            x = random_shift(x, o.augment, ctx.rng)
            t_logits = None           # the teacher must see the shifted images
        if o.mixup > 0:
            x = mix_pairs(x, o.mixup, ctx.rng)
            t_logits = None
        terms: dict[str, torch.Tensor] = {}
        with ctx.autocast():
            feat = None
            if self.features is not None:
                ft = self.features.record(self.teacher, x, student=False, grad=False)
                t_logits = self.features.last_logits
                fs = self.features.record(ctx.learner, x, student=True, forward=self.student)
                s_logits = self.features.last_logits
                feat = self.features.loss(fs, ft) * o.feature_weight
            else:
                if t_logits is None:
                    with torch.no_grad():
                        t_logits = self.teacher(x)
                s_logits = self.student(x)
            loss = self.transfer_loss(s_logits.float(), t_logits.float())
            terms["kd"] = loss.detach()
            if feat is not None:
                loss = loss + feat
                terms["feat"] = feat.detach()
        ctx.optimize(loss, self.opt, terms, max_norm=o.grad_clip or None)
        self.state["s_step"] += 1
        if self.ema_model is not None:
            self.update_ema()
        return terms

    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * student (buffers copied), one fused op per tensor list."""
        # warm-up: the decay grows with the step count so early weights do not linger
        decay = min(self.opts.ema, (1 + self.state["s_step"]) / (10 + self.state["s_step"]))
        ema_update(self.ema_model, dist.unwrap(self.ctx.learner), decay, buffers=True)

    def model(self) -> torch.nn.Module:
        """The student to evaluate and deploy (its EMA with ``ema > 0``)."""
        return self.ema_model if self.ema_model is not None else self.ctx.learner
