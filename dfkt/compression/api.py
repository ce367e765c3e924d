"""``dfkt.compress``: a source model + unlabeled target images -> a small student for the target.

A recipe (registered with task ``compress``) is a short sequence of stages, each one the library's own:

* ``job.adapt(model)``: SFDA of a model on the target (:func:`dfkt.adapt`, collapse guard included);
* ``job.distil_on_target(teacher, student)``: the teacher's predictions on the real target images into the
  student (:class:`dfkt.compression.student.TargetKD`, the one loop);
* ``job.distil_data_free(teacher, student)``: data-free distillation (:func:`dfkt.distill`).

Target labels, where the target has them, only score the stages (``acc``); nothing trains or selects on them.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .. import api
from ..config import config_hash, from_dict, to_dict
from ..core import distributed as dist
from ..core.checkpoint import save_model
from ..core.context import Context, TrainConfig
from ..core.device import resolve_device
from ..core.evaluate import evaluate
from ..errors import ConfigError, DataError, ModelError, suggest
from ..models.split import num_classes_of
from ..registry import get_method
from .student import TargetKD, TargetKDOptions

log = logging.getLogger("dfkt")

DEFAULT = "adapt-kd-st"

# TrainConfig keys that apply to every stage of a recipe; the stages' own epochs, lr... are recipe options
COMMON_TRAIN_KEYS = ("seed", "device", "amp", "num_workers", "progress", "on_collapse", "max_bad_steps",
                     "neighbour_index", "memory_format")


@dataclass
class CompressResult(api.Result):
    """A compress run: ``model`` is the student; ``metrics`` hold ``acc`` (the student on the target or
    ``eval_data``, where labelled), ``teacher_acc`` (the adapted teacher, for recipes that adapt it),
    ``ref_acc`` (the unadapted source model), ``student_params``, ``teacher_params``; ``stages`` one row
    per stage (name, method, wall_s, acc)."""

    teacher: Optional[nn.Module] = None
    stages: list[dict] = field(default_factory=list)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _weights_digest(model: nn.Module) -> str:
    """A hash of a model's state: every entry's name, dtype and bytes."""
    h = hashlib.sha1()
    for k, v in dist.unwrap(model).state_dict().items():
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fingerprint(*parts: Any) -> str:
    """A hash of models (their weights' digests) and settings (:func:`~dfkt.config.config_hash`)."""
    return config_hash([_weights_digest(p) if isinstance(p, nn.Module) else p for p in parts], length=16)


@dataclass
class Job:
    """What a recipe works with: the caller's models (never modified), the target, the common settings."""

    source: nn.Module
    student: nn.Module
    target: Any
    eval_data: Any
    train: dict                     # the COMMON_TRAIN_KEYS given
    input_shape: tuple
    stages: list[dict] = field(default_factory=list)
    cache: Optional[Path] = None    # where stages that never read the target are kept for reuse (or None)

    def _record(self, stage: str, method: str, res: api.Result, reused: bool = False) -> api.Result:
        self.stages.append({"stage": stage, "method": method, "wall_s": round(res.wall_s, 3),
                            "acc": res.metrics.get("acc"), **({"reused": True} if reused else {})})
        return res

    @property
    def reused_s(self) -> float:
        """The time of the stages taken from the cache (their original run's wall time)."""
        return sum(s["wall_s"] for s in self.stages if s.get("reused"))

    def adapt(self, model: nn.Module, method: str, options: dict, stage: str = "adapt") -> api.Result:
        """SFDA of ``model`` on the target (the guarded model comes back)."""
        res = api.adapt(model, self.target, method=method, eval_data=self.eval_data, train=dict(self.train),
                        **options)
        return self._record(stage, method, res)

    def distil_on_target(self, teacher: nn.Module, student: nn.Module, options: TargetKDOptions,
                         epochs: int, lr: float, batch_size: int, min_steps: int = 0,
                         stage: str = "distil") -> api.Result:
        """The teacher's predictions on the target images into the student (TargetKD), for ``epochs`` passes
        over the target or at least ``min_steps`` steps."""
        per_epoch = max(1, math.ceil(len(self.target) / batch_size))
        epochs = max(epochs, math.ceil(min_steps / per_epoch))
        tc = from_dict(TrainConfig, {**self.train, "epochs": epochs, "lr": lr, "batch_size": batch_size},
                       "train").resolved(TargetKD.defaults)
        tc.eval_every = max(1, epochs // 3)
        device, rng = api._prepare(tc, None)
        teacher = api._own_copy(teacher, device, self.input_shape, "teacher", trains=False, warn=False)
        learner = api._own_copy(student, device, self.input_shape, "student", warn=False)
        ctx = Context(learner=learner, teacher=teacher, train=tc, device=device, num_classes=num_classes_of(teacher),
                      input_shape=self.input_shape, target=self.target, rng=rng)
        view = getattr(self.target, "eval_view", None)
        scored = self.eval_data if self.eval_data is not None else (self.target if view is None else view)
        res = api._run(TargetKD, ctx, options, lambda m: evaluate(m, scored, device), None, False,
                       {"target": getattr(self.target, "name", type(self.target).__name__)})
        return self._record(stage, TargetKD.name, res)

    def distil_data_free(self, teacher: nn.Module, student: nn.Module, method: str, options: dict,
                         time_budget_s: float, stage: str = "distil-data-free") -> api.Result:
        """Data-free distillation of ``teacher`` into ``student`` (no target image is used).

        The stage never reads the target, so with ``cache`` set its student is kept there and reused by any
        later call with the same teacher weights, student (architecture and initial weights), method,
        options, budget and settings: one source model compressed for several targets distils once. The
        reused stage is scored again on this call's data and counted at its original wall time."""
        train = {**self.train, "time_budget_s": time_budget_s}
        eval_data = self.eval_data if self.eval_data is not None else self.target
        path = None
        if self.cache is not None:
            settings = {k: v for k, v in train.items() if k not in ("progress", "num_workers", "device")}
            key = _fingerprint(teacher, student, [method, options, settings, list(self.input_shape)])
            path = self.cache / f"{method.replace('+', '_')}-{key}.pt"
            if path.exists():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                model = copy.deepcopy(dist.unwrap(student))
                model.load_state_dict(saved["state"])
                device = resolve_device(self.train.get("device", "auto"))
                model = model.to(device).eval()
                log.info("%s: the data-free student of an earlier call with the same source model, student and "
                         "settings is reused (%s)", stage, path.name)
                res = api.Result(model=model, method=method, history=api.History(),
                                 metrics=evaluate(model, eval_data, device), wall_s=float(saved["wall_s"]))
                return self._record(stage, method, res, reused=True)
        res = api.distill(teacher, student, method=method, input_shape=self.input_shape, train=train,
                          eval_data=eval_data, **options)
        if path is not None and dist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"state": dist.unwrap(res.model).state_dict(), "wall_s": res.wall_s}, tmp)
            os.replace(tmp, path)
        return self._record(stage, method, res)


class Recipe(abc.ABC):
    """Base of the compress recipes: ``Options`` (a dataclass) and ``run(job) -> (student result,
    adapted-teacher result or None)``."""

    name: ClassVar[str] = "?"
    task: ClassVar[str] = "compress"
    Options: ClassVar[type]

    def __init__(self, opts: Any):
        self.opts = opts

    @abc.abstractmethod
    def run(self, job: Job) -> tuple[api.Result, Optional[api.Result]]:
        """Chain the stages on ``job``; return the student's result and the adapted teacher's (or None)."""


def _check_target(target) -> None:
    from ..core.loader import dataset_len

    dataset_len(target)
    if api._tensor_pair(target):
        return
    item = target[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 3):
        got = f"{type(item).__name__} of length {len(item) if isinstance(item, (tuple, list)) else 1}"
        raise DataError(f"dfkt.compress reads the target as (x, y, index) samples (the index addresses each "
                        f"image's teacher prediction and pseudo-label), but it yields {got}. Wrap it: "
                        f"dfkt.data.IndexedDataset(target) (y = -1 where there are no labels).")


def _common_train(train, recipe: type) -> dict:
    d = to_dict(train) if dataclasses.is_dataclass(train) else dict(train or {})
    if dataclasses.is_dataclass(train):     # a TrainConfig: keep what was set (None = the stages' defaults)
        d = {k: v for k, v in d.items() if k in COMMON_TRAIN_KEYS}
    bad = [k for k in d if k not in COMMON_TRAIN_KEYS]
    if bad:
        fields = {f.name for f in dataclasses.fields(recipe.Options)}
        raise ConfigError(f"train.{bad[0]} does not apply to a compress run as a whole: each stage has its own "
                          f"settings, set as recipe {recipe.name!r} options ({', '.join(sorted(fields))})."
                          + suggest(bad[0], sorted(fields)) + f" Common settings: {', '.join(COMMON_TRAIN_KEYS)}.")
    return d


def compress(source_model: nn.Module, student: nn.Module, target, method: str = DEFAULT, *,
             num_classes: int | None = None, eval_data=None, train: TrainConfig | dict | None = None,
             out: str | Path | None = None, cache: str | Path | None = None, **options: Any) -> CompressResult:
    """Source-free compression: a ``student`` for the unlabeled ``target``, from ``source_model`` alone.

    ``student`` is any classifier for the same classes (normally smaller: a larger one is allowed, with a
    warning); it is trained from its given weights. ``target`` yields ``(x, y, index)`` (``y`` only scores).
    ``method``: a compress recipe (``dfkt list --task compress``); the default, ``adapt-kd-st``, adapts the
    source model (SFDA, collapse guard) and distils it into the student on the target images with the
    student's own self-training terms. ``options``: the recipe's options (e.g. ``adapt='shot'``,
    ``student_epochs=30``) and the settings every stage shares (``seed``, ``device``, ``progress``,
    ``on_collapse``...). ``cache``: a folder where stages that never read the target (the data-free
    distillation of ``baseline-b``) are kept and reused by later calls with the same source model, student
    and settings, e.g. one source model compressed for several sites. Neither model is modified. Returns a
    :class:`CompressResult` (its ``wall_s`` counts a reused stage at its original time).
    """
    cls = get_method(method, task="compress")
    train_d = _common_train(train, cls)
    opt_fields = {f.name for f in dataclasses.fields(cls.Options)}
    method_d = {}
    for k, v in options.items():
        if k in opt_fields:
            method_d[k] = v
        elif k in COMMON_TRAIN_KEYS:
            train_d[k] = v
        else:
            raise ConfigError(f"unknown option {k!r} for compress recipe {cls.name!r}."
                              + suggest(k, sorted(opt_fields | set(COMMON_TRAIN_KEYS)))
                              + f" Recipe options: {', '.join(sorted(opt_fields))}; settings of every stage: "
                                f"{', '.join(COMMON_TRAIN_KEYS)}.")
    opts = from_dict(cls.Options, method_d, f"{cls.name} options")
    from_dict(TrainConfig, train_d, "train")            # types checked before any work
    for role, m in (("source model", source_model), ("student", student)):
        if not isinstance(m, nn.Module):
            raise ModelError(f"the {role} must be a torch nn.Module, got {type(m).__name__}.")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"out={str(out)!r} is an existing file; `out` names a folder (model.pt, teacher.pt go "
                          f"in it): pass a folder path.")
    if cache is not None and Path(cache).exists() and not Path(cache).is_dir():
        raise ConfigError(f"cache={str(cache)!r} is an existing file; `cache` names a folder: pass a folder path.")
    _check_target(target)
    shape = api._sample_shape(target)
    device = resolve_device(train_d.get("device", "auto"))
    src = api._own_copy(source_model, device, shape, "source model", trains=False)
    stu = api._own_copy(student, device, shape, "student", warn=False)
    t_cls = api._check_pair(src, stu, num_classes, "source model")
    n_target = getattr(target, "num_classes", 0) or 0
    if n_target > t_cls:
        raise ModelError(f"the target data set has {n_target} classes but the source model has {t_cls}; "
                         f"compression here assumes the same label space (closed set).")
    t_params, s_params = _params(src), _params(stu)
    if s_params > t_params:
        log.warning("the student has more parameters (%d) than the source model (%d): dfkt.compress runs, but "
                    "the result is no compression; pass a smaller student", s_params, t_params)
    del src, stu
    job = Job(source=source_model, student=student, target=target, eval_data=eval_data, train=train_d,
              input_shape=shape, cache=Path(cache) if cache is not None else None)
    t0 = time.perf_counter()
    ref = evaluate(api._own_copy(source_model, device, shape, "source model", trains=False, warn=False),
                   eval_data if eval_data is not None else target, device)
    student_res, teacher_res = cls(opts).run(job)
    wall = time.perf_counter() - t0 + job.reused_s     # a reused stage at its original time
    metrics = dict(student_res.metrics)
    metrics.update({"teacher_acc": teacher_res.metrics.get("acc") if teacher_res is not None else None,
                    "ref_acc": ref.get("acc"), "student_params": s_params, "teacher_params": t_params})
    cfg = {"method": cls.name, "task": "compress", "options": to_dict(opts), "train": train_d, "stages": job.stages}
    path = None
    if out is not None and dist.is_main():
        out = Path(out)
        path = save_model(out / "model.pt", student_res.model, method=cls.name, config=cfg, metrics=metrics)
        if teacher_res is not None:
            save_model(out / "teacher.pt", teacher_res.model, method=teacher_res.method, config=cfg,
                       metrics=teacher_res.metrics)
    return CompressResult(model=student_res.model, method=cls.name, history=student_res.history, metrics=metrics,
                          config=cfg, wall_s=wall, path=path, guard=teacher_res.guard if teacher_res else None,
                          teacher=teacher_res.model if teacher_res is not None else None, stages=job.stages)
