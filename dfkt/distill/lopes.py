"""Lopes et al., "Data-Free Knowledge Distillation for Deep Neural Networks" (NIPS-W 2017).

The teacher's owner records *metadata* once, on the real training data: per class, the mean and
standard deviation of the teacher's activations at chosen layers (the paper's "top-layer
activation statistics"). The data set itself is then not needed: inputs are reconstructed by
optimising random images until the teacher's activations match a sample drawn from the recorded
per-class Gaussians, and the student is distilled on them::

    meta = record_metadata(teacher, train_loader)          # once, where the data lives
    torch.save(meta, "teacher_meta.pt")
    dfkt.distill(teacher, student, method="lopes", metadata="teacher_meta.pt", input_shape=(1, 32, 32))

In suites, ``metadata: {domain: mnist10k, split: train, size: 32}`` records it at setup from a
named dfkt domain (standing for the owner's one-off pass). ``train_loader`` yields ``(x, y, ...)`` batches (or ``(x, y)``); layers default to
``['penultimate']`` (the input of the teacher's last Linear); any module name can be added.
Activations are flattened; a layer whose recorded values are all >= 0 (after a ReLU) is
matched with its sampled targets clamped at 0. `dfkt bench` records the metadata itself on the teacher's
training data (the task's source, the teacher recipe's split), as the teacher's owner would.

Defaults (= benchmarks/dfkd-mnist.yaml): 30 Adam steps (lr 0.1) per batch, a pool of 20 batches, 5 student
steps per batch; student SGD lr 0.1, batch 256, 20 iterations per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.hooks import PENULTIMATE, FeatureRecorder
from ..core.losses import total_variation, weighted_terms
from ..errors import ConfigError
from ..registry import register
from .method import DFKD
from .pixels import PixelSynthesizer
from .student import DistillOptions
from .synthesis import SynthEnv

METADATA_FORMAT = "dfkt-lopes-metadata"


def _record(model: nn.Module, x: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with FeatureRecorder(model, layers) as rec:
        logits = model(x)
    return logits, [rec[n].flatten(1) for n in layers]


@torch.no_grad()
def record_metadata(teacher: nn.Module, loader: Iterable, layers: list[str] | None = None,
                    num_classes: int | None = None, device: str | torch.device | None = None) -> dict:
    """Per-class mean/std of ``teacher``'s activations at ``layers`` over ``loader`` (real, labelled data).

    Returns a plain dict (save it with ``torch.save``) for ``method='lopes'``'s ``metadata`` option.
    """
    layers = list(layers or [PENULTIMATE])
    p = next(teacher.parameters())
    device = torch.device(device) if device is not None else p.device
    was = teacher.training
    teacher.eval()
    sums: list[torch.Tensor] = []
    sqs: list[torch.Tensor] = []
    mins: list[torch.Tensor] = []
    counts = None
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        logits, feats = _record(teacher, x, layers)
        k = num_classes or logits.shape[1]
        if counts is None:
            counts = torch.zeros(k, device=device)
            sums = [torch.zeros(k, f.shape[1], device=device) for f in feats]
            sqs = [torch.zeros(k, f.shape[1], device=device) for f in feats]
            mins = [f.min() for f in feats]
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
        for i, f in enumerate(feats):
            f = f.float()
            sums[i].index_add_(0, y, f)
            sqs[i].index_add_(0, y, f * f)
            mins[i] = torch.minimum(mins[i], f.min())
    teacher.train(was)
    if counts is None:
        raise ConfigError("record_metadata: the loader yielded no batches")
    c = counts.clamp_min(1).unsqueeze(1)
    means = [s / c for s in sums]
    stds = [(q / c - m * m).clamp_min(0).sqrt() for q, m in zip(sqs, means)]
    return {"format": METADATA_FORMAT, "layers": layers, "counts": counts.cpu(),
            "mean": [m.cpu() for m in means], "std": [s.cpu() for s in stds],
            "nonneg": [bool(m >= 0) for m in mins]}


def load_metadata(meta: Any, teacher: nn.Module | None = None) -> dict:
    """``meta`` as a metadata dict: a dict from record_metadata, a path to one, or a data spec."""
    if isinstance(meta, dict) and "domain" in meta and teacher is not None:
        return _record_from_domain(meta, teacher)
    if meta is None:
        raise ConfigError("method 'lopes' needs the teacher's activation metadata: metadata="
                          "dfkt.distill.lopes.record_metadata(teacher, loader) (or a path to it saved with torch.save).")
    if isinstance(meta, (str, Path)):
        if not Path(meta).is_file():
            raise ConfigError(f"lopes metadata file {str(meta)!r} does not exist; create it with "
                              f"dfkt.distill.lopes.record_metadata(teacher, loader) and torch.save.")
        meta = torch.load(meta, map_location="cpu", weights_only=False)
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise ConfigError("lopes metadata is not a record_metadata() result.")
    return meta


def _record_from_domain(spec: dict, teacher: nn.Module) -> dict:
    """Record metadata on a named dfkt domain: ``{domain, split, size, root, layers}`` (benchmarks).

    This stands for the teacher owner's one-off pass over its training data; the run itself uses
    only the resulting statistics.
    """
    from ..data import get_domain

    spec = dict(spec)
    layers = spec.pop("layers", None)
    known = {"domain", "split", "size", "root", "channels"}
    if set(spec) - known:
        raise ConfigError(f"lopes metadata spec: unknown key(s) {sorted(set(spec) - known)}; use {sorted(known)}")
    name = spec.pop("domain")
    ds = get_domain(name, **spec)
    loader = torch.utils.data.DataLoader(ds, batch_size=512)
    return record_metadata(teacher, loader, layers=layers)


@dataclass
class LopesOptions(DistillOptions):
    metadata: Any = None          # record_metadata() dict, a path to one saved with torch.save, or a data
    #                               spec {domain, split, size[, root, layers]} recorded at setup (benchmarks)
    inv_steps: int = 30
    inv_lr: float = 0.1
    tv: float = 1e-3
    ce: float = 0.0               # optional CE to the sampled class (not in the paper)
    init_std: float = 1.0
    pool_batches: int = 20
    kd_steps: int = 5


class MetadataObjective:
    """Match the teacher's activations at the recorded layers to targets drawn, per batch, from the recorded
    per-class Gaussians (relative MSE; clamped at 0 for non-negative layers) + a TV prior (+ optional CE)."""

    def setup(self, env: SynthEnv) -> None:
        self.env = env
        meta = load_metadata(env.opts.metadata, env.teacher)
        self.layers = list(meta["layers"])
        self.mean = [m.to(env.device) for m in meta["mean"]]
        self.std = [s.to(env.device) for s in meta["std"]]
        self.nonneg = list(meta["nonneg"])
        counts = meta["counts"]
        if counts.numel() != env.ctx.num_classes:
            raise ConfigError(f"lopes metadata has {counts.numel()} classes but the teacher has "
                              f"{env.ctx.num_classes}; record it with this teacher.")
        self.present = torch.nonzero(counts > 0).flatten().to(env.device)

    def labels(self, n: int) -> torch.Tensor:
        """Balanced labels over the recorded classes; draws this batch's activation targets."""
        y = self.present[self.env.labels(n, len(self.present))]
        self.targets = []
        for m, s, nonneg in zip(self.mean, self.std, self.nonneg):
            a = m[y] + s[y] * torch.randn(m[y].shape, generator=self.env.rng).to(self.env.device)
            self.targets.append(a.clamp_min(0) if nonneg else a)
        return y

    def __call__(self, env: SynthEnv, x: torch.Tensor, z, y: torch.Tensor):
        o = env.opts
        with env.ctx.autocast():
            logits, feats = _record(env.teacher, x, self.layers)
            match = torch.stack([F.mse_loss(f.float(), t) / t.pow(2).mean().clamp_min(1e-6)
                                 for f, t in zip(feats, self.targets)]).sum()
            terms = {"match": (1.0, match), "tv": (o.tv, total_variation(x))}
            if o.ce:
                terms["ce"] = (o.ce, F.cross_entropy(logits.float(), y))
            loss, logged = weighted_terms(terms)
        return logits, loss, logged


LOPES = register("lopes", task="dfkd", family="metadata")(DFKD(
    "Lopes (Lopes et al., NIPS-W 2017): reconstruct inputs from recorded per-class activation statistics of the "
    "teacher.", Options=LopesOptions, module=__name__, needs_metadata=True,
    defaults={"epochs": 20, "iters_per_epoch": 20, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4},
    synthesizer=lambda o: PixelSynthesizer(MetadataObjective())))
