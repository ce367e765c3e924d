"""``dfkt.tta``: play a test stream through an online method; score the predictions made before each update."""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..api import fingerprint, split_options
from ..config import to_dict
from ..core.checkpoint import atomic_save, save_model
from ..core.context import Context, TrainConfig
from ..core.device import resolve_device, seed_everything
from ..core.loop import History, fit
from ..errors import ConfigError, DataError, ModelError
from ..models import check_input
from ..models.split import num_classes_of
from ..registry import get_method
from .stream import Stream, StreamPlan, check_protocol

log = logging.getLogger("dfkt")


@dataclass
class TTAResult:
    """What :func:`tta` returns. ``predictions[i]`` is the class predicted for stream sample ``i``
    before the model adapted on its batch; ``labels`` (-1 = unlabeled) only score them."""

    model: nn.Module
    method: str
    protocol: str
    predictions: torch.Tensor
    labels: torch.Tensor
    segment: torch.Tensor               # origin segment of every sample (in stream order)
    segment_names: list[str]
    batches: list[tuple[int, int]]      # (start, end) stream positions of every batch, in order
    history: History
    wall_s: float
    config: dict = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def samples_per_s(self) -> float:
        return len(self.predictions) / self.wall_s if self.wall_s > 0 else float("nan")

    def _err(self, mask: torch.Tensor) -> float:
        m = mask & (self.labels >= 0)
        if not bool(m.any()):
            return float("nan")
        return float((self.predictions[m] != self.labels[m]).float().mean() * 100)

    @property
    def err(self) -> float:
        """Error % over all labelled samples of the stream."""
        return self._err(torch.ones_like(self.labels, dtype=torch.bool))

    def errors(self) -> dict[str, float]:
        """Error % per segment (per corruption; in ``mixed`` by each sample's origin)."""
        return {n: self._err(self.segment == s) for s, n in enumerate(self.segment_names)}

    @property
    def mean_err(self) -> float:
        """Mean of the per-segment errors (the "mean" column of the public TTA tables)."""
        errs = [e for e in self.errors().values() if e == e]
        return sum(errs) / len(errs) if errs else float("nan")

    def batch_predictions(self) -> list[torch.Tensor]:
        return [self.predictions[s:e] for s, e in self.batches]


def _sample_shape(stream: Stream) -> tuple:
    x = stream.fetch(0, 1, torch.device("cpu"))
    return tuple(x.shape[1:])


def tta(model: nn.Module, stream: Any, method: str = "tent", *, protocol: str | None = None, shuffle: bool = True,
        chunk_batches: int = 50, source_data=None, num_classes: int | None = None,
        train: TrainConfig | dict | None = None, out: str | Path | None = None, resume: bool = False,
        **options: Any) -> TTAResult:
    """Online test-time adaptation of ``model`` on ``stream``: every batch is predicted, then adapted on.

    ``stream``: a :class:`dfkt.online.Stream`, one data set, a mapping ``name -> data set`` or a list of
    data sets (segments, e.g. one per corruption), played by ``protocol`` ('continual' by default,
    'mixed' or 'reset'); samples are shuffled within segments by ``seed`` unless ``shuffle=False``.
    ``options`` mix the method's options and the loop's (``batch_size``, ``lr``, ``seed``, ``device``,
    ``checkpoint_dir``...; ``epochs`` is set by the stream). The stream is processed in chunks of
    ``chunk_batches`` batches (the unit of history records and checkpoints; ``resume=True`` continues
    an interrupted run from its last chunk). ``source_data``: clean source samples for methods that
    use them (EATA's Fisher regulariser). ``model`` itself is not modified.
    """
    cls = get_method(method, task="tta")
    for k in ("epochs", "iters_per_epoch"):
        if k in options or (isinstance(train, dict) and k in train):
            raise ConfigError(f"{k}: a test-time adaptation run makes one pass over the stream, so {k} is set by "
                              f"the stream (one loop epoch per chunk of chunk_batches batches); remove it.")
    opts, tc = split_options(cls, options, train)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("dfkt.tta runs in one process (an online stream has one order); run it without torchrun.")
    if isinstance(stream, Stream):
        if protocol is not None and check_protocol(protocol) != stream.protocol:
            raise ConfigError(f"protocol={protocol!r} but the Stream was built with protocol {stream.protocol!r}; "
                              f"build the Stream with the protocol you want (or leave protocol out).")
    else:
        stream = Stream(stream, protocol=protocol or "continual", shuffle=shuffle, seed=tc.seed)
    plan: StreamPlan = stream.plan(tc.batch_size, chunk_batches)
    tc.epochs = len(plan.chunks)
    device = resolve_device(tc.device)
    if out is not None and tc.checkpoint_dir is None:
        tc.checkpoint_dir = str(Path(out))
    rng = seed_everything(tc.seed)
    head = num_classes_of(model)
    if num_classes is not None and num_classes != head:
        raise ModelError(f"the model's head has {head} outputs but num_classes={num_classes}; use a model trained "
                         f"on the same {num_classes} classes, or fix num_classes.")
    labels = stream.labels()
    if int(labels.max()) >= head:
        raise DataError(f"the stream has labels up to {int(labels.max())} but the model's head has {head} outputs; "
                        f"test-time adaptation keeps the source label space.")
    shape = _sample_shape(stream)
    learner = copy.deepcopy(model).to(device)
    check_input(learner, shape)
    ctx = Context(learner=learner, teacher=None, train=tc, device=device, num_classes=head, input_shape=shape,
                  target=plan, rng=rng)
    m = cls(ctx, opts, source_data=source_data)
    meta_cfg = {"method": cls.name, "task": "tta", "options": to_dict(opts), "train": to_dict(tc),
                "stream": stream.describe(), "chunk_batches": chunk_batches}
    fp = fingerprint(cls.name, opts, tc, {"stream": stream.describe(), "chunk_batches": chunk_batches})
    labels_dev = labels.to(device)

    def chunk_error(_model: nn.Module) -> dict:
        chunk = plan.chunks[ctx.epoch]
        s, e = plan.batches[chunk.first][0], plan.batches[chunk.last - 1][1]
        y, p = labels_dev[s:e], m.predictions[s:e]
        ok = y >= 0
        rec = {"samples": e}
        if bool(ok.any()):
            rec["err"] = round(float((p[ok] != y[ok]).float().mean() * 100), 4)
        if chunk.segment is not None:
            rec["segment"] = stream.names[chunk.segment]
        return rec

    t0 = time.perf_counter()
    history = fit(m, eval_fn=chunk_error, resume=resume,
                  meta={"fingerprint": fp, "config": json.dumps(meta_cfg, default=str)})
    m.finish()
    wall = history.train_time_s or (time.perf_counter() - t0)
    res = TTAResult(model=ctx.caller_layout(m.model()), method=cls.name, protocol=stream.protocol, predictions=m.predictions.cpu(),
                    labels=labels, segment=stream.domain.clone(), segment_names=list(stream.names),
                    batches=list(plan.batches), history=history, wall_s=wall, config=meta_cfg)
    if out is not None:
        out = Path(out)
        summary = {"config": meta_cfg, "err": res.err, "mean_err": res.mean_err, "errors": res.errors(),
                   "samples_per_s": res.samples_per_s, "wall_s": wall, "history": history.records}
        res.path = save_model(out / "model.pt", res.model, method=cls.name, config=meta_cfg,
                              metrics={"err": res.err, "mean_err": res.mean_err})
        (out / "history.json").write_text(json.dumps(summary, indent=1, default=str))
        atomic_save({"predictions": res.predictions, "labels": labels, "segment": res.segment,
                     "segment_names": res.segment_names}, out / "predictions.pt")
    return res
