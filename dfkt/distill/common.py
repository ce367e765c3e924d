"""Parts shared by every DFKD method: student optimiser and schedule, the KD step, feature losses,
the data pool and the generator-based synthesizer base class.

Vocabulary: one *iteration* (one ``Batch`` from ``batches()``, one ``step()``) = the method's
synthesis work (``g_steps`` generator steps, or pixel optimisation) followed by ``kd_steps``
student steps. ``train.iters_per_epoch`` iterations make an epoch; the student's lr schedule spans
``epochs * iters_per_epoch * kd_steps`` student steps. With ``pool_batches > 0`` every synthesized
batch is added to an on-device :class:`~dfkt.distill.pool.DataPool` and the student steps draw
random batches from the pool instead of re-using only the fresh batch.

With ``train.time_budget_s`` set, ``time_schedule=True`` (the default) makes the lr schedule follow
``max(step progress, time progress)``: the cosine reaches its floor when the budget runs out
even when the step count was sized for a faster machine. Runs that stop on their step count are
unaffected. Time progress is the loop's training time (``ctx.elapsed_s()``: evaluation excluded, the
time before a resume included), so a resumed run continues the schedule where it stopped; a
time-limited run is still not bit-reproducible (the step at which a given lr is reached varies).

Student warm-up and gradient clipping (on by default): a BN-free student (LeNet-5-half) trained with
SGD at lr 0.1 and Nesterov momentum can take one exploding step in its first few dozen steps (the
gradient norm jumps from ~0.5 to 4-13 on synthetic batches); the update kills its ReLUs and it never
recovers (it predicts one class: `dfkt demo` at 10.9 % on some teachers / thread counts). Whether it
happens depends on the teacher's initialisation and on floating-point rounding. A linear lr warm-up
over the first 5 % of the run and clipping the student's gradient norm at 1 (typical norms are
0.1-0.7) remove it on every teacher tried.
"""
from __future__ import annotations

import abc
import copy
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core import distributed as dist
from ..core.hooks import FeatureRecorder, named_modules
from ..core.losses import FEATURE_LOSSES, FitNetHint, kd_kl, logit_l1
from ..core.method import Batch, Method, freeze
from ..errors import ConfigError, ModelError
from .generators import Generator, sample_z
from .pool import DataPool

FEATURE_CHOICES = ("none", "at", "sp", "pkt", "rkd", "fitnet")
PENULTIMATE = "penultimate"


@dataclass
class DistillOptions:
    """Options every DFKD method has (the student side and the transfer-loss zoo)."""

    temperature: float = 1.0            # KD temperature (kd_loss='kl')
    kd_loss: Literal["kl", "l1"] = "kl"  # 'l1': DFAD's mean absolute logit difference
    kd_steps: int = 1                   # student steps per iteration
    pool_batches: int = 0               # data-pool capacity in synthesized batches; 0 = train on the fresh batch
    synth_batch: Optional[int] = None   # synthesized batch size (default: train.batch_size)
    momentum: float = 0.9
    optimizer: Literal["sgd", "adam"] = "sgd"   # student optimiser (DAFL's MNIST recipe: Adam, lr 2e-3)
    schedule: Literal["cosine", "step", "none"] = "cosine"   # student lr ('step': x0.1 at 50 % and 75 %)
    time_schedule: bool = True          # with train.time_budget_s: progress = max(steps, time) fraction
    lr_warmup: float = 0.05             # linear student lr warm-up over this fraction of the run (0 = off)
    grad_clip: float = 1.0              # clip the student's gradient norm to this (0 = off); see DistillMethod
    augment: int = 0                    # random shifts of up to this many pixels on student batches
    mixup: float = 0.0                  # > 0: mix student batches pairwise, lambda ~ Beta(mixup, mixup) per
    #                                     sample; the teacher labels the mixed inputs (boundary samples)
    ema: float = 0.0                    # > 0: the deployed/evaluated student is an exponential moving average
    #                                     of the trained one's weights (decay per student step, e.g. 0.99)
    feature_loss: Literal["none", "at", "sp", "pkt", "rkd", "fitnet"] = "none"
    feature_layers: list[str] = field(default_factory=list)   # module names, 'student:teacher' if they differ;
    #                                    'penultimate' = input of the last Linear; [] = auto
    feature_weight: float = 1.0

    def validate(self) -> None:
        if self.kd_steps < 1:
            raise ConfigError(f"kd_steps must be >= 1, got {self.kd_steps}")
        if self.pool_batches < 0:
            raise ConfigError(f"pool_batches must be >= 0, got {self.pool_batches}")
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


@dataclass
class GeneratorOptions(DistillOptions):
    """A generator-based synthesizer's options."""

    nz: int = 100                        # latent size
    ngf: Optional[int] = None            # generator width (default: sized to the input, see generators.py)
    g_out: Literal["bn", "tanh", "affine"] = "bn"
    g_lr: float = 1e-3                   # generator Adam lr
    g_steps: int = 1                     # generator steps per iteration
    g_schedule: bool = False             # the generator lr follows the student's schedule (DFAD decays both)

    def validate(self) -> None:
        super().validate()
        if self.g_steps < 1:
            raise ConfigError(f"g_steps must be >= 1, got {self.g_steps}")
        if self.g_lr <= 0:
            raise ConfigError(f"g_lr must be > 0, got {self.g_lr}")


class no_param_grad:
    """Context manager: ``module``'s parameters get no gradients (inputs still do), then restore."""

    def __init__(self, *modules: nn.Module):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, f in zip(self.params, self.flags):
            p.requires_grad_(f)


def manual_guard(ctx, finite: torch.Tensor, loss: torch.Tensor, terms: dict) -> bool:
    """The NaN/inf guard for synthesis updates made by hand (not through an optimizer)."""
    return ctx.guard.record(bool(finite), loss, ctx.step, terms, stream="synthesis")


def last_linear(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` of ``model`` (the classifier); its input is the penultimate feature."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier; name feature layers explicitly.")
    return names[-1]


def auto_attention_layers(student: nn.Module, teacher: nn.Module, input_shape: tuple) -> list[str]:
    """Module names common to both nets: for each spatial size (> 1x1) the last module to produce it."""
    common = [n for n, _ in teacher.named_modules() if n and n in dict(student.named_modules())]
    per_model = []
    for net in (teacher, student):
        order: list[tuple[str, tuple]] = []
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, tuple(o.shape))))
                 for n, m in named_modules(net, common).items()]
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                net(torch.zeros((2, *input_shape), device=next(net.parameters()).device))
        finally:
            net.train(was)
            for h in hooks:
                h.remove()
        last: dict[tuple, str] = {}
        for n, shape in order:
            if len(shape) == 4 and shape[-1] > 1:
                last[shape[-2:]] = n
        per_model.append(last)
    names = [n for size, n in per_model[0].items() if per_model[1].get(size) == n]
    if not names:
        raise ModelError("no common 4-D feature layers found for attention transfer; set feature_layers to "
                         "module names of the student and teacher ('student_name:teacher_name').")
    return names


class FeatureTransfer(nn.Module):
    """Feature-level transfer losses (AT, SP, PKT, RKD, FitNet) between named student/teacher layers."""

    def __init__(self, kind: str, pairs: list[tuple[str, str]], student: nn.Module, teacher: nn.Module,
                 input_shape: tuple):
        super().__init__()
        self.kind, self.pairs = kind, pairs
        self.s_names = [s for s, _ in pairs]
        self.t_names = [t for _, t in pairs]
        self.s_pen = PENULTIMATE in self.s_names and last_linear(student)
        self.t_pen = PENULTIMATE in self.t_names and last_linear(teacher)
        named_modules(student, [n for n in self.s_names if n != PENULTIMATE])
        named_modules(teacher, [n for n in self.t_names if n != PENULTIMATE])
        probe = torch.zeros((2, *input_shape), device=next(student.parameters()).device)
        fs, ft = self.record(student, probe, student=True, grad=False), self.record(teacher, probe, student=False,
                                                                                   grad=False)
        self.adapters = nn.ModuleList()
        for (s, t), a, b in zip(pairs, fs, ft):
            if kind == "at" and (a.dim() != 4 or b.dim() != 4):
                raise ModelError(f"attention transfer needs 4-D feature maps, but {s!r}/{t!r} give "
                                 f"{tuple(a.shape)}/{tuple(b.shape)}; choose convolutional layers.")
            if kind == "fitnet":
                conv = a.dim() == 4 and b.dim() == 4
                self.adapters.append(FitNetHint(a.shape[1], b.shape[1], conv=conv))

    def record(self, net: nn.Module, x: torch.Tensor, student: bool, grad: bool = True,
               forward: nn.Module | None = None) -> list[torch.Tensor]:
        """Run ``forward`` (default ``net``; e.g. its DDP wrapper) on ``x``, hooks on ``net``'s modules."""
        names = self.s_names if student else self.t_names
        pen = self.s_pen if student else self.t_pen
        plain = [n for n in names if n != PENULTIMATE]
        ctx = torch.enable_grad() if grad else torch.no_grad()
        was = net.training
        if not grad:
            net.eval()
        with ctx, FeatureRecorder(net, plain) as rec, FeatureRecorder(net, [pen] if pen else [], inputs=True) as prec:
            logits = (forward or net)(x)
        net.train(was)
        self.last_logits = logits
        return [prec[pen] if n == PENULTIMATE else rec[n] for n in names]

    def loss(self, fs: list[torch.Tensor], ft: list[torch.Tensor]) -> torch.Tensor:
        terms = []
        for i, (a, b) in enumerate(zip(fs, ft)):
            if self.kind == "fitnet":
                a = a if a.dim() == 4 and b.dim() == 4 else a.flatten(1)
                b = b if a.dim() == 4 else b.flatten(1)
                terms.append(self.adapters[i](a, b))
            else:
                terms.append(FEATURE_LOSSES[self.kind](a, b.detach()))
        return torch.stack(terms).sum()


def random_shift(x: torch.Tensor, max_px: int, g: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to ``max_px`` pixels (border replicated by rolling a padded copy)."""
    if max_px <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_px,) * 4, mode="replicate")
    dx, dy = (int(v) for v in torch.randint(0, 2 * max_px + 1, (2,), generator=g))
    return pad[..., dy:dy + h, dx:dx + w]


def mix_pairs(x: torch.Tensor, alpha: float, g: torch.Generator | None = None) -> torch.Tensor:
    """Mixup of each input with a random partner of the batch, lambda ~ Beta(alpha, alpha) per sample
    (drawn from ``g`` on the host, so runs stay reproducible)."""
    n = x.shape[0]
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((n,))
        perm = torch.randperm(n)
    lam = lam.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[perm.to(x.device)]


class HostState(dict):
    """Plain counters and small values of a method (tracked for resume like a module's state)."""

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict) -> None:
        self.update(state)


def balanced_labels(n: int, num_classes: int, device, g: torch.Generator | None = None) -> torch.Tensor:
    """``n`` labels (this rank's part of a global batch of ``n * world_size``) covering the classes as
    evenly as possible, in random order."""
    total = n * dist.world_size()
    y = torch.arange(total) % num_classes
    return dist.shard(y[torch.randperm(total, generator=g)]).to(device)


class DistillMethod(Method):
    """Base of the DFKD methods: the student side (optimiser, schedule, KD + feature loss, pool).

    Subclasses implement ``build()`` (synthesizer parts), ``synthesize_batch()`` -> (x, teacher
    logits, terms) for one iteration's synthesis, and ``synthesize(n)`` for image grids.
    """

    Options = DistillOptions

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, o, tc = self.ctx, self.opts, self.ctx.train
        ctx.steps_per_epoch = tc.iters_per_epoch
        self.device = ctx.device
        self.teacher = ctx.teacher.eval()
        freeze(self.teacher)
        self.student = ctx.ddp(ctx.learner)
        self.synth_bs = o.synth_batch or ctx.batch_per_rank
        self.features: FeatureTransfer | None = None
        if o.feature_loss != "none":
            if o.feature_layers:
                pairs = [tuple(n.split(":", 1)) if ":" in n else (n, n) for n in o.feature_layers]
            elif o.feature_loss == "at":
                names = auto_attention_layers(ctx.learner, self.teacher, ctx.input_shape)
                pairs = [(n, n) for n in names]
            else:
                pairs = [(PENULTIMATE, PENULTIMATE)]
            self.features = self.track("features", FeatureTransfer(o.feature_loss, pairs, ctx.learner, self.teacher,
                                                                   ctx.input_shape).to(self.device))
        params = list(ctx.learner.parameters()) + (list(self.features.parameters()) if self.features else [])
        if o.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=tc.lr, momentum=o.momentum, weight_decay=tc.weight_decay,
                                  nesterov=o.momentum > 0)
        self.s_opt = self.track("student_opt", opt)
        self.base_lr = tc.lr
        self.s_total = max(1, tc.epochs * tc.iters_per_epoch * o.kd_steps)
        self.state = self.track("state", HostState(s_step=0))
        self.ema_model = None
        if o.ema > 0:
            self.ema_model = self.track("ema_student", copy.deepcopy(dist.unwrap(ctx.learner)).eval())
        self.pool = (self.track("pool", DataPool(o.pool_batches * self.synth_bs, ctx.input_shape, ctx.num_classes,
                                                  self.device)) if o.pool_batches > 0 else None)
        self.build()

    def build(self) -> None:
        """Subclass hook: build the synthesizer (generator, pixels, optimisers)."""

    def synth_optimize(self, loss: torch.Tensor, optimizer, terms: dict[str, torch.Tensor]) -> bool:
        """ctx.optimize for synthesis steps (generator, latent codes, pixels): the NaN guard counts them
        as their own stream, so good student steps do not reset a run of failing synthesis steps."""
        return self.ctx.optimize(loss, optimizer, terms, stream="synthesis")

    # -- schedule -----------------------------------------------------------------------------
    def progress(self) -> float:
        p = self.state['s_step'] / self.s_total
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

    # -- the student step ----------------------------------------------------------------------
    def student_batch(self, x: torch.Tensor, t_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is not None and len(self.pool) > 0:
            x, t_logits = self.pool.sample(self.ctx.batch_per_rank, self.ctx.rng)
        return x, t_logits

    def transfer_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        if self.opts.kd_loss == "l1":
            return logit_l1(s_logits, t_logits.detach())
        return kd_kl(s_logits, t_logits, self.opts.temperature)

    def kd_step(self, x: torch.Tensor, t_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One student step on ``x`` (teacher logits given, or computed); returns detached terms."""
        ctx, o = self.ctx, self.opts
        factor = self.lr_factor(self.progress())
        for g in self.s_opt.param_groups:
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
                feat = None
            loss = self.transfer_loss(s_logits.float(), t_logits.float())
            terms["kd"] = loss.detach()
            if feat is not None:
                loss = loss + feat
                terms["feat"] = feat.detach()
        ctx.optimize(loss, self.s_opt, terms, max_norm=o.grad_clip or None)
        self.state['s_step'] += 1
        if self.ema_model is not None:
            self.update_ema()
        return terms

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * student (buffers copied), one fused op per tensor list."""
        src = dist.unwrap(self.ctx.learner)
        # warm-up: the decay grows with the step count so early weights do not linger
        decay = min(self.opts.ema, (1 + self.state['s_step']) / (10 + self.state['s_step']))
        ema_p, cur_p = list(self.ema_model.parameters()), list(src.parameters())
        torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)
        for b_ema, b in zip(self.ema_model.buffers(), src.buffers()):
            b_ema.copy_(b)

    def model(self) -> nn.Module:
        """The student to evaluate and deploy (its EMA with ``ema > 0``)."""
        return self.ema_model if self.ema_model is not None else self.ctx.learner

    # -- the loop's protocol -------------------------------------------------------------------
    def batches(self):
        self.ctx.learner.train()
        for _ in range(self.ctx.train.iters_per_epoch):
            yield Batch(x=torch.empty(0, device=self.device))

    @abc.abstractmethod
    def synthesize_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One synthesis step: (inputs, teacher logits, named terms)."""

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x, t_logits, terms = self.synthesize_batch()
        if self.pool is not None:
            self.pool.add(x, t_logits)
        sums: dict[str, torch.Tensor] = {}
        for _ in range(self.opts.kd_steps):
            xs, ts = self.student_batch(x, t_logits)
            for k, v in self.kd_step(xs, ts).items():
                sums[k] = sums[k] + v if k in sums else v
        terms.update({k: v / self.opts.kd_steps for k, v in sums.items()})
        return terms

    @abc.abstractmethod
    def synthesize(self, n: int) -> torch.Tensor:
        """``n`` synthesized images in input space (for grids), on the device."""

    @torch.no_grad()
    def synthesize_from_pool(self, n: int) -> torch.Tensor:
        """The first ``n`` pool images, or fresh ``synthesize_batch()`` output when there is no pool."""
        if self.pool is not None and len(self.pool):
            return self.pool.all()[0][:n].clone()
        with torch.enable_grad():
            return torch.cat([self.synthesize_batch()[0] for _ in range(-(-n // self.synth_bs))])[:n]


class GeneratorMethod(DistillMethod):
    """A DFKD method whose synthesizer is a generator trained against the teacher (and student)."""

    Options = GeneratorOptions
    g_out_default: str | None = None   # a subclass may force a default output layer

    def build_generator(self, num_classes: int = 0) -> Generator:
        o = self.opts
        g = Generator(self.ctx.input_shape, nz=o.nz, ngf=o.ngf, out=o.g_out, num_classes=num_classes).to(self.device)
        return g

    def build(self) -> None:
        self.generator = self.track("generator", self.build_generator())
        # trained through DDP under torchrun: global gradients and BatchNorm statistics
        self.gen = self.ctx.ddp(self.generator)
        self.g_opt = self.track("generator_opt", torch.optim.Adam(self.generator.parameters(), lr=self.opts.g_lr,
                                                                  betas=(0.5, 0.999)))

    def z(self, n: int | None = None) -> torch.Tensor:
        """This rank's part of a global batch of latent codes (the same draw as one process would make)."""
        n = n or self.synth_bs
        return dist.shard(sample_z(n * dist.world_size(), self.opts.nz, self.device, self.ctx.rng))

    @torch.no_grad()
    def synthesize(self, n: int) -> torch.Tensor:
        g = copy.deepcopy(self.generator).train()   # batch statistics, without touching the running ones
        return torch.cat([g(self.z(min(256, n - i))) for i in range(0, n, 256)])[:n]

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Student forward for the generator's adversarial term (gradients flow to x only)."""
        return self.student(x)

    def g_optimize(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], opt=None) -> bool:
        if self.opts.g_schedule and opt is None:
            factor = self.lr_factor(self.progress(), warmup=False)
            for g in self.g_opt.param_groups:
                g["lr"] = self.opts.g_lr * factor
        ok = self.synth_optimize(loss, opt or self.g_opt, terms)
        # gradients reaching the (frozen) student during the generator step are discarded
        self.s_opt.zero_grad(set_to_none=True)
        return ok


# ----- BatchNorm-statistics synthesis (DeepInversion, DFQ, CMI, Fast) -----------------------------
class eval_mode:
    """Context manager: ``module`` in eval mode (BN running statistics untouched), then restored."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.was = self.module.training
        self.module.eval()
        return self

    def __exit__(self, *exc):
        self.module.train(self.was)


def adversarial_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, agree_only: bool = True) -> torch.Tensor:
    """Negative per-sample KL(t || s), counted where student and teacher agree (CMI/Fast's ``adv``).

    Minimising it moves samples to where the student disagrees with the teacher, but stops pushing
    a sample once the two predictions differ (so samples stay near the decision boundary).
    """
    kl = (F.softmax(t_logits, 1) * (F.log_softmax(t_logits, 1) - F.log_softmax(s_logits, 1))).sum(1)
    if agree_only:
        kl = kl * (s_logits.argmax(1) == t_logits.argmax(1)).float()
    return -kl.mean()


@dataclass
class BNSynthOptions(GeneratorOptions):
    """BatchNorm-statistics synthesis: the teacher's BN running statistics as a prior on the inputs."""

    g_out: Literal["bn", "tanh", "affine"] = "affine"
    bn: float = 1.0            # BN-statistics loss weight
    bn_first: float = 1.0      # extra factor on the first BN layer (DeepInversion)
    bn_mmt: float = 0.0        # Fast: momentum over the synthetic batch statistics (0 = this batch only)
    oh: float = 1.0            # CE of the teacher against the sampled target labels
    adv: float = 1.0           # adversarial term (see adversarial_kl)
    conditional: bool = True   # the generator also sees the sampled label (a class embedding scales z);
    #                            the published generators see z only, which needs far more steps
    balance: float = 0.0       # DAFL's class-balance term
    temperature: float = 20.0  # KD temperature (CMI/Fast use T=20)


class BNObjective:
    """Teacher BN-statistics + one-hot + adversarial objective on synthesized inputs."""

    def __init__(self, teacher: nn.Module, student: nn.Module, opts, method: str):
        from ..core.hooks import BNStatsRecorder
        self.teacher, self.student, self.opts = teacher, student, opts
        self.recorder = BNStatsRecorder(teacher, method=method)
        self.running: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def state_dict(self) -> dict:
        return {n: (m.cpu(), v.cpu()) for n, (m, v) in self.running.items()}

    def load_state_dict(self, state: dict) -> None:
        dev = next(self.teacher.parameters()).device
        self.running = {n: (m.to(dev), v.to(dev)) for n, (m, v) in state.items()}

    def bn_loss(self) -> torch.Tensor:
        o, rec = self.opts, self.recorder
        if o.bn_mmt <= 0:
            return rec.loss(o.bn_first)
        terms = []
        for i, (name, (mean, var)) in enumerate(rec.stats.items()):
            if name in self.running:
                pm, pv = self.running[name]
                mean, var = o.bn_mmt * pm + (1 - o.bn_mmt) * mean, o.bn_mmt * pv + (1 - o.bn_mmt) * var
            m = rec.layers[name]
            t = torch.norm(mean - m.running_mean, 2) + torch.norm(var - m.running_var, 2)
            terms.append(t * (o.bn_first if i == 0 else 1.0))
        self.pending = {n: (m.detach(), v.detach()) for n, (m, v) in rec.stats.items()}
        return torch.stack(terms).sum()

    def commit(self) -> None:
        """Fast: fold this batch's statistics into the running synthetic statistics."""
        o = self.opts
        if o.bn_mmt > 0 and getattr(self, "pending", None):
            for n, (m, v) in self.pending.items():
                if n in self.running:
                    pm, pv = self.running[n]
                    m, v = o.bn_mmt * pm + (1 - o.bn_mmt) * m, o.bn_mmt * pv + (1 - o.bn_mmt) * v
                self.running[n] = (m, v)
            self.pending = {}

    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None,
                 student_net: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        from ..core.losses import class_balance
        o = self.opts
        with self.recorder:
            t_logits = self.teacher(x)
        t_logits = t_logits.float()
        bn = self.bn_loss()
        oh = F.cross_entropy(t_logits, targets if targets is not None else t_logits.argmax(1))
        loss = o.bn * bn + o.oh * oh
        terms = {"bn": bn.detach(), "oh": oh.detach()}
        if o.adv > 0 and student_net is not None:
            with eval_mode(self.student), no_param_grad(self.student):
                adv = adversarial_kl(student_net(x).float(), t_logits)
            loss = loss + o.adv * adv
            terms["adv"] = adv.detach()
        if o.balance > 0:
            bal = class_balance(t_logits)
            loss = loss + o.balance * bal
            terms["balance"] = bal.detach()
        return loss, t_logits, terms


class BNGeneratorMethod(GeneratorMethod):
    """A generator trained against the teacher's BatchNorm statistics (DFQ, Fast), optionally conditional."""

    needs_teacher_bn = True

    def build_generator(self, num_classes: int = 0):
        return super().build_generator(self.ctx.num_classes if self.opts.conditional else 0)

    def build(self) -> None:
        super().build()
        self.objective = self.track("bn_objective", BNObjective(self.teacher, self.ctx.learner, self.opts, self.name))
