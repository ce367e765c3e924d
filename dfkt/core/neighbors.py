"""Nearest neighbours and clustering on the training device (torch) or with faiss (CPU).

Both backends give the same answers (exact search); torch keeps everything on the model's device,
faiss is there for very large banks on CPU. Nothing builds a dense all-pairs matrix: queries are
processed in chunks against the bank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

BACKENDS = ("auto", "torch", "faiss")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kNN backend {backend!r}; use one of {BACKENDS}.")
    return backend


def knn(query: torch.Tensor, bank: torch.Tensor, k: int, metric: str = "cosine", backend: str = "auto",
        exclude_self: bool = False, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest bank rows for each query row -> (similarities or -squared distances, indices).

    metric 'cosine' (rows are L2-normalised here), 'ip' (inner product) or 'l2'. Scores are
    "higher is closer" for every metric. ``exclude_self`` drops each query's own row when the query
    *is* the bank (index i for query i). Results live on the query's device.
    """
    backend = _check_backend(backend)
    if metric not in ("cosine", "ip", "l2"):
        raise ConfigError(f"unknown kNN metric {metric!r}; use 'cosine', 'ip' or 'l2'.")
    if k < 1 or k + int(exclude_self) > bank.shape[0]:
        raise ConfigError(f"k={k} neighbours asked from a bank of {bank.shape[0]} rows; use a smaller k.")
    if metric == "cosine":
        query, bank = F.normalize(query, dim=1), F.normalize(bank, dim=1)
    kk = k + int(exclude_self)
    if backend == "faiss":
        scores, idx = _faiss_knn(query, bank, kk, metric)
    else:
        scores, idx = _torch_knn(query, bank, kk, metric, chunk)
    if exclude_self:
        # drop the query's own index if present, else the last column
        own = torch.arange(query.shape[0], device=idx.device).unsqueeze(1)
        is_self = idx == own
        drop = torch.where(is_self.any(1), is_self.float().argmax(1), torch.full_like(idx[:, 0], kk - 1))
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[torch.arange(idx.shape[0], device=idx.device), drop] = False
        scores = scores[keep].view(-1, k)
        idx = idx[keep].view(-1, k)
    return scores, idx


def _torch_knn(query, bank, k, metric, chunk):
    outs_s, outs_i = [], []
    bank_sq = (bank * bank).sum(1) if metric == "l2" else None
    for s in range(0, query.shape[0], chunk):
        q = query[s:s + chunk]
        sim = q @ bank.t()
        if metric == "l2":
            sim = 2 * sim - bank_sq.unsqueeze(0) - (q * q).sum(1, keepdim=True)
        v, i = sim.topk(k, dim=1)
        outs_s.append(v)
        outs_i.append(i)
    return torch.cat(outs_s), torch.cat(outs_i)


def _faiss_knn(query, bank, k, metric):
    import faiss
    import numpy as np

    b = np.ascontiguousarray(bank.detach().float().cpu().numpy())
    q = np.ascontiguousarray(query.detach().float().cpu().numpy())
    index = faiss.IndexFlatL2(b.shape[1]) if metric == "l2" else faiss.IndexFlatIP(b.shape[1])
    index.add(b)
    d, i = index.search(q, k)
    scores = -d if metric == "l2" else d
    return (torch.from_numpy(scores).to(query.device), torch.from_numpy(i).long().to(query.device))


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, metric: str = "cosine",
           init: torch.Tensor | None = None, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means -> (centroids [k, d], assignment [n]). 'cosine' = spherical k-means.

    Initialisation: ``init`` if given, else k-means++ seeded by ``seed`` (deterministic).
    """
    backend = _check_backend(backend)
    if x.shape[0] < k:
        raise ConfigError(f"k-means with k={k} clusters needs at least {k} points, got {x.shape[0]}.")
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = init.clone().to(x) if init is not None else _kmeanspp(x, k, g, metric)
    if backend == "faiss":  # same k-means++ start as the torch path, so both converge alike
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, spherical=(metric == "cosine"), verbose=False)
        km.train(x.detach().float().cpu().numpy(), init_centroids=c.detach().float().cpu().numpy())
        c = torch.from_numpy(km.centroids).to(x.device)
        return c, assign(x, c, metric)
    for _ in range(iters):
        a = assign(x, c, metric)
        onehot = F.one_hot(a, k).to(x.dtype)
        counts = onehot.sum(0)
        new = (onehot.t() @ x) / counts.clamp_min(1).unsqueeze(1)
        new = torch.where(counts.unsqueeze(1) > 0, new, c)  # keep empty clusters where they were
        if metric == "cosine":
            new = F.normalize(new, dim=1)
        c = new
    return c, assign(x, c, metric)


def assign(x: torch.Tensor, centroids: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Index of the closest centroid per row (cosine or l2)."""
    if metric == "cosine":
        return (F.normalize(x, dim=1) @ F.normalize(centroids, dim=1).t()).argmax(1)
    return torch.cdist(x, centroids).argmin(1)


def _kmeanspp(x: torch.Tensor, k: int, g: torch.Generator, metric: str) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    cents = [x[first]]
    d2 = None
    for _ in range(1, k):
        c = cents[-1].unsqueeze(0)
        d = (1 - x @ c.t()).squeeze(1).clamp_min(0) if metric == "cosine" else ((x - c) ** 2).sum(1)
        d2 = d if d2 is None else torch.minimum(d2, d)
        probs = (d2 / d2.sum().clamp_min(1e-12)).cpu()
        nxt = int(torch.multinomial(probs, 1, generator=g))
        cents.append(x[nxt])
    return torch.stack(cents)
