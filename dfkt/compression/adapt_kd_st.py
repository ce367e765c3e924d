"""dfkt's compress recipe: adapt the teacher, then teach the student on the target with self-training."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..registry import register
from .api import Job, Recipe
from .options import StageOptions
from .student import TargetKDOptions


@dataclass
class AdaptKDSTOptions(StageOptions):
    augment: Literal["none", "shift", "affine"] = "shift"   # the student's view (TargetKDOptions.augment)
    im: float = 0.3             # the student's information maximisation (confident, balanced predictions)
    refine: float = 0.3         # CE to labels re-clustered in the student's feature space each epoch ...
    refine_start: float = 0.5   # ... from half the student stage on


@register("adapt-kd-st", task="compress", family="compress")
class AdaptKDST(Recipe):
    """Adapt, distil and self-train (dfkt): the source model is adapted (SFDA, collapse guard), then distilled on the target images into a student that also trains on its own (augmented views, information maximisation, re-clustered labels).

    Stages: (1) ``dfkt.adapt(source, target, method=adapt)``, the guarded adapted model being the teacher;
    (2) :class:`~dfkt.compression.student.TargetKD` with ``augment``, ``im`` and ``refine`` on. Why each
    term (what plain KD, baseline-a, lacks): the student fits the teacher's labels on exactly the images it
    is scored on, so plain KD reproduces the teacher's mistakes; the affine views make it learn the
    teacher's *classes* rather than each image's label (noisy labels are learnt last), IM keeps its
    predictions confident and balanced, and re-clustering its own features (SHOT's centroid labels, with
    the teacher's and the student's probabilities as weights) corrects labels that disagree with the
    target's cluster structure. Same defaults on every target; one size rule (all recipes): the student
    stage is ``student_epochs`` (30) passes over the target, but at least ``student_min_steps`` (900) steps,
    so a small target gets more passes (a student from scratch needs that many steps whatever the data size).
    """

    Options = AdaptKDSTOptions

    def run(self, job: Job):
        o = self.opts
        teacher = job.adapt(job.source, o.adapt, o.adapt_options)
        kd = TargetKDOptions(temperature=o.temperature, augment=o.augment, im=o.im, refine=o.refine,
                             refine_start=o.refine_start)
        student = job.distil_on_target(teacher.model, job.student, kd, o.student_epochs, o.student_lr,
                                       o.student_batch_size, o.student_min_steps)
        return student, teacher
