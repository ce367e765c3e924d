"""The ``scale`` bench task: neighbour-search cost and recall of a feature bank of any size (no training).

A suite task gives a bank (``scale``: :class:`ScaleSpec`: rows, dim, batch, K, KK, steps); a suite
"method" is a neighbour index mode (``auto`` = the rule of ``core.neighbors.choose_index``, ``exact``,
``ivf``, ``hnsw``; ``options`` may set ``nprobe`` / ``candidates`` of ``BankIndex``). One run builds
synthetic features (``synthetic_features``: clustered, L2-normalised, in float32 on the device) and
times ``steps`` NRC steps of neighbour search: the batch's bank rows are rewritten with drifted
features (as the training step writes them), then NRC's two searches run through ``batch_knn``
(K neighbours of the batch, then KK of each of those). Records: the index kind the rule chose, the
build time, the per-step search time (mean over the timed steps, index updates included) and that time
with the index rebuild amortised over one epoch of steps (the index is rebuilt after an epoch of
writes), and recall@K of both searches against exact search on ``recall_steps`` of the steps.
The report checks the floors: the per-step cost of the largest bank <= 2x that of the smallest (the
``auto`` rule), and recall@K >= 0.95 for every approximate index.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.device import synchronize
from ..errors import ConfigError
from .report import suite_time

OPTION_KEYS = ("nprobe", "candidates")


@dataclass
class ScaleSpec:
    """A synthetic feature bank and the NRC-shaped search steps timed on it."""

    rows: int
    dim: int = 256
    classes: int = 100          # clusters of the synthetic features
    batch_size: int = 64
    K: int = 5                  # NRC: neighbours of each batch sample
    KK: int = 5                 # NRC: neighbours of each of those
    steps: int = 30             # timed steps (after 2 untimed warm-up steps)
    recall_steps: int = 3       # steps whose searches are also run exactly (recall@K)

    def validate(self, where: str) -> None:
        for name in ("rows", "dim", "classes", "batch_size", "K", "KK", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: scale.{name} must be >= 1, got {getattr(self, name)}.")
        if self.recall_steps < 0 or self.recall_steps > self.steps:
            raise ConfigError(f"{where}: scale.recall_steps must be in [0, steps={self.steps}], got {self.recall_steps}.")
        if self.rows <= max(self.batch_size, self.K + 1, self.KK + 1):
            raise ConfigError(f"{where}: scale.rows ({self.rows}) must exceed the batch size and K+1, KK+1.")


def validate(suite) -> None:
    """A scale suite: methods are index modes; every task has a ``scale`` bank spec."""
    from ..core.neighbors import INDEX_MODES

    for name, run in suite.methods.items():
        mode = run.method or name
        if mode not in INDEX_MODES:
            raise ConfigError(f"suite {suite.suite!r}: scale method {name!r} is not a neighbour index mode; "
                              f"use one of {INDEX_MODES} (or `method:` one of them).")
        bad = set(run.options) - set(OPTION_KEYS)
        if bad or run.train:
            raise ConfigError(f"suite {suite.suite!r}: scale method {name!r} takes only options {OPTION_KEYS}, "
                              f"got {sorted(bad) or 'train settings'}.")
    for t in suite.tasks:
        if t.scale is None:
            raise ConfigError(f"suite {suite.suite!r}: scale task {t.name!r} needs `scale` (rows, dim, ...).")
        t.scale.validate(f"suite {suite.suite!r}, task {t.name!r}")
    for m in suite.quick.methods:
        if m not in suite.methods:
            raise ConfigError(f"suite {suite.suite!r}: quick method {m!r} is not in methods.")


def synthetic_features(rows: int, dim: int, classes: int, seed: int, device: torch.device,
                       latent: int = 16, noise: float = 0.3, chunk: int = 1 << 16) -> torch.Tensor:
    """Clustered features shaped like a trained network's: each row is its class centre plus a point of
    that class's ``latent``-dimensional subspace plus isotropic noise, L2-normalised (float32).

    Uniformly random features have no neighbourhood structure (every row is about as far from every
    other), so no index finds their neighbours much faster than an exact search; adapted features do."""
    g = torch.Generator().manual_seed(seed)
    cent = torch.randn(classes, dim, generator=g)
    basis = torch.randn(classes, latent, dim, generator=g) / math.sqrt(latent)
    out = torch.empty(rows, dim, device=device)
    for s in range(0, rows, chunk):
        m = min(chunk, rows - s)
        lab = torch.randint(classes, (m,), generator=g)
        z = torch.randn(m, latent, generator=g)
        x = cent[lab] + noise * torch.randn(m, dim, generator=g)
        for c in lab.unique().tolist():            # per class: one small matmul
            sel = lab == c
            x[sel] += z[sel] @ basis[c]
        out[s:s + m] = F.normalize(x, dim=1).to(device)
    return out


def _recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = (approx.unsqueeze(2) == exact.unsqueeze(1)).any(2).sum()
    return float(hits) / exact.numel()


def run_scale(suite, task, name: str, seed: int, root, cache: Path, device: str, override, progress: bool,
              out: Path) -> dict:
    """One (bank size, index mode, seed): the record of its build time, step time and recall."""
    from ..core.device import resolve_device
    from ..core.neighbors import BankIndex
    from ..sfda.common import batch_knn

    sp: ScaleSpec = task.scale
    run = suite.methods[name]
    opts = dict(run.options, **((override or {}).get("options", {})))
    dev = resolve_device(device)
    t_run = time.perf_counter()
    bank = synthetic_features(sp.rows, sp.dim, sp.classes, seed, dev)
    index = BankIndex(bank, run.method or name, seed=seed, **opts)
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(sp.rows, generator=g)

    t0 = time.perf_counter()
    index.search(bank[:1], 1)                                   # builds an approximate index
    synchronize(dev)
    build_s = time.perf_counter() - t0
    times, recalls = [], []
    warm = 2
    for step in range(warm + sp.steps):
        s = (step * sp.batch_size) % (sp.rows - sp.batch_size)
        idx = order[s:s + sp.batch_size].to(dev)
        drift = F.normalize(bank[idx] + 0.1 * torch.randn(idx.numel(), sp.dim, generator=g).to(dev), dim=1)
        synchronize(dev)
        t0 = time.perf_counter()
        bank[idx] = drift                                       # the training step's bank write
        index.mark(idx)
        _, nn = batch_knn(bank[idx], index, sp.K, idx)
        flat = nn.reshape(-1)
        _, nn2 = batch_knn(bank[flat], index, sp.KK, flat)
        synchronize(dev)
        if step >= warm:
            times.append(time.perf_counter() - t0)
            if index.approximate and step - warm < sp.recall_steps:
                _, ex = batch_knn(bank[idx], bank, sp.K, idx)
                _, ex2 = batch_knn(bank[flat], bank, sp.KK, flat)
                recalls.append((_recall(nn, ex) * nn.numel() + _recall(nn2, ex2) * nn2.numel())
                               / (nn.numel() + nn2.numel()))
    step_s = sum(times) / len(times)
    steps_per_epoch = math.ceil(sp.rows / sp.batch_size)
    amortised = step_s + (build_s / steps_per_epoch if index.approximate else 0.0)
    recall = sum(recalls) / len(recalls) if recalls else (1.0 if not index.approximate else None)
    return {"task": "scale", "method": name, "mode": run.method or name, "index": index.kind, "rows": sp.rows,
            "dim": sp.dim, "batch_size": sp.batch_size, "K": sp.K, "KK": sp.KK, "steps": sp.steps,
            "build_s": round(build_s, 3), "step_ms": round(1000 * step_s, 3),
            "step_ms_amortised": round(1000 * amortised, 3),
            "recall": None if recall is None else round(recall, 4), "recall_steps": len(recalls),
            "wall_s": round(time.perf_counter() - t_run, 3),
            "summary": f"{index.kind}: {1000 * amortised:.1f} ms/step, recall {recall if recall is None else round(recall, 3)}"}


# ----------------------------------------------------------------------------- report
RECALL_FLOOR = 0.95
COST_FLOOR = 2.0


def is_scale(doc: dict) -> bool:
    return bool(doc.get("records")) and all(r.get("task") == "scale" for r in doc["records"])


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def table(records: list[dict]) -> dict:
    """{method: [row per bank size (ascending rows)]}, each the mean over seeds."""
    by: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[r["method"]][r["rows"]].append(r)
    out = {}
    for m, sizes in by.items():
        rows = []
        for n in sorted(sizes):
            rs = sizes[n]
            rows.append({"task_name": rs[0]["task_name"], "rows": n, "index": rs[0]["index"], "dim": rs[0]["dim"],
                         "build_s": _mean([r["build_s"] for r in rs]), "step_ms": _mean([r["step_ms"] for r in rs]),
                         "step_ms_amortised": _mean([r["step_ms_amortised"] for r in rs]),
                         "recall": _mean([r["recall"] for r in rs]), "seeds": len(rs),
                         "threads": sorted({r.get("torch_threads") for r in rs}, key=str)})
        out[m] = rows
    return out


def floors(records: list[dict], rule: str = "auto") -> list[str]:
    tab = table(records)
    lines = []
    rows = tab.get(rule)
    if rows and len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        ratio = hi["step_ms_amortised"] / lo["step_ms_amortised"]
        lines.append(f"- `{rule}`: per-step search cost at {hi['rows']:,} rows <= {COST_FLOOR:g}x the cost at "
                     f"{lo['rows']:,} rows: {hi['step_ms_amortised']:.1f} / {lo['step_ms_amortised']:.1f} ms = "
                     f"{ratio:.2f}x: " + ("**met**" if ratio <= COST_FLOOR else "**MISSED**"))
    for m, rs in tab.items():
        for r in rs:
            if r["index"] != "exact" and r["recall"] is not None:
                lines.append(f"- `{m}` at {r['rows']:,} rows ({r['index']}): recall@K {r['recall']:.3f} >= "
                             f"{RECALL_FLOOR}: " + ("**met**" if r["recall"] >= RECALL_FLOOR else "**MISSED**"))
    return lines


def markdown(doc: dict) -> str:
    env = doc.get("env", {})
    recs = doc["records"]
    r0 = recs[0]
    out = [f"# Suite `{doc['suite']}`{' (quick)' if doc.get('quick') else ''}", ""]
    if doc.get("command"):
        out += ["Command:", "", f"    {doc['command']}", ""]
    out += [f"Environment: dfkt {env.get('dfkt')}, torch {env.get('torch')}, faiss {env.get('faiss')}, device "
            f"`{env.get('device')}`, {env.get('cpu_count')} CPUs / {env.get('torch_threads')} torch threads, "
            f"{env.get('platform')}.", f"{suite_time(doc)}.", "",
            f"Neighbour search of a feature bank, no training: synthetic clustered {r0['dim']}-d L2-normalised "
            f"features (dfkt/bench/scale.py); one step = NRC's two searches (K={r0['K']} neighbours of a batch of "
            f"{r0['batch_size']}, then KK={r0['KK']} of each of those) after the batch's bank rows are rewritten. "
            "`step ms`: mean over the timed steps (index updates included); `amortised`: plus the index build "
            "spread over one epoch of steps (the index is rebuilt after an epoch of writes); `recall`: recall@K "
            "of both searches against exact search. `auto` is the rule of `train.neighbour_index` "
            "(core.neighbors.choose_index).", ""]
    out += ["| method | rows | index | build s | step ms | amortised ms | recall@K | threads | seeds |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m, rows in table(recs).items():
        for r in rows:
            rec = "exact" if r["index"] == "exact" else (f"{r['recall']:.3f}" if r["recall"] is not None else "-")
            out.append(f"| {m} | {r['rows']:,} | {r['index']} | {r['build_s']:.2f} | {r['step_ms']:.1f} | "
                       f"**{r['step_ms_amortised']:.1f}** | {rec} | {', '.join(str(t) for t in r['threads'])} "
                       f"| {r['seeds']} |")
    out.append("")
    lines = floors(recs)
    if lines:
        out += ["## Floors", ""] + lines + [""]
    return "\n".join(out) + "\n"
