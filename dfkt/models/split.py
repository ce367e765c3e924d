"""Split any classifier into feature extractor and linear head, and read its logits.

**Which layer is the head.** In this order:

1. the layer named by :func:`set_head` (``model.dfkt_head``; config: ``model: {head: NAME}``);
2. ``backbone`` / ``head`` attributes (``bottleneck`` optional), e.g. SHOT's split networks;
3. the ``nn.Linear`` a timm model's ``get_classifier()`` returns;
4. otherwise the last ``nn.Linear`` in the model's definition order, at any depth (so a
   ``classifier = Sequential(Linear, ReLU, Linear)`` gives ``classifier.2``, never a projection
   defined before it).

:func:`find_head` with an example input checks the choice: the head is the ``nn.Linear`` whose
output *is* the model's logits; when no layer or several layers qualify it refuses with an error
that says how to point at the head. ``dfkt.adapt`` / ``distill`` / ``train_supervised`` always
check it this way on their copies.

**Which output are the logits** (:func:`logits_of`): a tensor output itself; of a tuple or list,
the first element; of a dict (or an object with a ``logits`` attribute, e.g. HuggingFace outputs),
its ``"logits"`` entry.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dfkt.errors import ModelError, suggest

HEAD_ATTR = "dfkt_head"
_POINT = ("point dfkt at the layer that outputs the logits: dfkt.models.set_head(model, 'NAME') "
          "(in a config: `model: {head: NAME}`), NAME being an nn.Linear from model.named_modules()")


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


# ----------------------------------------------------------------------------- logits
def logits_of(output) -> torch.Tensor:
    """The logits in a model's output (rule in the module docstring)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    if isinstance(output, Mapping) and torch.is_tensor(output.get("logits")):
        return output["logits"]
    if torch.is_tensor(getattr(output, "logits", None)):
        return output.logits
    what = (f"a dict with keys {sorted(map(str, output))}" if isinstance(output, Mapping)
            else type(output).__name__)
    raise ModelError(f"the model returns {what}; dfkt reads the logits as the output tensor itself, the "
                     f"first element of a tuple/list, or the 'logits' entry of a dict. Return the logits "
                     f"in one of these forms (e.g. wrap the model in a module whose forward picks them).")


def _logits_hook(_module: nn.Module, _args, output):
    return logits_of(output)


def outputs_logits(model: nn.Module) -> nn.Module:
    """Make ``model(x)`` return only the logits (a forward hook; the weights are untouched)."""
    if not any(h is _logits_hook for h in model._forward_hooks.values()):
        model.register_forward_hook(_logits_hook)
    return model


def restore_outputs(model: nn.Module) -> nn.Module:
    """Undo :func:`outputs_logits` (the model returns its own outputs again)."""
    for key, h in list(model._forward_hooks.items()):
        if h is _logits_hook:
            del model._forward_hooks[key]
    return model


# ----------------------------------------------------------------------------- head
def set_head(model: nn.Module, name: str) -> nn.Module:
    """Name the ``nn.Linear`` that outputs the logits (when dfkt cannot find it); returns ``model``."""
    table = dict(model.named_modules())
    if name not in table:
        linears = [n for n, m in table.items() if isinstance(m, nn.Linear)]
        raise ModelError(f"model {type(model).__name__} has no module named {name!r}.{suggest(name, table)} "
                         f"Its nn.Linear layers: {', '.join(linears) or 'none'}.")
    if not isinstance(table[name], nn.Linear):
        raise ModelError(f"module {name!r} is a {type(table[name]).__name__}, not an nn.Linear; the head must be "
                         f"the nn.Linear that outputs the logits (dfkt clusters and scores its input features).")
    setattr(model, HEAD_ATTR, name)
    return model


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]


def _named(model: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module and n), None)


def _structural_head(model: nn.Module) -> str:
    """The head's module name from the model's structure alone (rules 1, 3, 4)."""
    name = getattr(model, HEAD_ATTR, None)
    if name:
        table = dict(model.named_modules())
        if not isinstance(table.get(name), nn.Linear):
            set_head(model, name)          # raises the specific error
        return name
    get_cls = getattr(model, "get_classifier", None)     # timm models
    if callable(get_cls):
        try:
            cls = get_cls()
        except Exception:  # noqa: BLE001 - not timm's method after all
            cls = None
        if isinstance(cls, nn.Linear):
            found = _named(model, cls)
            if found:
                return found
        elif isinstance(cls, nn.Module) and not isinstance(cls, nn.Identity):
            inner = [n for n, m in cls.named_modules() if isinstance(m, nn.Linear)]
            base = _named(model, cls)
            if inner and base:
                return f"{base}.{inner[-1]}" if inner[-1] else base
    found = _linears(model)
    if not found:
        raise ModelError(f"cannot find a classifier head in {type(model).__name__}: it has no nn.Linear layer "
                         f"(a timm model built with num_classes=0 has none). Give it a linear classifier, or "
                         f"{_POINT}; or give the model `backbone`/`head` attributes.")
    return found[-1][0]


def find_head(model: nn.Module, example: torch.Tensor | None = None) -> str:
    """The name of the head (an ``nn.Linear``) of ``model``; ``''`` for a bare ``nn.Linear``.

    With ``example`` (a batch of inputs) the choice is checked by running the model once: the head
    is the ``nn.Linear`` whose output is the model's logits. A model whose logits come from no
    ``nn.Linear``, or equally from several, raises :class:`ModelError` saying how to name the head.
    """
    if isinstance(model, nn.Linear):
        return ""
    if _has_parts(model):
        return "head"
    guess = _structural_head(model)
    if example is None or getattr(model, HEAD_ATTR, None):
        return guess
    linears = _linears(model)
    outs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o)) for n, m in linears]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = logits_of(model(example))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    same = [n for n, _ in linears if outs.get(n) is logits]
    if not same:
        same = [n for n, _ in linears if torch.is_tensor(outs.get(n)) and outs[n].shape == logits.shape
                and torch.equal(outs[n], logits)]
    if len(same) == 1:
        return same[0]
    if not same:
        raise ModelError(f"cannot tell which layer of {type(model).__name__} outputs the logits: the model's output "
                         f"(shape {tuple(logits.shape)}) is not the output of any of its nn.Linear layers "
                         f"({', '.join(n for n, _ in linears) or 'none'}); it may be rescaled or post-processed. "
                         f"Either {_POINT}, or return the head's output unchanged.")
    raise ModelError(f"several layers of {type(model).__name__} output the logits ({', '.join(same)}); "
                     f"{_POINT}.")


def _has_parts(model: nn.Module) -> bool:
    return isinstance(getattr(model, "backbone", None), nn.Module) and \
        isinstance(getattr(model, "head", None), nn.Module) and not getattr(model, HEAD_ATTR, None)


class _Stop(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


class _UpToHead(nn.Module):
    """Runs ``model`` but returns the input of its submodule ``head_name`` (stops before the head).

    Every module of the model except the head (the siblings along the path to it) is registered
    here, so ``parameters()``, ``train()`` and ``to()`` cover everything except the head.
    """

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not registered: keeps the head out
        self.head_name = head_name
        rest = {}
        cur, prefix = model, ""
        for part in head_name.split("."):
            for n, m in cur.named_children():
                if n != part:
                    rest[(prefix + n).replace(".", "__")] = m
            cur, prefix = cur.get_submodule(part), prefix + part + "."
        self.parts = nn.ModuleDict(rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def hook(_m: nn.Module, args: tuple) -> None:
            raise _Stop(args[0])

        handle = self._model.get_submodule(self.head_name).register_forward_pre_hook(hook)
        try:
            self._model(x)
        except _Stop as s:
            return s.value
        finally:
            handle.remove()
        raise ModelError(f"model {type(self._model).__name__} never called its head {self.head_name!r} in "
                         f"forward(); {_POINT}, or give the model `backbone`/`head` attributes")


def split(model: nn.Module) -> Parts:
    """Split ``model`` so that ``head(features(x)) == model(x)`` (head rules in the module docstring)."""
    if _has_parts(model):
        bott = getattr(model, "bottleneck", None)
        return Parts(model.backbone, bott if isinstance(bott, nn.Module) else nn.Identity(),
                     model.head, "head")
    if isinstance(model, nn.Linear):
        return Parts(nn.Identity(), nn.Identity(), model, "")
    name = _structural_head(model)
    head = model.get_submodule(name)
    if isinstance(model, nn.Sequential) and "." not in name:
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
                         f"classes; give the head an `out_features` attribute, or {_POINT}")
    return linears[-1].out_features


def adopt(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Prepare a model dfkt trains or queries (a copy: it is changed in place): check which layer is the
    head (and record it on the model), and make ``model(x)`` return only the logits."""
    name = find_head(model, example)
    if name and not _has_parts(model):
        setattr(model, HEAD_ATTR, name)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        model.train(was)
    logits = logits_of(out)
    if logits.dim() != 2:
        raise ModelError(f"the model's logits have shape {tuple(logits.shape)}; dfkt needs [batch, classes] "
                         f"(pool or flatten before the head).")
    if not torch.is_tensor(out):
        outputs_logits(model)
    return model
