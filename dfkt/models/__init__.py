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
from dfkt.models.small import DigitCNN
from dfkt.models.split import (Parts, find_head, logits_of, num_classes_of, outputs_logits, restore_outputs,
                               set_head, split)
from dfkt.models.torchvision_nets import external_model, object_net, resnet_backbone

__all__ = [
    "build_model", "list_models", "default_input_shape", "check_input", "split", "Parts",
    "num_classes_of", "find_head", "set_head", "logits_of", "outputs_logits", "restore_outputs", "LeNet5", "LeNet5Half", "LeNetBase", "DTNBase", "Bottleneck", "Head",
    "WNLinear", "SplitNet", "DigitCNN", "shot_digit_net", "CifarResNet", "WideResNet", "resnet18_cifar",
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
    "digit-cnn": (DigitCNN, (1, 28, 28)),
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
    """Names accepted by :func:`build_model` (besides ``timm:NAME`` and ``torchvision:NAME``)."""
    return list(_REGISTRY)


_PREFIXES = ("timm:", "torchvision:")


def _lookup(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}.{suggest(key, _REGISTRY)} "
                         f"Known models: {', '.join(_REGISTRY)}; or any timm / torchvision classifier as "
                         f"'timm:NAME' / 'torchvision:NAME' (config: `model: {{timm: NAME}}`).")
    return key


def default_input_shape(name: str) -> tuple[int, int, int]:
    """The C x H x W input the registry model ``name`` is designed for."""
    return _REGISTRY[_lookup(name)][1]


def _check_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    if num_classes == 1:
        raise ModelError("num_classes=1: a classifier needs at least 2 classes (its softmax over one class is "
                         "always 1); for a binary task use num_classes=2.")


def build_model(name: str, num_classes: int = 10, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a model; ``model.dfkt_spec`` records how to rebuild it (``dfkt.load`` uses it).

    ``name``: a registry name (:func:`list_models`), ``'timm:NAME'`` (any timm model, needs
    ``pip install dfkt[timm]``) or ``'torchvision:NAME'`` (any torchvision classifier); ``kwargs``
    go to the builder (timm/torchvision: ``create_model`` / ``get_model`` arguments; ``weights_path``
    loads local weights, the classifier too when its shape fits). ``seed``: the initial weights are
    drawn from a generator seeded with it (the global RNG is left as it was), so the same call gives
    the same weights in every process; without it they come from the global RNG (``torch.manual_seed``).
    """
    _check_classes(num_classes)
    text = str(name).strip()
    external = next((p for p in _PREFIXES if text.lower().startswith(p)), None)
    if external is not None:
        arch = text[len(external):].strip()
        key = f"{external}{arch}"
        builder: Callable[..., nn.Module] = partial(external_model, external[:-1], arch)
    else:
        key = _lookup(text)
        builder = _REGISTRY[key][0]
        try:
            inspect.signature(builder).bind(num_classes=num_classes, **kwargs)
        except TypeError as e:
            allowed = [n for n in inspect.signature(builder).parameters if n != "num_classes"]
            raise ModelError(f"bad options for model {key!r}: {e}; accepted options: {allowed}") from e
    if seed is None:
        model = builder(num_classes=num_classes, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(num_classes=num_classes, **kwargs)
    model.dfkt_spec = {"name": key, "num_classes": num_classes, "kwargs": dict(kwargs)}
    if seed is not None:
        model.dfkt_spec["seed"] = seed
    return model


def _designed_shape(model: nn.Module) -> tuple[int, int, int] | None:
    spec = getattr(model, "dfkt_spec", None)
    if isinstance(spec, dict) and spec.get("name") in _REGISTRY:
        return _REGISTRY[spec["name"]][1]
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)   # timm
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)                 # timm ViTs: fixed
    if isinstance(cfg, dict) and size is not None and len(tuple(cfg.get("input_size", ()))) == 3:
        chans = getattr(getattr(model.patch_embed, "proj", None), "in_channels", cfg["input_size"][0])
        return (int(chans), *(int(s) for s in size))
    return None


_RESIZE_HINT = ("resize the data to it: image folders/lists are resized to `resize` then centre-cropped to `crop` "
                "(default 256 and 224; e.g. `resize: 32, crop: 32` for a 32x32 model), named domains and npz "
                "files take `size`")


def check_input(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Run a zeros batch of shape (2, *input_shape) through ``model``; return the output (logits) shape."""
    shape = tuple(int(s) for s in input_shape)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    designed = _designed_shape(model)
    if designed is not None:
        expects = f"input of shape {designed} (C, H, W)"
    else:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        expects = (f"{conv.in_channels} input channels and the image size it was designed for"
                   if conv is not None else "the input size of its first layer")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *shape), device=device, dtype=dtype))
    except (RuntimeError, AssertionError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise ModelError(f"model cannot take input_shape {shape}: {first}; the model expects {expects}: "
                         f"{_RESIZE_HINT}, or build the model for this size (timm: e.g. img_size=...)") from e
    finally:
        model.train(was_training)
    out = logits_of(out)
    if designed is not None and tuple(designed[1:]) != shape[1:]:
        import logging

        logging.getLogger("dfkt").warning(
            "the model is designed for %dx%d inputs but gets %dx%d ones; if that is not meant, %s",
            designed[1], designed[2], shape[1], shape[2], _RESIZE_HINT)
    return tuple(out.shape)
