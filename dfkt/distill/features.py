"""Feature-level transfer losses (AT, SP, PKT, RKD, FitNet) between named student/teacher layers, recorded
with the core's one :class:`~dfkt.core.hooks.FeatureRecorder` (``'penultimate'`` = the head's input)."""
from __future__ import annotations

import torch
from torch import nn

from ..core.hooks import PENULTIMATE, FeatureRecorder, named_modules
from ..core.losses import FEATURE_LOSSES, FitNetHint
from ..errors import ModelError

FEATURE_CHOICES = ("none", "at", "sp", "pkt", "rkd", "fitnet")


def auto_attention_layers(student: nn.Module, teacher: nn.Module, input_shape: tuple) -> list[str]:
    """Module names common to both nets: for each spatial size (> 1x1) the last module to produce it."""
    common = [n for n, _ in teacher.named_modules() if n and n in dict(student.named_modules())]
    per_model = []
    for net in (teacher, student):
        order: list[tuple[str, tuple]] = []
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, tuple(o.shape))))
                 for n, m in named_modules(net, common).items()]
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                net(torch.zeros((2, *input_shape), device=next(net.parameters()).device))
        finally:
            net.train(was)
            for h in hooks:
                h.remove()
        last: dict[tuple, str] = {}
        for n, shape in order:
            if len(shape) == 4 and shape[-1] > 1:
                last[shape[-2:]] = n
        per_model.append(last)
    names = [n for size, n in per_model[0].items() if per_model[1].get(size) == n]
    if not names:
        raise ModelError("no common 4-D feature layers found for attention transfer; set feature_layers to "
                         "module names of the student and teacher ('student_name:teacher_name').")
    return names


def feature_pairs(kind: str, layers: list[str], student: nn.Module, teacher: nn.Module,
                  input_shape: tuple) -> list[tuple[str, str]]:
    """(student, teacher) layer names: as given ('s:t' or one name for both), AT's auto layers, or the
    penultimate features."""
    if layers:
        return [tuple(n.split(":", 1)) if ":" in n else (n, n) for n in layers]   # type: ignore[misc]
    if kind == "at":
        return [(n, n) for n in auto_attention_layers(student, teacher, input_shape)]
    return [(PENULTIMATE, PENULTIMATE)]


class FeatureTransfer(nn.Module):
    """Feature-level transfer losses between named student/teacher layers (FitNet's adapters are trained)."""

    def __init__(self, kind: str, pairs: list[tuple[str, str]], student: nn.Module, teacher: nn.Module,
                 input_shape: tuple):
        super().__init__()
        self.kind, self.pairs = kind, pairs
        self.s_names = [s for s, _ in pairs]
        self.t_names = [t for _, t in pairs]
        FeatureRecorder(student, self.s_names), FeatureRecorder(teacher, self.t_names)   # unknown names: errors now
        probe = torch.zeros((2, *input_shape), device=next(student.parameters()).device)
        fs = self.record(student, probe, student=True, grad=False)
        ft = self.record(teacher, probe, student=False, grad=False)
        self.adapters = nn.ModuleList()
        for (s, t), a, b in zip(pairs, fs, ft):
            if kind == "at" and (a.dim() != 4 or b.dim() != 4):
                raise ModelError(f"attention transfer needs 4-D feature maps, but {s!r}/{t!r} give "
                                 f"{tuple(a.shape)}/{tuple(b.shape)}; choose convolutional layers.")
            if kind == "fitnet":
                conv = a.dim() == 4 and b.dim() == 4
                self.adapters.append(FitNetHint(a.shape[1], b.shape[1], conv=conv))

    def record(self, net: nn.Module, x: torch.Tensor, student: bool, grad: bool = True,
               forward: nn.Module | None = None) -> list[torch.Tensor]:
        """Run ``forward`` (default ``net``; e.g. its DDP wrapper) on ``x``, hooks on ``net``'s modules."""
        names = self.s_names if student else self.t_names
        ctx = torch.enable_grad() if grad else torch.no_grad()
        was = net.training
        if not grad:
            net.eval()
        with ctx, FeatureRecorder(net, names) as rec:
            logits = (forward or net)(x)
        net.train(was)
        self.last_logits = logits
        return [rec[n] for n in names]

    def loss(self, fs: list[torch.Tensor], ft: list[torch.Tensor]) -> torch.Tensor:
        terms = []
        for i, (a, b) in enumerate(zip(fs, ft)):
            if self.kind == "fitnet":
                a = a if a.dim() == 4 and b.dim() == 4 else a.flatten(1)
                b = b if a.dim() == 4 else b.flatten(1)
                terms.append(self.adapters[i](a, b))
            else:
                terms.append(FEATURE_LOSSES[self.kind](a, b.detach()))
        return torch.stack(terms).sum()
