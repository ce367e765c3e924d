"""Any classifier: head finding (nested, timm, Sequential, never a projection), tuple/dict outputs,
timm / torchvision models through every entry point, checkpoints that rebuild them, tent without BN,
and reproducible initial weights. Random weights and tiny inputs only."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import dfkt
from dfkt.data import ArrayDataset
from dfkt.errors import ModelError
from dfkt.models import build_model, find_head, logits_of, num_classes_of, set_head, split

CPU = {"device": "cpu", "progress": False}
try:
    import timm  # noqa: F401
    HAVE_TIMM = True
except ImportError:
    HAVE_TIMM = False
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="timm is not installed (optional extra: pip install 'dfkt[timm]')")


def _target(n: int = 8, classes: int = 4, shape=(3, 32, 32)) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randn(n, *shape, generator=g), torch.arange(n) % classes, num_classes=classes)


class ProjectionThenMLP(nn.Module):
    """A top-level projection defined before a Sequential classifier (the old trap)."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(8, 64)
        self.classifier = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.classifier(self.proj(self.features(x)))


class TupleNet(ProjectionThenMLP):
    def forward(self, x):
        f = self.proj(self.features(x))
        return self.classifier(f), f


class DictNet(ProjectionThenMLP):
    def forward(self, x):
        return {"features": self.features(x), "logits": super().forward(x)}


class ScaledNet(ProjectionThenMLP):
    def forward(self, x):
        return super().forward(x) * 2.0


class HeadDefinedFirst(nn.Module):
    """The head is defined before a layer that forward() runs earlier: only running it tells."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU())

    def forward(self, x):
        return self.fc(self.body(x))


def test_head_is_never_a_projection_and_split_matches():
    m = ProjectionThenMLP().eval()
    x = torch.randn(3, 3, 32, 32)
    assert find_head(m) == find_head(m, x) == "classifier.2"
    parts = split(m)
    assert parts.head is m.classifier[2] and num_classes_of(m) == 4
    with torch.no_grad():
        assert torch.allclose(parts.head(parts.features(x)), m(x))
    head_ids = {id(p) for p in parts.head_params()}
    feat = {id(p) for p in parts.feature_params()}
    assert not head_ids & feat and head_ids | feat == {id(p) for p in m.parameters()}
    assert {id(p) for p in m.proj.parameters()} <= feat          # the projection trains with the features


def test_running_the_model_decides_the_head():
    m = HeadDefinedFirst()
    x = torch.randn(2, 3, 8, 8)
    assert find_head(m) == "body.1"          # structure alone: the last-defined nn.Linear ...
    assert find_head(m, x) == "fc"           # ... but the model's output comes from fc
    res = dfkt.adapt(m, _target(8, 4, (3, 8, 8)), method="shot", epochs=1, batch_size=4, **CPU)
    assert res.model.dfkt_head == "fc" and torch.equal(res.model.fc.weight, m.fc.weight)   # head frozen


def test_unclear_head_is_refused_with_how_to_point_at_it():
    m = ScaledNet()
    with pytest.raises(ModelError, match=r"not the output of any of its nn.Linear.*set_head\(model, 'NAME'\)"
                                         r".*model: \{head: NAME\}"):
        dfkt.adapt(m, _target(), method="shot", epochs=1, batch_size=4, **CPU)
    set_head(m, "classifier.2")              # told: it works
    res = dfkt.adapt(m, _target(), method="shot", epochs=1, batch_size=4, **CPU)
    assert res.model.dfkt_head == "classifier.2"
    with pytest.raises(ModelError, match="not an nn.Linear"):
        set_head(m, "classifier")
    with pytest.raises(ModelError, match="no module named 'clasifier.2'.*Did you mean"):
        set_head(m, "clasifier.2")


@pytest.mark.parametrize("net", [TupleNet, DictNet])
def test_tuple_and_dict_outputs(net):
    m = net()
    x = torch.randn(2, 3, 32, 32)
    assert logits_of(m(x)).shape == (2, 4)
    res = dfkt.adapt(m, _target(), method="shot", epochs=1, batch_size=4, **CPU)
    assert res.acc == res.acc                 # scored: the logits were found
    out = res.model(x)                        # the returned model returns what the user's did
    assert isinstance(out, type(m(x)))
    d = dfkt.distill(m, net(), method="dafl", input_shape=(3, 32, 32), epochs=1, iters_per_epoch=1,
                     batch_size=4, **CPU)
    assert isinstance(d.model(x), type(m(x)))
    with pytest.raises(ModelError, match="first element of a tuple/list, or the 'logits' entry"):
        logits_of({"feats": x})


def small_vgg_bn(num_classes: int = 4, seed: int = 0) -> nn.Module:
    """torchvision's VGG class with BatchNorm features and its 3-Linear Sequential classifier, narrow
    (vgg11_bn itself has 129 M parameters, 25 088 x 4 096 in its first classifier layer alone)."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = torchvision.models.VGG(torchvision.models.vgg.make_layers([8, "M", 16, "M", 32, "M"], batch_norm=True),
                                   num_classes=num_classes)
        m.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, num_classes))
    return m


# name, builder kwargs: timm (resnet, efficientnet, mobilenetv3, convnext, vit) and torchvision
# (mobilenet_v3, vgg_bn, densenet), random weights, 32x32 inputs, 4 classes
ARCHS = [
    pytest.param("timm:resnet18", {}, marks=needs_timm),
    pytest.param("timm:efficientnet_b0", {}, marks=needs_timm),
    pytest.param("timm:mobilenetv3_small_050", {}, marks=needs_timm),
    pytest.param("timm:convnext_atto", {}, marks=needs_timm),
    pytest.param("timm:vit_tiny_patch16_224", {"img_size": 32}, marks=needs_timm),
    pytest.param("torchvision:mobilenet_v3_small", {}),
    pytest.param(small_vgg_bn, {}),
    pytest.param("torchvision:densenet121", {}),
]


@pytest.mark.parametrize("name,kwargs", ARCHS)
def test_one_adapt_and_one_distill_step(name, kwargs):
    def build(seed):
        return name(4, seed) if callable(name) else build_model(name, num_classes=4, seed=seed, **kwargs)

    model = build(0)
    # (random weights and images: the collapse guard would roll back; this test looks at the step itself)
    res = dfkt.adapt(model, _target(), method="shot", epochs=1, batch_size=4, on_collapse="warn", **CPU)
    assert res.history.last["step"] == 2 and 0 <= res.acc <= 100
    changed = [k for k, v in res.model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, model.state_dict()[k])]
    assert changed and not any(k.startswith(res.model.dfkt_head + ".") for k in changed)   # head frozen
    d = dfkt.distill(model, build(1), method="dafl",
                     input_shape=(3, 32, 32), epochs=1, iters_per_epoch=1, batch_size=4, **CPU)
    assert d.history.last["step"] == 1


@needs_timm
@pytest.mark.parametrize("name,kwargs", [("timm:convnext_atto", {}), ("timm:vit_tiny_patch16_224", {"img_size": 32})])
def test_tent_adapts_layer_norms_without_batchnorm(name, kwargs):
    model = build_model(name, num_classes=4, seed=0, **kwargs)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    res = dfkt.adapt(model, _target(), method="tent", epochs=1, batch_size=4, on_collapse="warn", **CPU)
    before = model.state_dict()
    changed = {k for k, v in res.model.state_dict().items() if not torch.equal(v, before[k])}
    norm_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
                   for p in ("weight", "bias")}
    assert changed and changed <= norm_params


@needs_timm
def test_timm_config_checkpoint_and_cli(tmp_path, monkeypatch):
    import yaml

    from dfkt.cli import main

    monkeypatch.chdir(tmp_path)
    ds = _target(16, 4)
    res = dfkt.train_supervised(build_model("timm:resnet18", num_classes=4, seed=0), ds, epochs=1, batch_size=8,
                                out="src", **CPU)
    loaded = dfkt.load("src/model.pt")       # rebuilt from the timm name and arguments, no code
    assert loaded.dfkt_spec["name"] == "timm:resnet18" and type(loaded).__name__ == "ResNet"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), res.model.eval()(x), atol=1e-6)
    np_path = tmp_path / "t.npz"
    import numpy as np

    np.savez(np_path, images=ds.images.numpy(), labels=ds.labels.numpy())
    cfg = {"method": "tent", "source_model": "src/model.pt", "model": {"timm": "resnet18", "num_classes": 4},
           "target": {"npz": str(np_path), "layout": "NCHW"}, "train": {"epochs": 1, "batch_size": 8},
           "out": "adapted"}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["adapt", "a.yaml", "--no-progress", "-q"]) == 0
    assert dfkt.load("adapted/model.pt").dfkt_spec["name"] == "timm:resnet18"


def test_config_names_a_head_and_torchvision_models():
    from dfkt.runconfig import ModelRef

    m = ModelRef(torchvision="mobilenet_v3_small", num_classes=3, seed=0).build()
    assert m.dfkt_spec["name"] == "torchvision:mobilenet_v3_small" and num_classes_of(m) == 3
    m2 = ModelRef(torchvision="mobilenet_v3_small", num_classes=3, seed=0).build()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert ModelRef(torchvision="mobilenet_v3_small", head="classifier.3").build().dfkt_head == "classifier.3"
    from dfkt.config import from_dict
    from dfkt.errors import ConfigError

    with pytest.raises(ConfigError, match="one of name, timm, torchvision"):
        from_dict(ModelRef, {"name": "lenet5", "timm": "resnet18"})
    with pytest.raises(ModelError, match="torchvision has no classifier 'mobilenet_v3_smal'.*mobilenet_v3_small"):
        build_model("torchvision:mobilenet_v3_smal")


def test_build_model_seed_gives_the_same_weights_in_two_processes(tmp_path):
    script = textwrap.dedent("""
        import hashlib, sys, torch
        import dfkt
        from dfkt.data import get_domain
        from dfkt.models import build_model
        torch.set_num_threads(1)
        m = build_model("lenet5", seed=0)
        data = get_domain("digits", split="test", size=32).subset(list(range(128)))
        res = dfkt.train_supervised(m, data, seed=0, epochs=1, batch_size=32, device="cpu", progress=False)
        h = hashlib.sha1()
        for v in res.model.state_dict().values():
            h.update(v.numpy().tobytes())
        print(h.hexdigest())
    """)
    path = tmp_path / "s.py"
    path.write_text(script)
    import os

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = [subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout.split()[-1] == runs[1].stdout.split()[-1]
    # the global RNG is left alone: seeding construction does not shift what comes after
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    build_model("lenet5", seed=0)
    assert torch.equal(torch.rand(3), a)
