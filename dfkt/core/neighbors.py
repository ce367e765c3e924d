"""Nearest neighbours and clustering on the training device (torch) or with faiss (CPU).

``knn``: exact search; both backends give the same answers; torch keeps everything on the model's
device, faiss is there for very large banks on CPU. Nothing builds a dense all-pairs matrix: queries
are processed in chunks against the bank, and a large bank in chunks of rows.

``BankIndex``: neighbour search over a feature bank whose rows change a batch at a time (NRC, AaD,
AdaContrast): exact below a size threshold, an approximate faiss index above it (``choose_index``).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

log = logging.getLogger("dfkt")

BACKENDS = ("auto", "torch", "faiss")
MAX_SCORES = 1 << 25          # exact search: at most this many query x bank scores in memory at once


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
        rows = max(k, MAX_SCORES // q.shape[0])       # bank rows per block: bounded score memory (GPU)
        best_s = best_i = None
        for b in range(0, bank.shape[0], rows):
            sim = q @ bank[b:b + rows].t()
            if metric == "l2":
                sim = 2 * sim - bank_sq[b:b + rows].unsqueeze(0) - (q * q).sum(1, keepdim=True)
            v, i = sim.topk(min(k, sim.shape[1]), dim=1)
            if best_s is None:
                best_s, best_i = v, i
            else:                                     # merge this block's top-k with the best so far
                v, j = torch.cat([best_s, v], 1).topk(k, dim=1)
                best_i = torch.cat([best_i, i + b], 1).gather(1, j)
                best_s = v
        outs_s.append(best_s)
        outs_i.append(best_i)
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


# ----------------------------------------------------------------------------- feature-bank index
INDEX_MODES = ("auto", "exact", "ivf", "hnsw")
EXACT_MAX_ROWS = 50_000       # the rule: on a CPU, banks below this many rows are searched exactly


def choose_index(rows: int, device: torch.device | str, mode: str = "auto") -> str:
    """The neighbour search a feature bank of ``rows`` rows on ``device`` gets: ``'exact'``, ``'ivf'`` or
    ``'hnsw'``. ``mode`` other than ``'auto'`` is the override (``train.neighbour_index``).

    The rule (``'auto'``): exact (torch matmul + top-k, chunked) on an accelerator at any size, since it
    is cheap there (1M x 256 rows: a few ms per step) and an index on the host would cost a round trip
    per search; exact on a CPU below ``EXACT_MAX_ROWS`` (50k) rows, where it costs at most ~0.15 s per
    NRC step on one thread and its answers are exact; above it an IVF index (faiss), whose step cost
    hardly grows with the bank (measured: ``dfkt bench scale``). Without faiss installed: exact.
    """
    if mode not in INDEX_MODES:
        raise ConfigError(f"unknown neighbour index {mode!r}; use one of {INDEX_MODES} "
                          f"(train.neighbour_index).")
    if mode != "auto":
        if mode != "exact":
            _faiss(mode)
        return mode
    if torch.device(device).type != "cpu" or rows < EXACT_MAX_ROWS:
        return "exact"
    try:
        import faiss  # noqa: F401
    except ImportError:
        log.warning("a feature bank of %d rows would get an approximate index, but faiss is not installed "
                    "(pip install faiss-cpu); searching it exactly (slower per step).", rows)
        return "exact"
    return "ivf"


def _faiss(mode: str):
    try:
        import faiss
    except ImportError as e:
        raise ConfigError(f"neighbour index {mode!r} needs faiss: pip install faiss-cpu "
                          f"(or use train.neighbour_index: exact).") from e
    return faiss


class BankIndex:
    """k-nearest-neighbour search (inner product) over the rows of ``bank`` (L2-normalised features that
    stay where they are: the training device, the model's dtype), while its rows change a batch at a time.

    ``kind`` (``choose_index``): ``'exact'`` searches the bank itself every time (``knn``, torch).
    ``'ivf'``: a faiss IVF index with 4-bit PQ fast-scan codes (``nlist`` ~ sqrt(rows) lists, ``nprobe``
    of them searched) proposes ``candidates`` rows per query, which are re-scored exactly against the
    bank's current rows. ``'hnsw'``: the same with an HNSW graph (32 links; slower to update). The
    index is a host-side copy (codes: rows x d/2 bytes), built at the first search.

    Rows change: callers call ``mark(idx)`` after writing rows ``idx``; before the next search those rows
    are added to the index again with their new values (the old entries stay as stale copies: they can
    only propose a row as a candidate, and every candidate is scored with its current value, duplicates
    dropped). ``reset()`` rebuilds it from the current bank at the next search (quantiser retrained:
    the features have moved): the bank methods call it at every epoch and after a resume; without it, the
    index is rebuilt once as many rows have been re-added as the bank has (about one epoch of writes).
    """

    def __init__(self, bank: torch.Tensor, mode: str = "auto", nprobe: int = 8, candidates: int = 64,
                 seed: int = 0):
        self.bank = bank
        self.kind = choose_index(bank.shape[0], bank.device, mode)
        self.nprobe, self.candidates, self.seed = nprobe, candidates, seed
        self._index = None
        self._pending: list[torch.Tensor] = []
        self._readded = 0
        self.builds = 0                       # how many times the index was (re)built

    @property
    def approximate(self) -> bool:
        return self.kind != "exact"

    def mark(self, idx: torch.Tensor) -> None:
        """Bank rows ``idx`` were rewritten."""
        if self.approximate and self._index is not None:
            self._pending.append(idx.detach().reshape(-1))

    def reset(self) -> None:
        """The whole bank changed: rebuild the index before the next search."""
        self._index, self._pending, self._readded = None, [], 0

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inner products, bank row indices) of the ``k`` best rows per query row, on the query's device."""
        if not self.approximate:
            return knn(query.to(self.bank.dtype), self.bank, k, metric="ip", backend="torch")
        if k > self.bank.shape[0]:
            raise ConfigError(f"k={k} neighbours asked from a bank of {self.bank.shape[0]} rows; use a smaller k.")
        faiss = _faiss(self.kind)
        faiss.omp_set_num_threads(torch.get_num_threads())        # faiss follows torch's thread count
        self._sync(faiss)
        q = query.detach().to(self.bank.dtype)
        kf = min(max(self.candidates, 4 * k), self.bank.shape[0])
        _, cand = self._index.search(np.ascontiguousarray(q.float().cpu().numpy()), kf)
        cand = torch.from_numpy(cand).to(self.bank.device)
        scores, idx = self._rescore(q, cand, k)
        short = torch.isinf(scores[:, -1])                        # fewer than k distinct rows proposed
        if bool(short.any()):
            s2, i2 = knn(q[short], self.bank, k, metric="ip", backend="torch")
            scores[short], idx[short] = s2, i2
        return scores.to(query.device), idx.to(query.device)

    def _rescore(self, q: torch.Tensor, cand: torch.Tensor, k: int, chunk: int = 256):
        """Exact inner products of the candidates with their current rows; -1 and duplicates dropped."""
        outs_s, outs_i = [], []
        for s in range(0, q.shape[0], chunk):
            c = cand[s:s + chunk]
            rows = self.bank.index_select(0, c.clamp_min(0).reshape(-1)).view(c.shape[0], c.shape[1], -1)
            sc = torch.bmm(rows, q[s:s + chunk].unsqueeze(2)).squeeze(2)
            srt, order = c.sort(1)
            dup = torch.zeros_like(c, dtype=torch.bool)
            dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
            dup = torch.zeros_like(dup).scatter(1, order, dup)
            sc = sc.masked_fill(dup | (c < 0), float("-inf"))
            v, j = sc.topk(k, dim=1)
            outs_s.append(v)
            outs_i.append(c.gather(1, j))
        return torch.cat(outs_s), torch.cat(outs_i)

    def _sync(self, faiss) -> None:
        n = self.bank.shape[0]
        if self._index is not None and self._pending:
            idx = torch.unique(torch.cat(self._pending))
            self._pending = []
            self._readded += idx.numel()
            if self._readded >= n:
                self._index = None                                # an epoch of writes: rebuild
            else:
                self._index.add_with_ids(self._rows(idx), idx.cpu().numpy().astype("int64"))
        if self._index is None:
            self._index = self._build(faiss)
            self._pending, self._readded = [], 0
            self.builds += 1

    def _rows(self, idx: torch.Tensor | None = None) -> np.ndarray:
        x = self.bank if idx is None else self.bank[idx]
        return np.ascontiguousarray(x.detach().float().cpu().numpy())

    def _build(self, faiss):
        n, d = self.bank.shape
        x = self._rows()
        ids = np.arange(n, dtype="int64")
        if self.kind == "hnsw":
            index = faiss.IndexIDMap(faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT))
            faiss.downcast_index(index.index).hnsw.efSearch = max(64, self.candidates)
            index.add_with_ids(x, ids)
            return index
        nlist = max(1, min(2 ** round(math.log2(math.sqrt(n))), n // 39))
        m = d // 2 if d % 2 == 0 else d                          # 4-bit codes of 2 dimensions each
        index = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        g = torch.Generator().manual_seed(self.seed)
        train = x if n <= 64 * nlist else x[torch.randperm(n, generator=g)[:64 * nlist].sort().values.numpy()]
        index.train(train)
        index.add_with_ids(x, ids)
        index.nprobe = min(self.nprobe, nlist)
        log.info("neighbour index: IVF%d,PQ%dx4fs over %d x %d bank rows (nprobe %d)", nlist, m, n, d, index.nprobe)
        return index
