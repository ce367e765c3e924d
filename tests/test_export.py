"""Export round trips: TorchScript always, ONNX when the optional packages are installed."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import dfkt
from dfkt.cli import main
from dfkt.data import get_domain
from dfkt.errors import ConfigError
from dfkt.models import build_model

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def shot_ckpt(tmp_path_factory):
    """A SHOT digit net (weight-normalised head) trained for one epoch and saved as model.pt."""
    out = tmp_path_factory.mktemp("src")
    dfkt.train_supervised(build_model("shot-lenet", seed=0), get_domain("digits", split="test"), epochs=1,
                          batch_size=128, device="cpu", progress=False, out=out)
    return out / "model.pt"


def test_torchscript_folds_weight_norm_and_matches(shot_ckpt, tmp_path, capsys):
    assert main(["export", str(shot_ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.ts"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "m.ts" in printed and "MB" in printed and "1x28x28" in printed
    ts = torch.jit.load(str(tmp_path / "m.ts"))
    assert not any("parametrizations" in k or k.endswith("weight_g") for k in ts.state_dict())   # folded
    model = dfkt.load(shot_ckpt)
    x = torch.randn(5, 1, 28, 28)          # another batch size than the export's check
    with torch.no_grad():
        assert torch.allclose(ts(x), model(x), atol=1e-4)


def test_export_of_a_module_with_tuple_output_and_errors(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))

        def forward(self, x):
            f = self.body(x)
            return self.fc(f), f

    net = Net().eval()
    res = dfkt.export(net, format="torchscript", out=tmp_path / "n.ts", input_shape=(3, 16, 16))
    assert res.max_abs_diff <= 1e-4 and res.size_bytes == (tmp_path / "n.ts").stat().st_size
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(res.path))(x), net(x)[0], atol=1e-4)
    assert nn.utils.parametrize.is_parametrized(net.fc)          # the caller's model is untouched
    with pytest.raises(ConfigError, match="input shape.*input_shape=\\(C, H, W\\)"):
        dfkt.export(net, format="torchscript", out=tmp_path / "x.ts")
    with pytest.raises(ConfigError, match="Did you mean 'torchscript'"):
        dfkt.export(net, format="torchscrpt", input_shape=(3, 16, 16))


@pytest.mark.skipif(not HAVE_ONNX, reason="ONNX export needs the optional extra dfkt[onnx] "
                                          "(onnx, onnxscript, onnxruntime), not installed")
def test_onnx_round_trip_with_onnxruntime(shot_ckpt, tmp_path, capsys):
    import onnxruntime as ort

    assert main(["export", str(shot_ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "-q"]) == 0
    assert "m.onnx" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.data"))                # one file: the weights are inside
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 1, 28, 28)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), dfkt.load(shot_ckpt)(x), atol=1e-4)
