"""Split any classifier into feature extractor and linear head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfkt.errors import ModelError

_HEAD_NAMES = ("head", "fc", "linear", "classifier")


@dataclass(eq=False)
class Parts:
    """Views onto a model's parts (the modules are shared with the model, not copied)."""

    backbone: nn.Module
    bottleneck: nn.Module
    head: nn.Module
    head_name: str

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input for ``x``."""
        return self.bottleneck(self.backbone(x))

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def head_params(self) -> list[nn.Parameter]:
        return _unique(self.head.parameters())

    def feature_params(self) -> list[nn.Parameter]:
        """Parameters of backbone and bottleneck (never any head parameter)."""
        head = {id(p) for p in self.head.parameters()}
        ps = list(self.backbone.parameters()) + list(self.bottleneck.parameters())
        return [p for p in _unique(ps) if id(p) not in head]


def _unique(params) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class _Stop(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


class _UpToHead(nn.Module):
    """Runs ``model`` but returns the input of its child ``head_name`` (stops before the head).

    The model's other children are registered here, so ``parameters()``, ``train()`` and
    ``to()`` cover everything except the head.
    """

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not registered: keeps the head out
        self.head_name = head_name
        self.parts = nn.ModuleDict({n: m for n, m in model.named_children() if n != head_name})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def hook(_m: nn.Module, args: tuple) -> None:
            raise _Stop(args[0])

        handle = getattr(self._model, self.head_name).register_forward_pre_hook(hook)
        try:
            self._model(x)
        except _Stop as s:
            return s.value
        finally:
            handle.remove()
        raise ModelError(f"model {type(self._model).__name__} never called its head "
                         f"{self.head_name!r} in forward(); give it `backbone`/`head` attributes")


def _find_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    children = list(model.named_children())
    for name, m in reversed(children):
        if name in _HEAD_NAMES and isinstance(m, nn.Linear):
            return name, m
    for name, m in reversed(children):
        if isinstance(m, nn.Linear):
            return name, m
    return None


def split(model: nn.Module) -> Parts:
    """Split ``model`` so that ``head(features(x)) == model(x)``.

    Uses ``backbone``/``bottleneck``/``head`` attributes when present; otherwise the last
    top-level ``nn.Linear`` child (preferring ``head``/``fc``/``linear``/``classifier``).
    """
    if isinstance(getattr(model, "backbone", None), nn.Module) and \
            isinstance(getattr(model, "head", None), nn.Module):
        bott = getattr(model, "bottleneck", None)
        return Parts(model.backbone, bott if isinstance(bott, nn.Module) else nn.Identity(),
                     model.head, "head")
    if isinstance(model, nn.Linear):
        return Parts(nn.Identity(), nn.Identity(), model, "")
    found = _find_head(model)
    if found is None:
        raise ModelError(f"cannot find a classifier head in {type(model).__name__}: give the model "
                         "a final nn.Linear child (e.g. `self.fc`) or `backbone`/`head` attributes")
    name, head = found
    if isinstance(model, nn.Sequential):
        names = [n for n, _ in model.named_children()]
        backbone: nn.Module = nn.Sequential(*list(model.children())[:names.index(name)])
    else:
        backbone = _UpToHead(model, name)
    return Parts(backbone, nn.Identity(), head, name)


def num_classes_of(model: nn.Module) -> int:
    """Number of logits: the head's ``out_features`` (works for weight-normed heads)."""
    head = split(model).head
    n = getattr(head, "out_features", None)
    if isinstance(n, int):
        return n
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"head {type(head).__name__} has no nn.Linear; cannot tell the number of "
                         "classes; give the head an `out_features` attribute")
    return linears[-1].out_features
