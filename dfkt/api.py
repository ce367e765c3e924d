"""The Python API: ``adapt`` (SFDA), ``distill`` (DFKD), ``train_supervised`` and ``load``.

Each call: options -> typed configs -> method (from the one registry) -> :func:`fit` -> :class:`Result`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import from_dict, to_dict
from .core import distributed as dist
from .core.checkpoint import load_model, save_model
from .core.context import Context, TrainConfig
from .core.device import resolve_device, seed_everything
from .core.evaluate import accuracy, evaluate, label_free_scores, predict
from .core.guard import CollapseGuard, GuardPolicy, Reference, guard_finish
from .core.hooks import batchnorm_layers
from .core.loader import dataset_len
from .core.loop import History, fit
from .core.method import Method
from .core.supervised import Supervised, SupervisedOptions
from .errors import CollapseError, ConfigError, DataError, ModelError, suggest
from .models import check_input
from .models.split import num_classes_of
from .registry import get_method

log = logging.getLogger("dfkt")

_TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class Result:
    """What a run returns: the trained model, its history, the final metrics and where it was saved."""

    model: nn.Module
    method: str
    history: History
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    wall_s: float = 0.0
    path: Optional[Path] = None
    synthesize: Optional[Callable[[int], torch.Tensor]] = None   # DFKD: draw n reconstructed inputs
    guard: Optional[dict] = None     # SFDA: what the collapse guard saw and did (see dfkt.core.guard)

    @property
    def acc(self) -> float:
        return float(self.metrics.get("acc", float("nan")))


def split_options(method_cls: type, options: dict, train: Any = None) -> tuple[Any, TrainConfig]:
    """Separate flat keyword options into the method's options and the loop's TrainConfig."""
    train_d = to_dict(train) if dataclasses.is_dataclass(train) else dict(train or {})
    opt_fields = {f.name for f in dataclasses.fields(method_cls.Options)}
    method_d = {}
    for k, v in options.items():
        if k in _TRAIN_KEYS and k not in opt_fields:
            train_d[k] = v
        elif k in opt_fields:
            method_d[k] = v
        else:
            raise ConfigError(f"unknown option {k!r} for method {method_cls.name!r}."
                              + suggest(k, sorted(opt_fields | _TRAIN_KEYS))
                              + f" Method options: {', '.join(sorted(opt_fields)) or 'none'}; "
                                f"training options: {', '.join(sorted(_TRAIN_KEYS))}.")
    opts = from_dict(method_cls.Options, method_d, f"{method_cls.name} options")
    tc = from_dict(TrainConfig, train_d, "train").resolved(method_cls.defaults)
    return opts, tc


def fingerprint(method: str, opts: Any, tc: TrainConfig, extra: dict | None = None) -> str:
    volatile = {"checkpoint_dir", "progress", "checkpoint_every", "eval_every", "num_workers", "device",
                "time_budget_s"}
    d = {"method": method, "options": to_dict(opts),
         "train": {k: v for k, v in to_dict(tc).items() if k not in volatile}, **(extra or {})}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _tensor_pair(dataset) -> bool:
    """In-memory (images, labels) tensors: the loaders add the sample index themselves."""
    t = getattr(dataset, "tensors", None)
    return isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(v, torch.Tensor) for v in t)


def _sample_shape(dataset) -> tuple:
    dataset_len(dataset)
    try:
        item = dataset[0]
    except IndexError:
        raise DataError("the data set is empty (0 samples); check its path, split or filter.") from None
    x = item[0] if isinstance(item, (tuple, list)) else item
    return tuple(torch.as_tensor(x).shape)


def _check_indexed(dataset, method_cls: type) -> None:
    dataset_len(dataset)   # empty / no length -> DataError before dataset[0]
    if _tensor_pair(dataset):
        return
    item = dataset[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 3):
        need = (f"method {method_cls.name!r} keeps per-sample memory banks and needs sample indices"
                if method_cls.needs_index else "dfkt loaders need (x, y, index) samples")
        raise DataError(f"{need}, but the target data set yields {type(item).__name__} of length "
                        f"{len(item) if isinstance(item, (tuple, list)) else 1}. Wrap it: "
                        f"dfkt.data.IndexedDataset(dataset).")


def _run(method_cls: type, ctx: Context, opts: Any, eval_fn, out, resume: bool, extra_meta: dict,
         make_method: Callable[[], Method] | None = None, finish: Callable | None = None) -> Result:
    """Fit the method; ``finish(model, history, metrics) -> (model, metrics, info)`` may replace the
    returned model (the SFDA collapse guard's rollback) before anything is saved."""
    method = make_method() if make_method else method_cls(ctx, opts)
    fp = fingerprint(method_cls.name, opts, ctx.train, extra_meta)
    cfg = {"method": method_cls.name, "task": method_cls.task, "options": to_dict(opts), "train": to_dict(ctx.train),
           **extra_meta}
    t0 = time.perf_counter()
    history = fit(method, eval_fn=eval_fn, resume=resume, meta={"fingerprint": fp, "config": json.dumps(cfg, default=str)})
    wall = time.perf_counter() - t0
    model = dist.unwrap(method.model())
    metrics = {k: v for k, v in history.last.items() if k not in ("epoch", "step")}
    info = None
    if finish is not None:
        model, metrics, info = finish(model, history, metrics)
    path = None
    if out is not None and dist.is_main():
        out = Path(out)
        path = save_model(out / "model.pt", model, method=method_cls.name, config=cfg, metrics=metrics)
        (out / "history.json").write_text(json.dumps({"config": cfg, "history": history.records,
                                                     "train_time_s": history.train_time_s}, indent=1, default=str))
    return Result(model=model, method=method_cls.name, history=history, metrics=metrics, config=cfg,
                  wall_s=history.train_time_s if history.train_time_s else wall, path=path,
                  synthesize=getattr(method, "synthesize", None), guard=info)


def _prepare(train: TrainConfig, out) -> tuple[torch.device, torch.Generator]:
    device = resolve_device(train.device)
    dist.init_from_env(device)
    if out is not None and train.checkpoint_dir is None:
        train.checkpoint_dir = str(Path(out))
    return device, seed_everything(train.seed)


def _frozen_copy(model: nn.Module, device) -> nn.Module:
    m = copy.deepcopy(dist.unwrap(model)).to(device).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def adapt(model: nn.Module, target, method: str = "shot", *, num_classes: int | None = None,
          eval_data=None, train: TrainConfig | dict | None = None, out: str | Path | None = None,
          resume: bool = False, **options: Any) -> Result:
    """Source-free domain adaptation of ``model`` to the unlabeled ``target`` data set.

    ``target`` yields ``(x, y, index)``; ``y`` is used only to *score* (reported accuracy), never
    to train or select. ``options`` mix method options (e.g. ``beta=0.1``) and training options
    (``epochs``, ``lr``, ``batch_size``, ``device``, ``seed``...). Returns a :class:`Result` with
    the adapted model (``model`` itself is not modified).
    """
    cls = get_method(method, task="sfda")
    opts, tc = split_options(cls, options, train)
    device, rng = _prepare(tc, out)
    head_classes = num_classes_of(model)
    if num_classes is not None and num_classes != head_classes:
        raise ModelError(f"the model's head has {head_classes} outputs but num_classes={num_classes}; "
                         f"adapt a model trained on the same {num_classes} classes, or fix num_classes.")
    _check_indexed(target, cls)
    shape = _sample_shape(target)
    learner = copy.deepcopy(dist.unwrap(model)).to(device)
    check_input(learner, shape)
    if cls.needs_learner_bn:
        batchnorm_layers(learner, cls.name)
    n_target_classes = getattr(target, "num_classes", 0) or 0
    if n_target_classes > head_classes:
        raise ModelError(f"the target data set has {n_target_classes} classes but the model's head has "
                         f"{head_classes}; SFDA here assumes the same label space (closed set).")
    ctx = Context(learner=learner, teacher=_frozen_copy(model, device), train=tc, device=device,
                  num_classes=head_classes, input_shape=shape, target=target, rng=rng)
    view = getattr(target, "eval_view", None)
    view = target if view is None else view
    scored = eval_data if eval_data is not None else view
    # the source model on the target: epoch 0 of the collapse guard (labels: reported accuracy only)
    src = predict(ctx.teacher, view, device, features=True)
    source_metrics = (_scores(src) if scored is view else evaluate(ctx.teacher, scored, device, label_free=True))
    guard = CollapseGuard(Reference(src["logits"], src["features"]), GuardPolicy(), tc.on_collapse)
    del src

    def eval_fn(m: nn.Module) -> dict:
        out = predict(m, scored, device)
        res = _scores(out)
        logits = out["logits"] if scored is view else predict(m, view, device)["logits"]
        g = guard.observe(ctx.epoch + 1, logits, m)       # never sees a label
        res.update({f"guard_{k}": v for k, v in g.items() if k != "epoch"})
        if g["collapsed"] and tc.on_collapse == "stop":
            raise CollapseError(f"adaptation collapsed at epoch {g['epoch']}: {guard.reasons[g['epoch']]} "
                                f"(on_collapse: stop; use 'rollback' to get the best epoch back instead).")
        return res

    def finish(model: nn.Module, history: History, metrics: dict):
        return guard_finish(guard, model, ctx.teacher, history, metrics, source_metrics, cls.name)

    method = cls(ctx, opts)
    method.track("collapse_guard", guard)   # resumed runs keep the guard's history and best epoch
    return _run(cls, ctx, opts, eval_fn, out, resume, {"target": getattr(target, "name", type(target).__name__)},
                make_method=lambda: method, finish=finish)


def _scores(out: dict) -> dict:
    """Accuracy (where labels exist; only reported) and the label-free scores of one prediction pass."""
    return {"acc": accuracy(out["logits"], out["labels"]), **label_free_scores(out["logits"])}


def distill(teacher: nn.Module, student: nn.Module, method: str = "dafl", *, input_shape: tuple,
            num_classes: int | None = None, eval_data=None, train: TrainConfig | dict | None = None,
            out: str | Path | None = None, resume: bool = False, **options: Any) -> Result:
    """Data-free distillation of ``teacher`` into ``student`` on inputs of ``input_shape`` (C, H, W).

    No training data is used; ``eval_data`` (optional, labelled) only scores the student.
    """
    cls = get_method(method, task="dfkd")
    opts, tc = split_options(cls, options, train)
    device, rng = _prepare(tc, out)
    input_shape = tuple(int(s) for s in input_shape)
    t_classes, s_classes = num_classes_of(teacher), num_classes_of(student)
    if t_classes != s_classes:
        raise ModelError(f"teacher has {t_classes} classes but student has {s_classes}; build the student "
                         f"with num_classes={t_classes}.")
    if num_classes is not None and num_classes != t_classes:
        raise ModelError(f"num_classes={num_classes} but the teacher's head has {t_classes} outputs; "
                         f"fix num_classes or use the right teacher.")
    teacher = _frozen_copy(teacher, device)
    student = copy.deepcopy(dist.unwrap(student)).to(device)
    check_input(teacher, input_shape)
    check_input(student, input_shape)
    if cls.needs_teacher_bn:
        batchnorm_layers(teacher, cls.name)
    if eval_data is not None:
        got = _sample_shape(eval_data)
        if tuple(got) != input_shape:
            raise DataError(f"eval_data samples have shape {got} but input_shape is {input_shape}; "
                            f"resize the evaluation data or fix input_shape.")
    ctx = Context(learner=student, teacher=teacher, train=tc, device=device, num_classes=t_classes,
                  input_shape=input_shape, rng=rng)
    eval_fn = (lambda m: evaluate(m, eval_data, device)) if eval_data is not None else None
    return _run(cls, ctx, opts, eval_fn, out, resume, {"input_shape": list(input_shape)})


class _BestEpoch(dict):
    """The best validation accuracy so far and the weights that reached it (saved for resume)."""

    def __init__(self):
        super().__init__(acc=-1.0, state=None)

    def state_dict(self) -> dict:
        return {"acc": float(self["acc"]), "state": self["state"]}

    def load_state_dict(self, state: dict) -> None:
        self["acc"], self["state"] = float(state["acc"]), state["state"]


def train_supervised(model: nn.Module, train_set, val_set=None, *, out: str | Path | None = None,
                     train: TrainConfig | dict | None = None, resume: bool = False, select_best: bool = True,
                     **options: Any) -> Result:
    """Supervised recipe for a source model / teacher; keeps the epoch with the best validation accuracy.

    Options: ``smoothing`` (0.1 = SHOT's source recipe), ``schedule`` ('poly' | 'cosine' | 'none'),
    ``augment`` and the training options (epochs, lr, batch_size, ...).
    """
    opts, tc = split_options(Supervised, options, train)
    device, rng = _prepare(tc, out)
    _sample_shape(train_set)
    n_cls = num_classes_of(model)
    labels = getattr(train_set, "labels", None)
    if labels is not None and int(labels.max()) >= n_cls:
        raise ModelError(f"training labels go up to {int(labels.max())} but the model has {n_cls} outputs; "
                         f"build the model with num_classes={int(labels.max()) + 1}.")
    learner = copy.deepcopy(model).to(device)
    check_input(learner, _sample_shape(train_set))
    ctx = Context(learner=learner, teacher=None, train=tc, device=device, num_classes=n_cls,
                  input_shape=_sample_shape(train_set), rng=rng)
    best = _BestEpoch()

    def eval_fn(m: nn.Module) -> dict:
        res = evaluate(m, val_set, device) if val_set is not None else {}
        if select_best and val_set is not None and res["acc"] >= best["acc"]:  # ties: the latest
            best["acc"] = res["acc"]
            best["state"] = {k: v.detach().clone() for k, v in dist.unwrap(m).state_dict().items()}
        return {"val_acc": res["acc"]} if res else {}

    method = Supervised(ctx, opts, train_set)
    method.track("best_epoch", best)     # in resume checkpoints: a resumed run selects among all epochs
    res = _run(Supervised, ctx, opts, eval_fn if val_set is not None else None, None, resume,
               {"train_set": getattr(train_set, "name", "?")}, make_method=lambda: method)
    if best["state"] is not None:
        res.model.load_state_dict(best["state"])
        res.metrics["val_acc"] = best["acc"]
    if out is not None and dist.is_main():
        res.path = save_model(Path(out) / "model.pt", res.model, method="supervised", config=res.config,
                              metrics=res.metrics)
    return res


def load(path: str | Path, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by dfkt (deployable ``model.pt`` or a ``resume.pt``)."""
    return load_model(path, model=model, device=resolve_device(device))
