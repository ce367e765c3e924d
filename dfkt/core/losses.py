"""Transfer losses shared by both branches, as plain functions (and one module with parameters).

Batch-level statistics (the mean prediction) are all-gathered under torchrun so that every rank
optimises the objective of the global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_gather_cat

EPS = 1e-5


# ----- distillation (DFKD) -------------------------------------------------------------------------
def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: KL(teacher_T || student_T) * T^2, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits.detach() / t, 1),
                    reduction="batchmean") * (t * t)


def logit_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of logits (DFAD's discrepancy)."""
    return (student_logits - teacher_logits).abs().mean()


def one_hot_ce(teacher_logits: torch.Tensor) -> torch.Tensor:
    """CE of the teacher against its own argmax (DAFL's one-hot loss)."""
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation loss: -mean |feature| (reward strongly activated features)."""
    return -features.abs().mean()


def class_balance(logits: torch.Tensor) -> torch.Tensor:
    """DAFL's information-entropy loss: sum_c p̄_c log p̄_c (minimised -> balanced classes)."""
    p = all_gather_cat(F.softmax(logits, 1)).mean(0)
    return (p * torch.log(p + EPS)).sum()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute total variation of an image batch (DeepInversion prior)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


def attention_transfer(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT (Zagoruyko & Komodakis): distance between normalised spatial attention maps."""
    if fs.shape[-2:] != ft.shape[-2:]:
        fs = F.adaptive_avg_pool2d(fs, ft.shape[-2:])
    return (attention_map(fs, p) - attention_map(ft.detach(), p)).pow(2).mean()


def similarity_preserving(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """SP (Tung & Mori): match the batch similarity matrices of the flattened features."""
    gs = F.normalize(fs.flatten(1) @ fs.flatten(1).t(), dim=1)
    gt = F.normalize(ft.detach().flatten(1) @ ft.detach().flatten(1).t(), dim=1)
    return (gs - gt).pow(2).sum() / fs.shape[0] ** 2


def pkt(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """PKT (Passalis & Tefas): KL between cosine-similarity conditional distributions."""
    def cond(f: torch.Tensor) -> torch.Tensor:
        f = F.normalize(f.flatten(1), dim=1)
        s = (f @ f.t() + 1.0) / 2.0
        return s / s.sum(1, keepdim=True)

    ps, pt = cond(fs), cond(ft.detach())
    return (pt * torch.log((pt + EPS) / (ps + EPS))).sum(1).mean()


def rkd(fs: torch.Tensor, ft: torch.Tensor, w_dist: float = 1.0, w_angle: float = 2.0) -> torch.Tensor:
    """RKD (Park et al.): distance-wise and angle-wise relational losses."""
    fs, ft = fs.flatten(1), ft.detach().flatten(1)

    def pdist(f: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(f, f)
        return d / (d[d > 0].mean() + EPS)

    loss = w_dist * F.smooth_l1_loss(pdist(fs), pdist(ft))
    if w_angle:
        def angles(f: torch.Tensor) -> torch.Tensor:
            e = F.normalize(f.unsqueeze(0) - f.unsqueeze(1), p=2, dim=2)
            return torch.bmm(e, e.transpose(1, 2)).flatten()

        loss = loss + w_angle * F.smooth_l1_loss(angles(fs), angles(ft))
    return loss


class FitNetHint(nn.Module):
    """FitNet hint: a learned 1x1 conv (or linear) adapter maps student features to the teacher's."""

    def __init__(self, student_channels: int, teacher_channels: int, conv: bool = True):
        super().__init__()
        self.adapter = (nn.Conv2d(student_channels, teacher_channels, 1, bias=False) if conv
                        else nn.Linear(student_channels, teacher_channels, bias=False))

    def forward(self, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        h = self.adapter(fs)
        if h.dim() == 4 and h.shape[-2:] != ft.shape[-2:]:
            h = F.adaptive_avg_pool2d(h, ft.shape[-2:])
        return F.mse_loss(h, ft.detach())


FEATURE_LOSSES = {"at": attention_transfer, "sp": similarity_preserving, "pkt": pkt, "rkd": rkd}


# ----- adaptation (SFDA) ---------------------------------------------------------------------------
def entropy(logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Shannon entropy of softmax(logits): the batch mean, or per sample with ``reduction='none'``."""
    p = F.softmax(logits, 1)
    per = -(p * torch.log(p + EPS)).sum(1)
    return per if reduction == "none" else per.mean()


def soft_ce(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of softmax(logits) against the soft target softmax(target_logits)
    (mean-teacher consistency; gradients reach both arguments unless the caller detaches one)."""
    return -(F.softmax(target_logits, 1) * F.log_softmax(logits, 1)).sum(1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch-mean prediction (global batch under torchrun)."""
    p = all_gather_cat(F.softmax(logits, 1)).mean(0)
    return -(p * torch.log(p + EPS)).sum()


def information_maximization(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SHOT's IM loss: mean entropy - entropy of the mean prediction."""
    ent, div = entropy(logits), marginal_entropy(logits)
    return ent - div, {"ent": ent.detach(), "div": div.detach()}


def smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with label smoothing and optional per-sample weights (SHOT's source recipe)."""
    logp = F.log_softmax(logits, 1)
    k = logits.shape[1]
    target = torch.full_like(logp, smoothing / k)
    target.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + smoothing / k)
    per = -(target * logp).sum(1)
    if weight is not None:
        return (per * weight).sum() / weight.sum().clamp_min(EPS)
    return per.mean()


def pseudo_label_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                    ignore_index: int = -1) -> torch.Tensor:
    """CE against pseudo-labels; entries equal to ``ignore_index`` are skipped (no host sync)."""
    valid = (labels != ignore_index).float()
    if weight is not None:
        valid = valid * weight
    per = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    return (per * valid).sum() / valid.sum().clamp_min(1.0)


def weighted_terms(terms: dict[str, tuple[float, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``{name: (weight, value)}`` -> (the weighted sum, in the given order; ``{name: value}`` detached for logging).

    One place where a method's named loss terms become its loss: a method states its terms and weights.
    """
    if not terms:
        raise ValueError("weighted_terms needs at least one term")
    loss = None
    for w, v in terms.values():
        loss = w * v if loss is None else loss + w * v
    return loss, {k: v.detach() for k, (_, v) in terms.items()}
