"""The one DFKD method type: :class:`DFKDMethod` = a synthesizer + the student learner + a schedule.

A method is configuration, never a subclass: a method file states its options, its synthesizer (built
from the options) and its training defaults in a :class:`DFKD` object and registers it::

    register("dafl", task="dfkd", family="generator")(DFKD(
        "DAFL (Chen et al., ICCV 2019): ...", Options=DAFLOptions, module=__name__,
        synthesizer=lambda o: GeneratorSynthesizer(dafl_objective), defaults={...}))

``batches()`` is the reconstructor (the synthesizer's batches, remembered in the learner's replay pool);
``step()`` hands each batch to the learner: ``kd_steps`` student steps on replay data, a fresh synthesizer
sample or the batch itself.

**Defaults = the benchmark recipe.** Each method's registered defaults (its Options dataclass and its
``defaults`` training settings) are the settings its benchmark suites run (benchmarks/dfkd-*.yaml list the
methods with no options), so ``dfkt.distill(teacher, student, method=m, input_shape=..., time_budget_s=...)``
with no other option runs what the suites report. One rule depends on the budget and is applied here
(:meth:`DFKD.train_defaults`): with ``time_budget_s`` set and no ``epochs`` given, ``epochs`` is
:data:`BUDGETED_EPOCHS` (only an upper bound: the budget ends the run, and the student's lr schedule follows
the budget, see :mod:`.student`); without a budget it is the method's ``epochs`` (20).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

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
        self.learner.use_replay(self.synth.store, env.batch)

    # -- the loop's protocol -------------------------------------------------------------------
    def batches(self):
        """The reconstructor: one synthesized batch (and its teacher logits and terms) per iteration."""
        self.ctx.learner.train()
        for _ in range(self.ctx.train.iters_per_epoch):
            x, t_logits, terms = self.synth.synthesize()
            self.learner.remember(x, t_logits)
            yield Batch(x=x, targets=t_logits, extra={"terms": terms})

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        terms = dict(batch.extra["terms"])
        if self.ctx.epoch >= self.opts.warmup:        # the first `warmup` epochs only synthesize
            terms.update(self.learner.learn(batch.x, batch.targets, self.synth.sample))
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
        replay = self.learner.replay
        if replay is not None and len(replay):
            return replay.data["x"][:min(n, len(replay))].clone()
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
    needs_metadata: bool = False  # the ``metadata`` option is recorded on the teacher's training data (lopes);
    #                               `dfkt bench` records it there itself, as the teacher's owner would
    name = "?"                   # set by register()
    task = "dfkd"
    needs_learner_bn = False
    needs_index = False
    trains = True

    def __post_init__(self) -> None:
        self.__doc__ = self.summary          # the registry's method table reads these
        self.__module__ = self.module

    def __call__(self, ctx: Context, opts: Any) -> DFKDMethod:
        return DFKDMethod(ctx, opts, self)

    def train_defaults(self, train: Any) -> dict:
        """The training defaults for a run configured with ``train`` (the user's TrainConfig, before
        defaults): the method's ``defaults``, with ``epochs`` = :data:`BUDGETED_EPOCHS` when a time budget
        is set."""
        d = dict(self.defaults)
        if train.time_budget_s is not None:
            d["epochs"] = BUDGETED_EPOCHS
        return d


DEFAULTS = {"epochs": 20, "iters_per_epoch": 50, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4}
BUDGETED_EPOCHS = 1000   # epochs with a time budget: an upper bound (the budget ends the run)
