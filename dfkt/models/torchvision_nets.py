"""ImageNet ResNet backbones from torchvision (weights only from a local file)."""
from __future__ import annotations

import os
from typing import Any

import torch
import torchvision
from torch import nn

from dfkt.errors import ModelError
from dfkt.models.digits import Bottleneck, Head, SplitNet

_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ModelError(
            f"weights file {path!r} does not exist; download the torchvision ImageNet weights "
            "file (e.g. resnet50-0676ba61.pth) on a machine with internet and pass its local path")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise ModelError(f"cannot read weights file {path!r}: {e}; pass a torch-saved "
                         "state_dict (or a dict with a 'state_dict' key)") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"weights file {path!r} holds a {type(obj).__name__}, not a state_dict; "
                         "save model.state_dict() instead")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def resnet_backbone(name: str = "resnet50", weights_path: str | None = None) -> nn.Module:
    """torchvision ResNet with ``fc`` replaced by Identity: images -> pooled flat features."""
    if name not in _ARCHS:
        raise ModelError(f"torchvision backbone {name!r} is unknown; use one of {list(_ARCHS)}")
    net = getattr(torchvision.models, name)(weights=None)
    out_features = net.fc.in_features
    net.fc = nn.Identity()
    if weights_path is not None:
        sd = {k: v for k, v in _load_state_dict(os.fspath(weights_path)).items()
              if not k.startswith("fc.")}
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ModelError(f"weights in {weights_path!r} do not fit torchvision {name}: {e}; "
                             f"pass the ImageNet weights file for {name}") from e
    net.out_features = out_features
    return net


def object_net(arch: str = "resnet50", num_classes: int = 31, weights_path: str | None = None,
               bottleneck_dim: int = 256) -> SplitNet:
    """SHOT's Office/VisDA model: ResNet backbone + BN bottleneck + weight-normalised head."""
    backbone = resnet_backbone(arch, weights_path)
    return SplitNet(backbone, Bottleneck(backbone.out_features, bottleneck_dim, "bn"),
                    Head(bottleneck_dim, num_classes, "wn"))


def _load_local_weights(model: nn.Module, path: str, what: str) -> None:
    """Load a local state_dict into ``model``; the classifier's tensors are skipped when their shape
    differs (another number of classes), everything else must fit."""
    from dfkt.models.split import find_head

    sd = _load_state_dict(os.fspath(path))
    own = model.state_dict()
    head = find_head(model)
    skipped = [k for k, v in sd.items() if k.startswith(head + ".") and k in own and own[k].shape != v.shape]
    for k in skipped:
        sd.pop(k)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise ModelError(f"weights in {path!r} do not fit {what}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; pass the weights file of that architecture")


def external_model(library: str, arch: str, num_classes: int = 10, weights_path: str | None = None,
                   **kwargs: Any) -> nn.Module:
    """A timm (``library='timm'``) or torchvision classifier with ``num_classes`` outputs and random
    weights, or local weights from ``weights_path``; nothing is downloaded."""
    if library == "timm":
        try:
            import timm
        except ImportError:
            raise ModelError(f"model 'timm:{arch}' needs the optional package timm: pip install 'dfkt[timm]' "
                             f"(or pip install timm)") from None
        if not timm.is_model(arch):
            from dfkt.errors import suggest

            raise ModelError(f"timm has no model {arch!r}.{suggest(arch, timm.list_models())} "
                             f"See timm.list_models().")
        if kwargs.get("pretrained"):
            raise ModelError("pretrained=True would download weights; pass weights_path=LOCAL_FILE instead")
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
        except TypeError as e:
            raise ModelError(f"bad options for timm model {arch!r}: {e}") from e
    else:
        names = torchvision.models.list_models(module=torchvision.models)
        if arch not in names:
            from dfkt.errors import suggest

            raise ModelError(f"torchvision has no classifier {arch!r}.{suggest(arch, names)} Classifiers: "
                             f"{', '.join(names)}.")
        if kwargs.get("weights") is not None:
            raise ModelError("weights=... would download weights; pass weights_path=LOCAL_FILE instead")
        try:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        except (TypeError, ValueError) as e:
            raise ModelError(f"bad options for torchvision model {arch!r}: {e}") from e
    if weights_path is not None:
        _load_local_weights(model, weights_path, f"{library} {arch}")
    return model
