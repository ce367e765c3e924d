"""The Python API: ``adapt`` (SFDA), ``distill`` (DFKD), ``train_supervised`` and ``load``.

Each call: options -> typed configs -> method (from the one registry) -> :func:`fit` -> :class:`Result`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import config_hash, from_dict, to_dict
from .core import distributed as dist
from .core.checkpoint import load_model, save_model
from .core.context import Context, TrainConfig
from .core.device import resolve_device, seed_everything
from .core.evaluate import accuracy, evaluate, label_free_scores, predict, reestimate_bn
from .core.guard import CollapseGuard, GuardPolicy, Reference, guard_finish
from .core.hooks import batchnorm_layers
from .core.loader import dataset_len
from .core.loop import History, fit
from .core.method import Method
from .core.supervised import Supervised, SupervisedOptions
from .errors import CollapseError, ConfigError, DataError, ModelError, suggest
from .models import check_input
from .models.split import adopt, num_classes_of, restore_outputs
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
    tc = from_dict(TrainConfig, train_d, "train")
    rule = getattr(method_cls, "train_defaults", None)    # defaults that depend on the run (DFKD: the budget)
    return opts, tc.resolved(rule(tc) if rule is not None else method_cls.defaults)


def fingerprint(method: str, opts: Any, tc: TrainConfig, extra: dict | None = None) -> str:
    volatile = {"checkpoint_dir", "progress", "checkpoint_every", "eval_every", "num_workers", "device",
                "time_budget_s", "log_dir"}
    d = {"method": method, "options": to_dict(opts),
         "train": {k: v for k, v in to_dict(tc).items() if k not in volatile}, **(extra or {})}
    return config_hash(d)


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


def _labels_of(dataset) -> torch.Tensor | None:
    labels = getattr(dataset, "labels", None)
    if torch.is_tensor(labels):
        return labels
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, int) for t in targets[:1]):
        return torch.as_tensor(targets)
    return None


def _labelled(dataset) -> bool:
    labels = _labels_of(dataset)
    if labels is not None:
        return bool((labels >= 0).any())
    item = dataset[0]
    y = item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else -1
    return int(torch.as_tensor(y).reshape(-1)[0]) >= 0


def _label_hint(dataset) -> str:
    """' (its labels start at 1, ...)' when a data set's labels look 1-based."""
    labels = _labels_of(dataset)
    if labels is None or not bool((labels >= 0).any()):
        return ""
    valid = labels[labels >= 0]
    if int(valid.min()) == 1:
        return (f" (its labels run from 1 to {int(valid.max())}: dfkt counts classes from 0, so subtract 1 "
                f"from every label)")
    folders = getattr(dataset, "classes", None)
    return f" (class folders: {', '.join(map(str, folders))})" if folders else ""


def _check_train_labels(dataset) -> None:
    item = dataset[0]
    t = torch.as_tensor(item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else -1)
    if t.is_floating_point():
        raise DataError(f"training labels are floats (e.g. {float(t.reshape(-1)[0]):g}); class labels must be "
                        f"integers 0..K-1: convert them (.long()) or argmax one-hot / soft labels.")
    if int(t.reshape(-1)[0]) < 0 and not _labelled(dataset):
        raise DataError("the training set has no labels (an unlabeled set yields -1); supervised training needs "
                        "labelled samples.")


def _check_class_names(model: nn.Module, data) -> None:
    """A labelled data set whose class folders map names to other indices than the model's is refused."""
    mine = getattr(model, "dfkt_classes", None)
    theirs = getattr(data, "classes", None) if data is not None else None
    if not mine or not theirs or list(map(str, theirs)) == list(mine):
        return
    diff = next(((i, a, b) for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    where = (f"index {diff[0]} is {diff[1]!r} for the model but {diff[2]!r} for the data" if diff else
             f"the model knows {len(mine)} classes, the data {len(theirs)}")
    raise DataError(f"the data's class folders map class names to other label indices than the model was trained "
                    f"with ({where}); give the target the same class folders (names) as the source, or relabel it. "
                    f"Model classes: {', '.join(mine[:20])}{' ...' if len(mine) > 20 else ''}.")


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
    model = restore_outputs(model)     # the model returns what the caller's did (tuple/dict outputs)
    model = ctx.caller_layout(model)   # ... in the caller's layout (the run may have used channels_last)
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
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"out={str(out)!r} is an existing file; `out` names a folder (model.pt, history.json "
                          f"and resume.pt go in it): pass a folder path.")
    device = resolve_device(train.device)
    dist.init_from_env(device)
    if out is not None and train.checkpoint_dir is None:
        train.checkpoint_dir = str(Path(out))
    return device, seed_everything(train.seed)


def _own_copy(model: nn.Module, device, shape: tuple, role: str, trains: bool = True, warn: bool = True) -> nn.Module:
    """The copy of ``model`` a run works on: float32, on ``device``, checked against the input shape,
    its head found and checked (``adopt``: logits-only outputs); the caller's model is never changed."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"the {role} must be a torch nn.Module, got {type(model).__name__}.")
    m = copy.deepcopy(dist.unwrap(model))
    low = sorted({str(t.dtype).replace("torch.", "") for t in list(m.parameters()) + list(m.buffers())
                  if t.is_floating_point() and t.dtype != torch.float32})
    if low and warn:
        log.warning("the %s holds %s tensors; dfkt works on a float32 copy (mixed precision on CUDA comes "
                    "from train.amp)", role, "/".join(low))
    if low:
        m = m.float()
    m = m.to(device)
    params = list(m.parameters())
    if trains and params and not any(p.requires_grad for p in params):
        log.warning("every parameter of the %s is frozen (requires_grad=False); dfkt unfreezes them in its copy "
                    "and the method chooses which ones train (e.g. SHOT: all but the head; tent: the "
                    "normalisation layers' scale/shift)", role)
        for p in params:
            p.requires_grad_(True)
    check_input(m, shape)
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    adopt(m, example)
    m.dfkt_input_shape = [int(v) for v in shape]
    if not trains:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return m


def _check_classes(n: int, role: str) -> None:
    if n < 2:
        raise ModelError(f"the {role}'s head has {n} output; a classifier needs at least 2 classes (for a "
                         f"binary task give it 2 outputs).")


def _check_pair(teacher: nn.Module, student: nn.Module, num_classes: int | None, t_role: str = "teacher",
                s_role: str = "student") -> int:
    """The teacher's class count, checked: a classifier, the student predicts the same classes, and
    ``num_classes`` (when given) agrees with the teacher's head."""
    t_cls, s_cls = num_classes_of(teacher), num_classes_of(student)
    _check_classes(t_cls, t_role)
    if t_cls != s_cls:
        raise ModelError(f"the {t_role} has {t_cls} classes but the {s_role} has {s_cls}; the {s_role} must predict the "
                         f"same classes: build it with num_classes={t_cls}.")
    if num_classes is not None and num_classes != t_cls:
        raise ModelError(f"num_classes={num_classes} but the {t_role}'s head has {t_cls} outputs; fix num_classes "
                         f"or use the right {t_role}.")
    return t_cls


def adapt(model: nn.Module, target, method: str = "shot", *, num_classes: int | None = None,
          eval_data=None, train: TrainConfig | dict | None = None, out: str | Path | None = None,
          resume: bool = False, **options: Any) -> Result:
    """Source-free domain adaptation of ``model`` to the unlabeled ``target`` data set.

    ``target`` yields ``(x, y, index)``; ``y`` is used only to *score* (reported accuracy), never
    to train or select; an unlabeled target (``y = -1``) reports label-free scores only. ``options``
    mix method options (e.g. ``beta=0.1``) and training options (``epochs``, ``lr``, ``batch_size``,
    ``device``, ``seed``...). ``seed`` fixes the run (data order, augmentations, dropout), not
    ``model``'s initial weights: build it with ``build_model(..., seed=)`` (or call
    ``torch.manual_seed`` first) for those. Returns a :class:`Result` with the adapted model
    (``model`` itself is not modified).
    """
    cls = get_method(method, task="sfda")
    opts, tc = split_options(cls, options, train)
    device, rng = _prepare(tc, out)
    _check_indexed(target, cls)
    shape = _sample_shape(target)
    learner = _own_copy(model, device, shape, "model")
    head_classes = num_classes_of(learner)
    _check_classes(head_classes, "model")
    if num_classes is not None and num_classes != head_classes:
        raise ModelError(f"the model's head has {head_classes} outputs but num_classes={num_classes}; "
                         f"adapt a model trained on the same {num_classes} classes, or fix num_classes.")
    if cls.needs_learner_bn:
        batchnorm_layers(learner, cls.name)
    n_target_classes = getattr(target, "num_classes", 0) or 0
    if n_target_classes > head_classes:
        raise ModelError(f"the target data set has {n_target_classes} classes but the model's head has "
                         f"{head_classes}{_label_hint(target)}; SFDA here assumes the same label space (closed set).")
    for data in (target, eval_data):
        _check_class_names(learner, data)
    ctx = Context(learner=learner, teacher=_own_copy(model, device, shape, "model", trains=False, warn=False), train=tc, device=device,
                  num_classes=head_classes, input_shape=shape, target=target, rng=rng)
    view = getattr(target, "eval_view", None)
    view = target if view is None else view
    scored = eval_data if eval_data is not None else view
    # the source model on the target: epoch 0 of the collapse guard (labels: reported accuracy only)
    src = predict(ctx.teacher, view, device, features=True)
    ctx.share_pass(src)     # the learner starts as this model: its first pseudo-labels / banks read this pass
    source_metrics = (_scores(src) if scored is view else evaluate(ctx.teacher, scored, device, label_free=True))
    # the reference: the source model with its BatchNorm statistics re-estimated on the target (AdaBN),
    # the unadapted model's best guess about the target; methods may anchor to it, the guard compares with
    # it. A method that trains nothing (source-only, AdaBN: the reference itself) needs neither.
    guard = None
    if cls.trains:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ctx.teacher.modules())
        ref_logits = (predict(reestimate_bn(copy.deepcopy(ctx.teacher), view, device), view, device)["logits"]
                      if has_bn else src["logits"])       # without BN the reference is the source pass
        ctx.reference = Reference(ref_logits, source_logits=src["logits"])
        guard = CollapseGuard(ctx.reference, GuardPolicy(), tc.on_collapse)
    del src

    def eval_fn(m: nn.Module) -> dict:
        # one pass over the target per epoch serves the reported scores, the guard and (shared with
        # the method) the next epoch's pseudo-labels / bank refresh
        out = predict(m, view, device, features=True)
        if dist.unwrap(m) is dist.unwrap(ctx.learner):   # (a method may deploy another model, e.g. an EMA)
            ctx.share_pass(out)
        res = _scores(out if scored is view else predict(m, scored, device))
        if guard is None:
            return res
        logits = out["logits"]
        g = guard.observe(ctx.epoch + 1, logits, m)       # never sees a label
        res.update({f"guard_{k}": v for k, v in g.items() if k != "epoch"})
        if g["collapsed"] and tc.on_collapse == "stop":
            raise CollapseError(f"adaptation collapsed at epoch {g['epoch']}: {guard.reasons[g['epoch']]} "
                                f"(on_collapse: stop; use 'rollback' to get the best epoch back instead).")
        return res

    def finish(model: nn.Module, history: History, metrics: dict):
        if guard is None:
            return model, metrics, None
        return guard_finish(guard, model, ctx.teacher, history, metrics, source_metrics, cls.name)

    method = cls(ctx, opts)
    if guard is not None:
        method.track("collapse_guard", guard)   # resumed runs keep the guard's history and best epoch
    return _run(cls, ctx, opts, eval_fn, out, resume, {"target": getattr(target, "name", type(target).__name__)},
                make_method=lambda: method, finish=finish)


def _scores(out: dict) -> dict:
    """Accuracy (where labels exist; only reported) and the label-free scores of one prediction pass; an
    unlabeled target has no 'acc'."""
    acc = {"acc": accuracy(out["logits"], out["labels"])} if bool((out["labels"] >= 0).any()) else {}
    return {**acc, **label_free_scores(out["logits"])}


def distill(teacher: nn.Module, student: nn.Module, method: str = "dafl", *, input_shape: tuple,
            num_classes: int | None = None, eval_data=None, train: TrainConfig | dict | None = None,
            out: str | Path | None = None, resume: bool = False, **options: Any) -> Result:
    """Data-free distillation of ``teacher`` into ``student`` on inputs of ``input_shape`` (C, H, W).

    No training data is used; ``eval_data`` (optional, labelled) only scores the student. ``seed``
    fixes the run, not the student's initial weights (build it with ``build_model(..., seed=)``).
    """
    cls = get_method(method, task="dfkd")
    opts, tc = split_options(cls, options, train)
    device, rng = _prepare(tc, out)
    input_shape = tuple(int(s) for s in input_shape)
    teacher = _own_copy(teacher, device, input_shape, "teacher", trains=False)
    student = _own_copy(student, device, input_shape, "student")
    t_classes = _check_pair(teacher, student, num_classes)
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
    ``augment`` and the training options (epochs, lr, batch_size, ...). ``seed`` fixes the run, not
    ``model``'s initial weights: build it with ``build_model(..., seed=)`` for reproducible ones.
    """
    opts, tc = split_options(Supervised, options, train)
    device, rng = _prepare(tc, out)
    shape = _sample_shape(train_set)
    learner = _own_copy(model, device, shape, "model")
    n_cls = num_classes_of(learner)
    _check_classes(n_cls, "model")
    _check_train_labels(train_set)
    labels = getattr(train_set, "labels", None)
    if labels is not None and int(labels.max()) >= n_cls:
        raise ModelError(f"training labels go up to {int(labels.max())} but the model has {n_cls} outputs"
                         f"{_label_hint(train_set)}; build the model with num_classes={int(labels.max()) + 1}.")
    if val_set is not None and not _labelled(val_set):
        raise DataError("the validation set has no labels; train_supervised selects the epoch by validation "
                        "accuracy: give a labelled val set, or none.")
    names = getattr(train_set, "classes", None)
    if names:
        _check_class_names(learner, val_set)
        learner.dfkt_classes = [str(c) for c in names]    # saved in model.pt; checked against targets
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
