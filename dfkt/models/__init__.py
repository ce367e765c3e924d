"""Model zoo for dfkt: a name registry, splitting helpers and an input check."""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from dfkt.errors import ModelError, suggest
from dfkt.models.cifar import (CifarResNet, WideResNet, resnet18_cifar, resnet34_cifar,
                               wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2)
from dfkt.models.digits import (Bottleneck, DTNBase, Head, LeNetBase, SplitNet, WNLinear,
                                shot_digit_net)
from dfkt.models.lenet import LeNet5, LeNet5Half
from dfkt.models.split import Parts, num_classes_of, split
from dfkt.models.torchvision_nets import object_net, resnet_backbone

__all__ = [
    "build_model", "list_models", "default_input_shape", "check_input", "split", "Parts",
    "num_classes_of", "LeNet5", "LeNet5Half", "LeNetBase", "DTNBase", "Bottleneck", "Head",
    "WNLinear", "SplitNet", "shot_digit_net", "CifarResNet", "WideResNet", "resnet18_cifar",
    "resnet34_cifar", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "resnet_backbone",
    "object_net",
]


def _lenet5(num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
            batchnorm: bool = False) -> LeNet5:
    return LeNet5(num_classes, in_channels, width, batchnorm)


def _lenet5_half(num_classes: int = 10, in_channels: int = 1, batchnorm: bool = False) -> LeNet5:
    return LeNet5Half(num_classes, in_channels, batchnorm)


def _shot(arch: str, num_classes: int = 10, bottleneck_dim: int = 256, bottleneck: str = "bn",
          head: str = "wn") -> SplitNet:
    return shot_digit_net(arch, num_classes, bottleneck_dim, bottleneck, head)


def _object(arch: str, num_classes: int = 10, weights_path: str | None = None,
            bottleneck_dim: int = 256) -> SplitNet:
    return object_net(arch, num_classes, weights_path, bottleneck_dim)


def _with(fn: Callable[..., nn.Module], **fixed: Any) -> Callable[..., nn.Module]:
    f = partial(fn, **fixed)
    sig = inspect.signature(fn)
    f.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n not in fixed])
    return f


# name -> (builder(num_classes=..., **kwargs), expected input shape C x H x W)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[int, int, int]]] = {
    "lenet5": (_lenet5, (1, 32, 32)),
    "lenet5-half": (_lenet5_half, (1, 32, 32)),
    "lenet5-bn": (_with(_lenet5, batchnorm=True), (1, 32, 32)),
    "lenet5-half-bn": (_with(_lenet5_half, batchnorm=True), (1, 32, 32)),
    "shot-lenet": (_with(_shot, arch="lenet"), (1, 28, 28)),
    "shot-dtn": (_with(_shot, arch="dtn"), (3, 32, 32)),
    "resnet18-cifar": (resnet18_cifar, (3, 32, 32)),
    "resnet34-cifar": (resnet34_cifar, (3, 32, 32)),
    "wrn-16-1": (wrn_16_1, (3, 32, 32)),
    "wrn-16-2": (wrn_16_2, (3, 32, 32)),
    "wrn-40-1": (wrn_40_1, (3, 32, 32)),
    "wrn-40-2": (wrn_40_2, (3, 32, 32)),
    "resnet50": (_with(_object, arch="resnet50"), (3, 224, 224)),
    "resnet101": (_with(_object, arch="resnet101"), (3, 224, 224)),
}


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(_REGISTRY)


def _lookup(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}.{suggest(key, _REGISTRY)} "
                         f"Known models: {', '.join(_REGISTRY)}")
    return key


def default_input_shape(name: str) -> tuple[int, int, int]:
    """The C x H x W input the registry model ``name`` is designed for."""
    return _REGISTRY[_lookup(name)][1]


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registry model; ``model.dfkt_spec`` records how to rebuild it."""
    key = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    builder = _REGISTRY[key][0]
    try:
        inspect.signature(builder).bind(num_classes=num_classes, **kwargs)
    except TypeError as e:
        allowed = [n for n in inspect.signature(builder).parameters if n != "num_classes"]
        raise ModelError(f"bad options for model {key!r}: {e}; accepted options: {allowed}") from e
    model = builder(num_classes=num_classes, **kwargs)
    model.dfkt_spec = {"name": key, "num_classes": num_classes, "kwargs": dict(kwargs)}
    return model


def check_input(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Run a zeros batch of shape (2, *input_shape) through ``model``; return the output shape."""
    shape = tuple(int(s) for s in input_shape)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    spec = getattr(model, "dfkt_spec", None)
    if isinstance(spec, dict) and spec.get("name") in _REGISTRY:
        expects = f"input of shape {_REGISTRY[spec['name']][1]} (C, H, W)"
    else:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        expects = (f"{conv.in_channels} input channels and the image size it was designed for"
                   if conv is not None else "the input size of its first layer")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *shape), device=device))
    except RuntimeError as e:
        raise ModelError(f"model cannot take input_shape {shape}: {e}; "
                         f"the model expects {expects}") from e
    finally:
        model.train(was_training)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return tuple(out.shape)
