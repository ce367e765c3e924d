"""ROID: universal test-time adaptation through weight ensembling, diversity weighting and prior
correction (Marsden et al., WACV 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.losses import entropy, soft_ce
from ..registry import register
from .base import Output, TTAMethod, check_positive, check_unit
from .common import has_batchnorm, norm_affine_params, train_only, tta_augment


@dataclass
class ROIDOptions:
    weighting: bool = True          # certainty x diversity sample weights
    prior_correction: bool = True   # rescale the scored logits by the smoothed batch prior
    consistency: bool = True        # symmetric CE between an augmented view and the prediction
    momentum_src: float = 0.99      # weight ensembling: theta <- 0.99 theta + 0.01 theta_source after each step
    momentum_probs: float = 0.9     # moving average of the class probabilities (diversity weight)
    temperature: float = 1 / 3      # of the sample weights

    def validate(self) -> None:
        check_unit("roid options", momentum_src=self.momentum_src, momentum_probs=self.momentum_probs)
        check_positive("roid options", temperature=self.temperature)


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """ROID's self-training loss per sample: -sum_c p_c log(p_c / (1 - p_c)), p clipped at ``clip``."""
    p = F.softmax(logits, 1).clamp(max=clip)
    return -(p * torch.log(p / (1 - p) + eps)).sum(1)


def _minmax(w: torch.Tensor) -> torch.Tensor:
    return (w - w.min()) / (w.max() - w.min()).clamp_min(1e-8)


@register("roid", task="tta", family="online")
class ROID(TTAMethod):
    """ROID (Marsden et al., WACV 2024): weighted soft-likelihood-ratio self-training with weight ensembling and prior correction.

    Rules (published settings, CIFAR-10-C: Adam lr 1e-3, batch 200): train the normalisation layers'
    scale/shift with test-batch BN statistics; the loss is the soft likelihood ratio of each sample
    weighted by exp(diversity x certainty / (1/3)) (both min-max normalised: diversity = 1 - cos of the
    prediction to a moving average of class probabilities, momentum 0.9; certainty = -entropy), and
    samples below the mean diversity get weight 0; plus the symmetric CE between the model's output on
    an augmented view and on the original, same weights; both summed and divided by the batch size;
    after each step the trained weights are ensembled with the source (0.99 / 0.01); the scored
    logits are multiplied by the smoothed batch prior (prior + s) / (1 + s C) with
    s = max(1/B, 1/C) / max(prior) (prior correction; the logits, as the reference code does).
    """

    Options = ROIDOptions

    def configure(self) -> None:
        learner = self.ctx.learner
        self.params = train_only(learner, norm_affine_params(learner, self.name))
        names = {id(p): n for n, p in learner.named_parameters()}
        state = learner.state_dict()
        self.src = [state[names[id(p)]].detach().clone() for p in self.params]    # the source weights
        self.has_bn = has_batchnorm(learner)

    def init_state(self) -> None:
        self.opt = self.optimizer(self.params)
        k = self.ctx.num_classes
        self.class_probs = self.vector("class_probs", torch.full((k,), 1.0 / k))

    def forward(self, x: torch.Tensor) -> Output:
        logits = self.ctx.learner(x)
        scored = logits.detach().float()
        if self.opts.prior_correction:
            prior = F.softmax(scored, 1).mean(0)
            b, k = scored.shape
            smooth = max(1.0 / b, 1.0 / k) / prior.max()
            scored = scored * ((prior + smooth) / (1 + smooth * k))
        return Output(scored, {"logits": logits})

    def adapt(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        logits = out.extra["logits"].float()
        n = x.shape[0]
        b = self.plan.batch_size
        if self.opts.weighting:
            with torch.no_grad():
                p = F.softmax(logits, 1)
                div = _minmax(1 - F.cosine_similarity(self.class_probs.unsqueeze(0), p, dim=1))
                keep = div >= div.mean()
                cert = _minmax(-entropy(logits, reduction="none"))
                w = torch.exp(div * cert / self.opts.temperature) * keep
                m = self.opts.momentum_probs
                self.class_probs.mul_(m).add_((1 - m) * p.mean(0))
        else:
            w = torch.ones(n, device=x.device)
            keep = torch.ones(n, dtype=torch.bool, device=x.device)
        loss = (soft_likelihood_ratio(logits) * w).sum() / b
        terms = {"slr": loss.detach()}
        if self.opts.consistency:
            idx = keep.nonzero().squeeze(1)          # host sync: the augmented pass takes the kept samples only
            if idx.numel() >= (2 if self.has_bn else 1):
                aug = self.ctx.learner(tta_augment(x[idx], self.ctx.rng, cotta=False)).float()
                ref = logits[idx]
                sce = 0.5 * soft_ce(aug, ref) + 0.5 * soft_ce(ref, aug)
                cons = (sce * w[idx]).sum() / b
                loss = loss + cons
                terms["consistency"] = cons.detach()
        self.ctx.optimize(loss, self.opt, terms)
        with torch.no_grad():      # weight ensembling with the source model
            torch._foreach_lerp_(self.params, self.src, 1.0 - self.opts.momentum_src)
        return terms
