"""Label-free statistics of an adapted model's target predictions against the source model's.

Everything here reads predictions (logits) and the source model's features, never target labels.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .neighbors import knn

EPS = 1e-8
log = logging.getLogger("dfkt")


class Reference:
    """What the source model (epoch 0) says about the target, computed once.

    ``conf_frac``: per class the source predicts, the most confident fraction of its samples form the
    source's *confident set*; ``k``: neighbours per sample in the source feature space (fixed graph).
    Above ``max_samples`` rows the statistics use a fixed random subset (same rows every epoch).
    """

    def __init__(self, logits: torch.Tensor, features: torch.Tensor | None = None, conf_frac: float = 0.5,
                 k: int = 10, max_samples: int = 20000):
        n = logits.shape[0]
        self.rows = None
        if n > max_samples:
            self.rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_samples].to(logits.device)
            logits = logits[self.rows]
            features = features[self.rows] if features is not None else None
        p = F.softmax(logits.float(), 1)
        self.num_classes = p.shape[1]
        self.pred = p.argmax(1)
        self.conf = p.max(1).values
        self.hist = _hist(self.pred, self.num_classes)
        # the source's confident set: per predicted class, its most confident samples
        keep = torch.zeros_like(self.pred, dtype=torch.bool)
        order = torch.argsort(self.conf, descending=True)
        ranked_pred = self.pred[order]
        counts = torch.bincount(ranked_pred, minlength=self.num_classes)
        # rank of each sample within its predicted class (by confidence)
        onehot = F.one_hot(ranked_pred, self.num_classes)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1
        take = rank < (counts[ranked_pred].float() * conf_frac).ceil().long()
        keep[order[take]] = True
        self.confident = keep
        self.neighbours = None
        if features is not None and k > 0 and features.shape[0] > k + 1:
            _, self.neighbours = knn(features.float(), features.float(), k, metric="cosine", exclude_self=True)
        self.stats = self.measure(logits, subset=False)

    def measure(self, logits: torch.Tensor, subset: bool = True) -> dict[str, torch.Tensor]:
        """Label-free statistics of ``logits`` (all target rows, in index order) as 0-d tensors."""
        if subset and self.rows is not None:
            logits = logits[self.rows]
        p = F.softmax(logits.float(), 1)
        pred = p.argmax(1)
        pm = p.mean(0)
        hist = _hist(pred, self.num_classes)
        ent = -(p * torch.log(p + EPS)).sum(1).mean()
        out = {
            "eff_classes": torch.exp(-(pm * torch.log(pm + EPS)).sum()),         # soft marginal
            "hist_classes": torch.exp(-(hist * torch.log(hist + EPS)).sum()),    # hard predictions
            "drift": 0.5 * (hist - self.hist).abs().sum(),                         # total variation
            "src_agree": (pred == self.pred)[self.confident].float().mean(),
            "src_agree_all": (pred == self.pred).float().mean(),
            "mean_entropy": ent,
        }
        if self.neighbours is not None:
            out["knn_agree"] = (pred.unsqueeze(1) == pred[self.neighbours]).float().mean()
        return out


def _hist(pred: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(pred, minlength=k).float() / max(1, pred.numel())


def as_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """One host sync for a dict of 0-d tensors."""
    if not stats:
        return {}
    vals = torch.stack([v.float() for v in stats.values()]).tolist()
    return {k: (float(v) if math.isfinite(v) else float("nan")) for k, v in zip(stats, vals)}


class CollapseGuard:
    """Watch an adaptation run without labels; keep the best epoch; act on a collapse.

    Every evaluated epoch the adapted model's target predictions are compared with the source
    model's (:class:`Reference`); ``policy`` turns the statistics into a label-free score (higher is
    better) and a collapse verdict. The source model itself is epoch 0, a candidate like any other.
    ``on_collapse``: 'rollback' (return the best epoch by the score), 'warn' (log, return the last
    epoch) or 'stop' (raise :class:`~dfkt.errors.CollapseError`, write no results).
    """

    def __init__(self, reference: Reference, policy: "GuardPolicy", on_collapse: str = "rollback"):
        self.ref, self.policy, self.on_collapse = reference, policy, on_collapse
        self.history: list[dict] = [{"epoch": 0, **as_floats(reference.stats)}]
        self.history[0]["score"] = policy.score(self.history[0], self.history[0])
        self.best_epoch, self.best_score, self.best_state = 0, self.history[0]["score"], None
        self.collapsed: list[int] = []
        self.reasons: dict[int, str] = {}

    def observe(self, epoch: int, logits: torch.Tensor, model: torch.nn.Module) -> dict[str, float]:
        """Statistics of epoch ``epoch`` (one host sync); keeps a copy of the weights of a new best."""
        rec = {"epoch": epoch, **as_floats(self.ref.measure(logits))}
        rec["score"] = self.policy.score(rec, self.history[0])
        why = self.policy.collapse(rec, self.history[0], self.history)
        rec["collapsed"] = why is not None
        if why is not None:
            self.collapsed.append(epoch)
            self.reasons[epoch] = why
        elif rec["score"] >= self.best_score:   # ties: the later epoch
            self.best_epoch, self.best_score = epoch, rec["score"]
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.history.append(rec)
        return rec

    @property
    def fired(self) -> bool:
        return bool(self.collapsed)

    def state_dict(self) -> dict:
        return {"history": self.history, "best_epoch": self.best_epoch, "best_score": self.best_score,
                "best_state": self.best_state, "collapsed": self.collapsed, "reasons": self.reasons}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best_epoch, self.best_score = state["history"], state["best_epoch"], state["best_score"]
        self.best_state, self.collapsed, self.reasons = state["best_state"], state["collapsed"], state["reasons"]


class GuardPolicy:
    """The label-free criterion (placeholder while the statistics are studied)."""

    def score(self, rec: dict, ref: dict) -> float:
        return float(rec.get("knn_agree", 0.0))

    def collapse(self, rec: dict, ref: dict, history: list[dict]) -> str | None:
        return None


def guard_finish(guard: CollapseGuard, model: torch.nn.Module, source: torch.nn.Module, history, metrics: dict,
                 source_metrics: dict, name: str) -> tuple[torch.nn.Module, dict, dict]:
    """Apply ``guard.on_collapse`` at the end of a run: the model and metrics to return, and what the
    guard saw and did (``fired``: a collapse was seen; ``returned_epoch``: 0 = the source model)."""
    last = history.records[-1]["epoch"] if history.records else 0
    info = {"fired": guard.fired, "action": guard.on_collapse, "returned_epoch": last,
            "best_epoch": guard.best_epoch, "collapsed_epochs": list(guard.collapsed), "reason": None,
            "epochs": guard.history}
    if not guard.fired:
        return model, metrics, info
    first = guard.collapsed[0]
    info["reason"] = f"epoch {first}: {guard.reasons[first]}"
    if guard.on_collapse == "rollback" and guard.best_epoch != last:
        state = source.state_dict() if guard.best_epoch == 0 else guard.best_state
        model.load_state_dict(state)
        if guard.best_epoch == 0:
            metrics = dict(source_metrics)
        else:
            rec = next(r for r in history.records if r["epoch"] == guard.best_epoch)
            metrics = {k: v for k, v in rec.items() if k not in ("epoch", "step")}
        info["returned_epoch"] = guard.best_epoch
        log.warning("%s: collapse guard fired (%s, %d collapsed epoch(s) of %d); returned epoch %d%s.", name,
                    info["reason"], len(guard.collapsed), last, guard.best_epoch,
                    " (the source model, unadapted)" if guard.best_epoch == 0 else "")
    else:
        log.warning("%s: collapse guard fired (%s, %d collapsed epoch(s) of %d); returned the last epoch "
                    "(on_collapse: %s).", name, info["reason"], len(guard.collapsed), last, guard.on_collapse)
    return model, metrics, info
