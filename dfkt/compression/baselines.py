"""The three ways to chain ``dfkt.adapt`` and ``dfkt.distill`` by hand (the compress baselines).

All three use the same stages and settings as dfkt's recipe (:mod:`dfkt.compression.adapt_kd_st`); they
differ in the order of the stages and in what the student learns from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..registry import register
from .api import Job, Recipe
from .options import StageOptions
from .student import TargetKDOptions


@register("baseline-a", task="compress", family="compress")
class AdaptThenDistil(Recipe):
    """Adapt, then distil (dfkt): the source model is adapted to the target (SFDA), then distilled into the student on the target images (plain KD)."""

    Options = StageOptions

    def run(self, job: Job):
        o = self.opts
        teacher = job.adapt(job.source, o.adapt, o.adapt_options)
        student = job.distil_on_target(teacher.model, job.student, TargetKDOptions(temperature=o.temperature),
                                       o.student_epochs, o.student_lr, o.student_batch_size,
                                       o.student_min_steps)
        return student, teacher


@dataclass
class DataFreeOptions(StageOptions):
    dfkd: str = "dafl+adv"              # the DFKD method (at its registered defaults: dfkd-mnist's best recipe)
    dfkd_options: dict = field(default_factory=dict)    # options of the DFKD method over its defaults
    dfkd_time_s: float = 300.0          # training-time budget of the data-free stage (seconds): the budget
    #                                     the DFKD method is benchmarked at (dafl+adv, dfkd-mnist: 300 s).
    #                                     60 s (the old default) left the student at 10-30 % on the targets.

    def validate(self, where: str = "options") -> None:
        from ..registry import get_method

        super().validate(where)
        get_method(self.dfkd, task="dfkd")


@register("baseline-b", task="compress", family="compress")
class DataFreeThenAdapt(Recipe):
    """Distil data-free, then adapt (dfkt): the source model is distilled into the student without data (DFKD), then the student is adapted to the target (SFDA)."""

    Options = DataFreeOptions

    def run(self, job: Job):
        o = self.opts
        student = job.distil_data_free(job.source, job.student, o.dfkd, o.dfkd_options, o.dfkd_time_s)
        return job.adapt(student.model, o.adapt, o.adapt_options, stage="adapt-student"), None


@register("baseline-c", task="compress", family="compress")
class DistilThenAdapt(Recipe):
    """Distil on the target, then adapt (dfkt): the unadapted source model is distilled into the student on the target images, then the student is adapted (SFDA)."""

    Options = StageOptions

    def run(self, job: Job):
        o = self.opts
        student = job.distil_on_target(job.source, job.student, TargetKDOptions(temperature=o.temperature),
                                       o.student_epochs, o.student_lr, o.student_batch_size,
                                       o.student_min_steps)
        return job.adapt(student.model, o.adapt, o.adapt_options, stage="adapt-student"), None
