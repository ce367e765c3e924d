"""Context managers that record features and BatchNorm input statistics by module name.

They attach forward hooks on entry and remove them on exit: the model itself is never modified.
:class:`FeatureRecorder` is the one feature recorder: module outputs (or inputs) by name, and
``'penultimate'``, the input of the classifier head (the head as :func:`dfkt.models.split.find_head` finds
it), for DFKD and SFDA alike (:func:`forward_with_features`). :class:`BNStatsRecorder` is the one
BatchNorm-statistics hook: it owns the statistics of the synthetic batches (with an optional momentum
over batches) and the BN-statistics loss.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import ModelError, suggest
from .distributed import all_reduce_sum, world_size

PENULTIMATE = "penultimate"     # feature name: the input of the model's classifier head
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def named_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Look modules up by name; an unknown name raises ModelError listing close matches."""
    table = dict(model.named_modules())
    out = {}
    for n in names:
        if n not in table:
            raise ModelError(f"model has no module named {n!r}.{suggest(n, table)} "
                             f"Module names are those of model.named_modules().")
        out[n] = table[n]
    return out


def batchnorm_layers(model: nn.Module, method: str | None = None) -> dict[str, nn.Module]:
    """All BatchNorm layers by name; none at all raises ModelError (BN-statistics methods need them)."""
    bns = {n: m for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    if not bns:
        who = f"method {method!r}" if method else "this method"
        raise ModelError(f"{who} works on BatchNorm layers (their statistics or affine parameters), but the "
                         f"model ({type(model).__name__}) has no BatchNorm layers. Use a model with BatchNorm (e.g. 'lenet5-bn', "
                         f"'shot-lenet') or a method that needs none (SFDA: shot, shot-im, nrc, aad; "
                         f"DFKD: dafl, dfad, zskt, lopes).")
    return bns


class frozen_bn_stats:
    """Within the block, BatchNorm layers in train mode still normalise with the batch's statistics but
    leave their running statistics untouched (momentum 0): for forward passes on augmented views whose
    statistics must not leak into the model that is evaluated and returned.

    >>> with frozen_bn_stats(model):
    ...     logits_strong = model(strong_view)
    """

    def __init__(self, model: nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                      for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for m, mom, nbt in self.saved:
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
        return False


class FeatureRecorder:
    """Record the outputs (or inputs) of named modules during forward passes.

    ``'penultimate'`` among ``names`` records the input of the model's classifier head (its penultimate
    features), whatever ``inputs`` says. ``modules`` records given module objects under given names instead
    (e.g. a head reached through a wrapper).

    >>> with FeatureRecorder(model, ["features.3", "penultimate"]) as rec:
    ...     model(x)
    >>> rec["features.3"], rec["penultimate"]
    """

    def __init__(self, model: nn.Module | None, names: Iterable[str] = (), detach: bool = False, inputs: bool = False,
                 modules: dict[str, nn.Module] | None = None):
        names = list(names)
        plain = [n for n in names if n != PENULTIMATE]
        self.modules: dict[str, tuple[nn.Module, bool]] = {
            n: (m, inputs) for n, m in (named_modules(model, plain).items() if plain else ())}
        if PENULTIMATE in names:
            from ..models.split import find_head   # the head rule of the whole package
            self.modules[PENULTIMATE] = (model.get_submodule(find_head(model)), True)
        for n, m in (modules or {}).items():
            self.modules[n] = (m, inputs)
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str, take_input: bool):
        def fn(module, inp, out):
            t = inp[0] if take_input else out
            self.features[name] = t.detach() if self.detach else t
        return fn

    def __enter__(self) -> "FeatureRecorder":
        self._handles = [m.register_forward_hook(self._hook(n, i)) for n, (m, i) in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.features:
            raise KeyError(f"no feature recorded for {name!r}; was the model run inside the recorder?")
        return self.features[name]

    def clear(self) -> None:
        self.features.clear()


def forward_with_features(net: nn.Module, head: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``net(x)`` and the input of ``head`` in the same forward pass (works through DDP wrappers)."""
    with FeatureRecorder(None, modules={"features": head}, inputs=True) as rec:
        logits = net(x)
    return logits, rec["features"]


class BNStatsRecorder:
    """Record, for every BatchNorm layer, the per-channel mean and (biased) variance of its input.

    ``loss()`` gives DeepInversion's feature-distribution regulariser: the sum over layers of
    ||mean - running_mean||_2 + ||var - running_var||_2 (the first layer weighted by ``first_layer_weight``).
    With ``momentum > 0`` (Fast) the batch statistics are first blended with the statistics of the earlier
    synthetic batches, ``momentum * earlier + (1 - momentum) * batch``; :meth:`commit` folds the last
    batch's statistics into them (once per synthesized batch); they are state (``state_dict``) for resume.
    Under torchrun the statistics are those of the global batch (sums are all-reduced, gradients flow).
    """

    def __init__(self, model: nn.Module, method: str | None = None, names: Iterable[str] | None = None,
                 momentum: float = 0.0):
        self.layers = batchnorm_layers(model, method) if names is None else named_modules(model, names)
        self.momentum = float(momentum)
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.running: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # earlier synthetic batches
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def fn(module, inp, out):
            x = inp[0]
            dims = [0] + list(range(2, x.dim()))
            if world_size() == 1:
                self.stats[name] = (x.mean(dims), x.var(dims, unbiased=False))
                return
            n = x.numel() // x.shape[1] * world_size()
            mean = all_reduce_sum(x.sum(dims)) / n
            var = (all_reduce_sum((x * x).sum(dims)) / n - mean * mean).clamp_min(0)
            self.stats[name] = (mean, var)
        return fn

    def __enter__(self) -> "BNStatsRecorder":
        self.stats = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _blend(self, name: str, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.momentum > 0 and name in self.running:
            pm, pv = self.running[name]
            k = self.momentum
            return k * pm + (1 - k) * mean, k * pv + (1 - k) * var
        return mean, var

    def loss(self, first_layer_weight: float = 1.0) -> torch.Tensor:
        if not self.stats:
            raise RuntimeError("no BatchNorm statistics recorded: run the model inside the recorder first")
        terms = []
        for i, (name, (mean, var)) in enumerate(self.stats.items()):
            mean, var = self._blend(name, mean, var)
            m = self.layers[name]
            t = torch.norm(mean - m.running_mean, 2) + torch.norm(var - m.running_var, 2)
            terms.append(t * (first_layer_weight if i == 0 else 1.0))
        if self.momentum > 0:
            self.pending = {n: (m.detach(), v.detach()) for n, (m, v) in self.stats.items()}
        return torch.stack(terms).sum()

    def commit(self) -> None:
        """Fold the last recorded batch's statistics into the running synthetic statistics (momentum > 0)."""
        for n, (m, v) in self.pending.items():
            self.running[n] = self._blend(n, m, v)
        self.pending = {}

    def state_dict(self) -> dict:
        return {n: (m.cpu(), v.cpu()) for n, (m, v) in self.running.items()}

    def load_state_dict(self, state: dict) -> None:
        dev = next(iter(self.layers.values())).running_mean.device
        self.running = {n: (m.to(dev), v.to(dev)) for n, (m, v) in state.items()}
