"""The one DFKD method type: :class:`DFKDMethod` = a synthesizer + the student learner + a schedule.

A method is configuration, never a subclass: a method file states its options, its synthesizer (built
from the options) and its training defaults in a :class:`DFKD` object and registers it::

    register("dafl", task="dfkd", family="generator")(DFKD(
        "DAFL (Chen et al., ICCV 2019): ...", Options=DAFLOptions, module=__name__,
        synthesizer=lambda o: GeneratorSynthesizer(dafl_objective), defaults={...}))

``batches()`` is the reconstructor (the synthesizer's batches, added to the replay pool); ``step()`` takes
``kd_steps`` student steps on the fresh batch, a fresh synthesizer sample, or replay data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.buffers import DataPool
from ..core.context import Context
from ..core.method import Batch, Method, freeze
from .student import StudentLearner
from .synthesis import SynthEnv, Synthesizer


class DFKDMethod(Method):
    """A configured DFKD method (see the module docstring); built by calling its :class:`DFKD` spec."""

    task = "dfkd"

    def __init__(self, ctx: Context, opts: Any, spec: "DFKD"):
        super().__init__(ctx, opts)
        self.spec, self.name = spec, spec.name

    def setup(self) -> None:
        ctx, o = self.ctx, self.opts
        ctx.steps_per_epoch = ctx.train.iters_per_epoch
        self.teacher = freeze(ctx.teacher.eval())
        self.learner = StudentLearner(ctx, o, self.teacher, self.track)
        env = SynthEnv(ctx=ctx, teacher=self.teacher, student=self.learner.student, learner=ctx.learner, opts=o,
                       batch=o.synth_batch or ctx.batch_per_rank, method=self.name, progress=self.learner.progress,
                       lr_factor=self.learner.lr_factor,
                       discard_student_grads=lambda: self.learner.opt.zero_grad(set_to_none=True))
        self.synth: Synthesizer = self.spec.synthesizer(o)
        self.synth.setup(env)
        self.track("synthesizer", self.synth)
        self.pool = None
        if o.pool_batches > 0 and self.synth.store is None:
            self.pool = self.track("pool", DataPool(o.pool_batches * env.batch, ctx.input_shape, ctx.num_classes,
                                                    ctx.device))
        self.replay = self.synth.store if self.synth.store is not None else self.pool

    # -- the loop's protocol -------------------------------------------------------------------
    def batches(self):
        """The reconstructor: one synthesized batch (and its teacher logits and terms) per iteration."""
        self.ctx.learner.train()
        for _ in range(self.ctx.train.iters_per_epoch):
            x, t_logits, terms = self.synth.synthesize()
            if self.pool is not None:
                self.pool.add(x, t_logits)
            yield Batch(x=x, targets=t_logits, extra={"terms": terms})

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        terms = dict(batch.extra["terms"])
        if self.ctx.epoch < self.opts.warmup:         # synthesis only
            return terms
        n = self.ctx.batch_per_rank

        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            if self.replay is not None and len(self.replay):
                idx = self.replay.sample_indices(n, self.ctx.rng)
                return self.replay.data["x"][idx], self.replay.data["logits"][idx]
            fresh = self.synth.sample(n)
            return fresh if fresh is not None else (batch.x, batch.targets)

        terms.update(self.learner.train(draw, self.opts.kd_steps))
        return terms

    def model(self) -> torch.nn.Module:
        return self.learner.model()

    @torch.no_grad()
    def synthesize(self, n: int) -> torch.Tensor:
        """``n`` synthesized images in input space (for grids), on the device: the synthesizer's own
        (a generator's), else the replay data, else fresh batches."""
        imgs = self.synth.images(n)
        if imgs is not None:
            return imgs
        if self.replay is not None and len(self.replay):
            return self.replay.data["x"][:min(n, len(self.replay))].clone()
        out: list[torch.Tensor] = []
        while sum(len(v) for v in out) < n:
            with torch.enable_grad():
                out.append(self.synth.synthesize()[0])
        return torch.cat(out)[:n]


@dataclass(eq=False)
class DFKD:
    """A DFKD method as configuration: registered by name (``register(...)(DFKD(...))``), called with
    ``(ctx, opts)`` it builds the :class:`DFKDMethod`. ``summary`` is the method's one-line description
    ("Title (Authors, Venue Year): what it does"), ``module`` its file (``__name__``)."""

    summary: str
    Options: type
    synthesizer: Callable[[Any], Synthesizer]
    module: str
    defaults: dict = field(default_factory=dict)
    needs_teacher_bn: bool = False
    needs_learner_bn = False
    needs_index = False
    trains = True

    def __post_init__(self) -> None:
        self.__doc__ = self.summary          # the registry's method table reads these
        self.__module__ = self.module

    def __call__(self, ctx: Context, opts: Any) -> DFKDMethod:
        return DFKDMethod(ctx, opts, self)


DEFAULTS = {"epochs": 20, "iters_per_epoch": 50, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4}
