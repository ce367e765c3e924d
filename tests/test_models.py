"""Tests for dfkt.models: registry, shapes, splitting, weight loading, input checks."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

from dfkt.errors import ModelError
from dfkt.models import (LeNet5, LeNet5Half, SplitNet, build_model, check_input,
                         default_input_shape, list_models, num_classes_of, resnet_backbone, split)

torch.manual_seed(0)
SMALL = [n for n in list_models() if n not in ("resnet50", "resnet101")]


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", SMALL)
def test_registry_forward_shapes(name: str) -> None:
    m = build_model(name, num_classes=7).eval()
    x = torch.randn(2, *default_input_shape(name))
    with torch.no_grad():
        assert m(x).shape == (2, 7)
    assert num_classes_of(m) == 7
    assert m.dfkt_spec == {"name": name, "num_classes": 7, "kwargs": {}}


def test_resnet50_forward_and_resnet101_build() -> None:
    m = build_model("resnet50", num_classes=12).eval()
    assert isinstance(m, SplitNet) and m.backbone.out_features == 2048
    with torch.no_grad():
        assert m(torch.randn(2, 3, 64, 64)).shape == (2, 12)
    r101 = build_model("resnet101", num_classes=5)
    assert 42_000_000 < _nparams(r101) < 44_000_000 and num_classes_of(r101) == 5


def test_lenet_sizes_and_variants() -> None:
    full, half = LeNet5(), LeNet5Half()
    assert _nparams(half) * 3 < _nparams(full)
    assert [m.out_channels for m in half.features if isinstance(m, nn.Conv2d)] == [3, 8, 60]
    assert half.fc[0].out_features == 42 and isinstance(full.head, nn.Linear)
    bn = build_model("lenet5-bn")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 3
    assert any(isinstance(m, nn.BatchNorm1d) for m in bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in full.modules())


@pytest.mark.parametrize("name", ["shot-lenet", "lenet5", "resnet18-cifar", "wrn-16-1"])
def test_split_matches_model(name: str) -> None:
    m = build_model(name).eval()
    parts = split(m)
    x = torch.randn(3, *default_input_shape(name))
    with torch.no_grad():
        assert torch.allclose(parts.logits_from_features(parts.features(x)), m(x), atol=1e-6)
        m(x)  # the model still runs normally after splitting
    feat = {id(p) for p in parts.feature_params()}
    head = {id(p) for p in parts.head_params()}
    assert feat and head and not feat & head
    assert feat | head == {id(p) for p in m.parameters()}
    assert parts.head_name == {"lenet5": "head", "shot-lenet": "head"}.get(name, "fc")


def test_split_sequential_and_errors() -> None:
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    parts = split(m)
    x = torch.randn(4, 3, 4)
    assert torch.allclose(parts.head(parts.features(x)), m(x)) and num_classes_of(m) == 3
    with pytest.raises(ModelError, match="no nn.Linear layer.*set_head"):
        split(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_shot_nets_have_weight_norm_head_and_deepcopy() -> None:
    for name in ("shot-lenet", "shot-dtn"):
        m = build_model(name)
        assert parametrize.is_parametrized(m.head.fc, "weight")
        assert isinstance(m.bottleneck.bn, nn.BatchNorm1d)
        m2 = copy.deepcopy(m).eval()
        m.eval()
        x = torch.randn(2, *default_input_shape(name))
        with torch.no_grad():
            assert torch.allclose(m(x), m2(x))
            next(m2.head.parameters()).add_(1.0)  # copies are independent
            assert not torch.allclose(m(x), m2(x))
        assert set(m2.state_dict()) == set(m.state_dict())


def test_resnet_backbone_loads_local_weights(tmp_path) -> None:
    sd = torchvision.models.resnet50(weights=None).state_dict()
    assert any(k.startswith("fc.") for k in sd)
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": sd}, path)
    net = resnet_backbone("resnet50", weights_path=str(path))
    assert torch.equal(net.conv1.weight, sd["conv1.weight"]) and isinstance(net.fc, nn.Identity)
    assert net.out_features == 2048
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match="nope.pth.*download"):
        resnet_backbone("resnet50", weights_path=str(missing))
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelError, match="do not fit"):
        resnet_backbone("resnet50", weights_path=str(path))


def test_unknown_name_and_bad_options() -> None:
    with pytest.raises(ModelError, match="lenet5-half"):
        build_model("lenet5_hlf")
    with pytest.raises(ModelError, match="accepted options"):
        build_model("wrn-16-1", widht=3)
    with pytest.raises(ModelError, match="num_classes"):
        build_model("lenet5", num_classes=0)
    m = build_model("shot-lenet", bottleneck_dim=64)
    assert m.bottleneck.out_features == 64 and m.dfkt_spec["kwargs"] == {"bottleneck_dim": 64}


def test_check_input() -> None:
    m = build_model("lenet5")
    m.train()
    assert check_input(m, (1, 32, 32)) == (2, 10)
    assert m.training  # mode restored
    with pytest.raises(ModelError, match=r"cannot take input_shape \(1, 64, 64\).*\(1, 32, 32\)"):
        check_input(m, (1, 64, 64))
    with pytest.raises(ModelError, match="input_shape"):
        check_input(m, (3, 32, 32))
