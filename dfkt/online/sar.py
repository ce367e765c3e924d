"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.losses import entropy
from ..registry import register
from .base import Output, TTAMethod, check_positive
from ..errors import ModelError
from .common import NORM_TYPES, norm_affine_params, train_only


@dataclass
class SAROptions:
    e_margin: float = 0.4            # reliable samples: entropy < e_margin * ln(C)
    rho: float = 0.05                # SAM neighbourhood radius
    reset_constant: float = 0.2      # model recovery: reset when the moving average of the entropy loss < this
    momentum: float = 0.9            # SGD momentum of the base optimiser
    skip: list[str] = field(default_factory=lambda: ["layer4", "blocks.9", "blocks.10", "blocks.11", "norm"])

    def validate(self) -> None:
        check_positive("sar options", e_margin=self.e_margin, rho=self.rho)


class SAM:
    """Sharpness-aware minimisation around a base SGD optimiser (Foret et al., ICLR 2021).

    ``perturb()`` moves every parameter with a gradient by ``rho * g / ||g||`` (the ascent to the
    worst neighbour); ``step()`` restores the weights and takes the base step with the gradients
    computed there; ``zero_grad()`` also restores, so a step the NaN guard skips leaves no perturbation.
    """

    def __init__(self, params: list[nn.Parameter], rho: float, lr: float, momentum: float, weight_decay: float):
        self.base = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.rho = rho
        self.saved: list[tuple[nn.Parameter, torch.Tensor]] = []

    @property
    def param_groups(self):
        return self.base.param_groups

    @torch.no_grad()
    def perturb(self) -> None:
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not ps:
            return
        norm = torch.stack(torch._foreach_norm([p.grad for p in ps])).norm()
        scale = self.rho / (norm + 1e-12)
        self.saved = [(p, p.detach().clone()) for p in ps]
        torch._foreach_add_(ps, [p.grad * scale for p in ps])
        self.zero_grad(restore=False)

    @torch.no_grad()
    def restore(self) -> None:
        for p, old in self.saved:
            p.copy_(old)
        self.saved = []

    def step(self) -> None:
        self.restore()
        self.base.step()

    def zero_grad(self, set_to_none: bool = True, restore: bool = True) -> None:
        if restore:
            self.restore()
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


@register("sar", task="tta", family="online")
class SAR(TTAMethod):
    """SAR (Niu et al., ICLR 2023): reliable entropy minimisation with sharpness-aware steps and model recovery.

    Rules (published settings): train the normalisation layers' scale/shift except those of the top
    layers (``layer4`` of ResNets, ``blocks.9-11`` and the final ``norm`` of ViT-Base); test-batch BN
    statistics (GroupNorm/LayerNorm models make it batch-size independent: SAR's batch-size-1 setting);
    keep samples with entropy < E0 = 0.4 ln C; SAM (rho 0.05) over SGD with momentum 0.9 (ImageNet:
    lr 0.00025 per 64 samples; the public CIFAR-10-C benchmark: lr 1e-3, batch 200); the second
    (perturbed) pass re-filters with E0; a moving average of the second loss (0.9/0.1) below 0.2
    resets the model to the source (model recovery).
    """

    Options = SAROptions

    def configure(self) -> None:
        learner = self.ctx.learner
        params = [p for n, m in learner.named_modules() if isinstance(m, NORM_TYPES) and not self._skipped(n)
                  for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]
        if not params:
            norm_affine_params(learner, self.name)     # the clear error for models without norm layers
            raise ModelError(f"sar: every normalisation layer matches the skipped top layers {self.opts.skip}; "
                             f"set options.skip to fewer names.")
        self.params = train_only(learner, params)
        self.e0 = self.opts.e_margin * math.log(self.ctx.num_classes)

    def _skipped(self, name: str) -> bool:
        return any(name == s or name.startswith(s + ".") or f".{s}." in f".{name}." for s in self.opts.skip)

    def init_state(self) -> None:
        tc = self.ctx.train
        self.opt = self.track("opt", SAM(self.params, self.opts.rho, tc.lr, self.opts.momentum, tc.weight_decay))
        self.ema = self.scalar("loss_ema", 0.0)
        self.ema_set = self.scalar("loss_ema_set", 0.0)

    def forward(self, x: torch.Tensor) -> Output:
        return Output(self.ctx.learner(x))

    def adapt(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        ent = entropy(out.logits.float(), reduction="none")
        sel1 = ent.detach() < self.e0
        n1 = sel1.sum()
        terms = {"ent": ent.detach().mean(), "selected": n1.float() / x.shape[0]}
        if not bool(n1 > 0):
            return terms
        ((ent * sel1).sum() / n1).backward()
        self.opt.perturb()
        ent2 = entropy(self.ctx.learner(x).float(), reduction="none")
        sel2 = sel1 & (ent2.detach() < self.e0)
        n2 = sel2.sum()
        if not bool(n2 > 0):
            self.opt.zero_grad()
            return terms
        loss2 = (ent2 * sel2).sum() / n2
        finite = bool(torch.isfinite(loss2.detach()))
        if finite:        # the recovery criterion: moving average of the second-pass entropy loss
            with torch.no_grad():
                self.ema.copy_(torch.where(self.ema_set > 0, 0.9 * self.ema + 0.1 * loss2.detach(), loss2.detach()))
                self.ema_set.fill_(1.0)
        self.ctx.optimize(loss2, self.opt, {"ent2": loss2})
        terms["ent2"] = loss2.detach()
        if finite and bool(self.ema < self.opts.reset_constant):
            self.reset()
            terms["recovered"] = torch.ones((), device=x.device)
        return terms
