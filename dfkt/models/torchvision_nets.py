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
