"""Evaluation: accuracy on labelled data and label-free scores for model selection on targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.split import split
from .device import model_device
from .loader import make_loader

EPS = 1e-5


@torch.no_grad()
def predict(model: nn.Module, dataset, device: torch.device | None = None, batch_size: int = 512,
            features: bool = False) -> dict[str, torch.Tensor]:
    """Logits (and bottleneck features) for every sample in index order, kept on ``device`` (default: the
    model's device)."""
    device = device if device is not None else model_device(model)
    was = model.training
    model.eval()
    parts = split(model) if features else None
    n = len(dataset)
    logits = feats = None
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    for x, y, idx in make_loader(dataset, batch_size, device, shuffle=False, shard=False):
        if parts is not None:
            f = parts.features(x)
            out = parts.head(f)
            if feats is None:
                feats = torch.empty(n, f.shape[1], device=device)
            feats[idx] = f.float()
        else:
            out = model(x)
        if logits is None:
            logits = torch.empty(n, out.shape[1], device=device)
        logits[idx] = out.float()
        labels[idx] = y
    model.train(was)
    out = {"logits": logits, "labels": labels}
    if feats is not None:
        out["features"] = feats
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent over the rows with a label (>= 0)."""
    valid = labels >= 0
    if not bool(valid.any()):
        return float("nan")
    return float((logits[valid].argmax(1) == labels[valid]).float().mean() * 100)


def snd(probs: torch.Tensor, temperature: float = 0.05, chunk: int = 2048, max_samples: int = 10000) -> float:
    """Soft Neighbourhood Density (Saito et al. 2021): higher = denser, better-clustered predictions.

    O(n^2) on the device in row chunks; above ``max_samples`` rows (e.g. VisDA's 55k targets) it is
    computed on a fixed random subset of that size (the same rows at every evaluation)."""
    p = F.normalize(probs, dim=1)
    if p.shape[0] > max_samples:
        keep = torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(0))[:max_samples]
        p = p[keep.to(p.device)]
    total = probs.new_zeros(())
    n = p.shape[0]
    for s in range(0, n, chunk):
        sim = p[s:s + chunk] @ p.t()
        rows = torch.arange(s, min(s + chunk, n), device=p.device)
        sim[torch.arange(len(rows), device=p.device), rows] = float("-inf")  # exclude self
        q = F.softmax(sim.div_(temperature), 1)
        del sim
        # -(q * log(q + EPS)) in place: the same values with two fewer [chunk, n] temporaries (on the CPU
        # each fresh one costs page faults: 82 -> 58 ms per call at n = 1797, one thread)
        total = total + (-(q.add(EPS).log_().mul_(q).sum(1))).sum()
    return float(total / n)


def label_free_scores(logits: torch.Tensor) -> dict[str, float]:
    """Scores computable without target labels: mean entropy (lower is better), IM and SND (higher)."""
    p = F.softmax(logits, 1)
    ent = -(p * torch.log(p + EPS)).sum(1).mean()
    pm = p.mean(0)
    div = -(pm * torch.log(pm + EPS)).sum()
    return {"entropy": float(ent), "im": float(div - ent), "snd": snd(p)}


def evaluate(model: nn.Module, dataset, device: torch.device | None = None, label_free: bool = False,
             batch_size: int = 512) -> dict[str, float]:
    """{'acc': percent} (+ label-free scores) of ``model`` on ``dataset``; an unlabeled data set (every
    label -1) has no 'acc', only the label-free scores (given whatever ``label_free`` says). ``device``
    defaults to the model's."""
    out = predict(model, dataset, device, batch_size)
    labelled = bool((out["labels"] >= 0).any())
    res = {"acc": accuracy(out["logits"], out["labels"])} if labelled else {}
    label_free = label_free or not labelled
    if label_free:
        res.update(label_free_scores(out["logits"]))
    return res


@torch.no_grad()
def reestimate_bn(model: nn.Module, dataset, device: torch.device, batch_size: int = 256) -> nn.Module:
    """AdaBN (Li et al., 2016) in place: every BatchNorm layer's running statistics become the exact
    statistics of ``dataset`` (cumulative average over one pass, BN in train mode, everything else in
    eval mode: no dropout). A model without BatchNorm is returned unchanged."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    was = model.training
    model.eval()
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x, _y, _idx in make_loader(dataset, batch_size, device, shuffle=False, shard=False):
            if x.shape[0] >= 2:
                model(x)
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    return model
