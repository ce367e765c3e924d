"""The mistakes a new user makes with their own data and models (issue 11, item 4), and the data kinds
they bring: each gives a clear one-line error naming the fix, or correct behaviour."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import dfkt
from dfkt.cli import main
from dfkt.data import ArrayDataset, ImageFolder, ImageList, get_domain, load_npz
from dfkt.errors import ConfigError, DataError, ModelError
from dfkt.models import build_model
from dfkt.runconfig import DataRef

CPU = {"device": "cpu", "progress": False}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return get_domain("digits", split="test", size=28)


@pytest.fixture(scope="module")
def source(digits):
    return dfkt.train_supervised(build_model("shot-lenet", seed=0), get_domain("digits", split="train"),
                                 epochs=2, batch_size=64, **CPU).model


def _run(args: list[str], stdin=None, shell=False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, shell=shell)


# ----------------------------------------------------------------------------- non-finite inputs
def test_nan_in_the_target_is_refused_with_indices_and_bn_stays_finite(source, digits):
    x = digits.images.clone()
    x[[3, 17]] = float("nan")
    with pytest.raises(DataError, match=r"2 of 359 images hold NaN/inf.*\[3, 17\]"):
        ArrayDataset(x, digits.labels)

    class Wrapped(torch.utils.data.Dataset):       # a custom data set: checked batch by batch on the host
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], digits.labels[i], i

    before = {k: v.clone() for k, v in source.state_dict().items()}
    for method in ("adabn", "shot"):
        with pytest.raises(DataError, match=r"NaN/inf values \(sample indices \[(3|17)"):
            dfkt.adapt(source, Wrapped(), method=method, epochs=1, **CPU)
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())


def test_a_skipped_step_restores_batchnorm_statistics():
    from dfkt.core.context import Context, TrainConfig

    net = build_model("lenet5-bn", seed=0)
    ctx = Context(learner=net, teacher=None, train=TrainConfig(max_bad_steps=5).resolved({}),
                  device=torch.device("cpu"), num_classes=10, input_shape=(1, 32, 32))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    good = net(torch.randn(4, 1, 32, 32)).logsumexp(1).mean()
    assert ctx.optimize(good, opt)
    kept = [b.clone() for b in ctx._bn_live]
    bad = net(torch.full((4, 1, 32, 32), float("nan"))).logsumexp(1).mean()
    assert not all(bool(torch.isfinite(b).all()) for b in ctx._bn_live)       # the forward polluted them ...
    assert not ctx.optimize(bad, opt)
    assert all(torch.equal(a, b) for a, b in zip(ctx._bn_live, kept))          # ... the skipped step restored them


# ----------------------------------------------------------------------------- models
def test_a_fully_frozen_model_is_unfrozen_in_the_copy(source, digits, caplog):
    frozen = build_model("shot-lenet", seed=0)
    frozen.load_state_dict(source.state_dict())
    for p in frozen.parameters():
        p.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="dfkt"):
        res = dfkt.adapt(frozen, digits, method="shot-im", epochs=1, **CPU)
    assert "every parameter of the model is frozen" in caplog.text
    assert not torch.equal(res.model.bottleneck.bn.weight, frozen.bottleneck.bn.weight)    # it trained
    assert not any(p.requires_grad for p in frozen.parameters())                            # caller's untouched


def test_half_model_on_cpu_is_converted(source, digits, caplog):
    half = build_model("shot-lenet", seed=0)
    half.load_state_dict(source.state_dict())
    with caplog.at_level(logging.WARNING, logger="dfkt"):
        res = dfkt.adapt(half.half(), digits, method="source-only", **CPU)
    assert "float16" in caplog.text and res.acc > 50
    assert next(half.parameters()).dtype == torch.float16


def test_wrong_input_size_for_a_fixed_size_model_names_the_fix(digits):
    timm = pytest.importorskip("timm", reason="timm is not installed (optional extra dfkt[timm])")  # noqa: F841
    vit = build_model("timm:vit_tiny_patch16_224", num_classes=10, seed=0, in_chans=1)
    with pytest.raises(ModelError, match=r"cannot take input_shape \(1, 28, 28\).*\(1, 224, 224\).*resize.*crop"):
        dfkt.adapt(vit, digits, method="shot", **CPU)


def test_default_resize_into_a_small_model_says_which_resize_to_set(tmp_path):
    for c in ("a", "b"):
        for i in range(2):
            (tmp_path / "imgs" / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (40, 40), 60 * i).save(tmp_path / "imgs" / c / f"{i}.png")
    target = DataRef(image_folder=str(tmp_path / "imgs"), channels=1).build()
    with pytest.raises(ModelError, match=r"\(1, 224, 224\).*\(1, 32, 32\).*`resize: 32, crop: 32`"):
        dfkt.adapt(build_model("lenet5-bn", num_classes=2), target, method="shot", **CPU)
    small = DataRef(image_folder=str(tmp_path / "imgs"), channels=1, resize=32, crop=32).build()
    assert small[0][0].shape == (1, 32, 32)
    dfkt.adapt(build_model("lenet5-bn", num_classes=2, seed=0), small, method="tent", **CPU)


def test_num_classes_one_is_refused():
    with pytest.raises(ModelError, match="num_classes=1.*num_classes=2"):
        build_model("lenet5", num_classes=1)
    one = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1))
    with pytest.raises(ModelError, match="1 output.*at least 2 classes"):
        dfkt.adapt(one, get_domain("digits", split="test"), method="shot", **CPU)


def test_method_in_capitals_suggests_the_name(source, digits):
    with pytest.raises(ConfigError, match="Did you mean 'shot'"):
        dfkt.adapt(source, digits, method="SHOT", **CPU)


# ----------------------------------------------------------------------------- runs
def test_out_naming_an_existing_file_is_refused_before_training(source, digits, tmp_path):
    f = tmp_path / "result.pt"
    f.write_text("keep me")
    with pytest.raises(ConfigError, match="existing file.*names a folder"):
        dfkt.adapt(source, digits, method="shot", out=f, **CPU)
    assert f.read_text() == "keep me"


def test_a_batch_size_giving_no_training_step_is_refused(source, digits):
    with pytest.raises(DataError, match="no training step.*1 sample.*lower batch_size"):
        dfkt.adapt(source, digits.subset([0]), method="shot", **CPU)


# ----------------------------------------------------------------------------- arrays
def test_array_mistakes():
    x = torch.rand(6, 8, 8, 3)
    with pytest.raises(DataError, match="look channels-last.*layout='NHWC'.*permute"):
        ArrayDataset(x, torch.arange(6) % 2)
    assert ArrayDataset(x, torch.arange(6) % 2, layout="NHWC").shape == (3, 8, 8)
    with pytest.raises(DataError, match="labels are float32.*integers"):
        ArrayDataset(torch.rand(4, 1, 8, 8), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(DataError, match="labels start at 1.*subtract 1"):
        ArrayDataset(torch.rand(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), num_classes=4)
    assert float(ArrayDataset(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)).images.max()) == 1.0


def test_floats_in_0_255_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="dfkt"):
        ArrayDataset(torch.rand(4, 1, 8, 8) * 255)
    assert "0-255" in caplog.text


def test_train_supervised_refuses_float_labels():
    class FloatLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.zeros(1, 28, 28), float(i % 2), i

    with pytest.raises(DataError, match="labels are floats.*integers"):
        dfkt.train_supervised(build_model("shot-lenet"), FloatLabels(), **CPU)


# ----------------------------------------------------------------------------- files
def _img(path: Path, v: int = 128, size=(12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (v, 255 - v, v // 2)).save(path)


def test_empty_class_folder_and_one_based_labels_name_the_cause(tmp_path, source):
    _img(tmp_path / "f/cat/1.png")
    (tmp_path / "f/dog").mkdir()
    _img(tmp_path / "f/zebra/1.png")
    with pytest.raises(DataError, match=r"class folder .*dog' holds no images.*remove it"):
        ImageFolder(tmp_path / "f")
    _img(tmp_path / "l/a.png")
    _img(tmp_path / "l/b.png")
    (tmp_path / "l/list.txt").write_text("a.png 1\nb.png 10\n")
    data = ImageList(tmp_path / "l/list.txt")
    ds = DataRef(image_list=str(tmp_path / "l/list.txt"), channels=1, resize=28, crop=28).build()
    assert ds.num_classes == 11 and len(data) == 2
    with pytest.raises(ModelError, match="11 classes.*labels run from 1 to 10.*subtract 1"):
        dfkt.adapt(source, ds, method="shot", **CPU)


def test_unlabeled_targets_flat_folder_path_list_and_npz(tmp_path, source):
    for i in range(6):
        _img(tmp_path / "flat" / f"{i}.png", 40 * i, (30, 30))
    flat = DataRef(image_folder=str(tmp_path / "flat"), channels=1, resize=28, crop=28).build()
    assert len(flat) == 6 and flat[2][1] == -1 and flat[2][0].shape == (1, 28, 28) and flat.num_classes == 0
    (tmp_path / "paths.txt").write_text("\n".join(f"flat/{i}.png" for i in range(6)) + "\n")
    lst = DataRef(image_list=str(tmp_path / "paths.txt"), channels=1, resize=28, crop=28).build()
    assert len(lst) == 6 and all(y == -1 for _, y in lst.samples)
    (tmp_path / "mixed.txt").write_text("flat/0.png 0\nflat/1.png\n")
    with pytest.raises(DataError, match=r"mixed.txt:2.*no integer label but other lines do"):
        ImageList(tmp_path / "mixed.txt")
    np.savez(tmp_path / "t.npz", x=(np.random.RandomState(0).rand(6, 28, 28, 1) * 255).astype(np.uint8))
    npz = DataRef(npz=str(tmp_path / "t.npz"), images="x", layout="NHWC").build()
    assert len(npz) == 6 and not npz.has_labels
    for target in (flat, lst, npz):
        res = dfkt.adapt(source, target, method="shot", epochs=1, batch_size=4, **CPU)
        assert "acc" not in res.metrics and {"entropy", "im", "snd"} <= set(res.metrics)   # label-free only


def test_npz_layouts_dtypes_and_errors(tmp_path):
    rs = np.random.RandomState(0)
    np.savez(tmp_path / "nchw.npz", images=rs.rand(5, 3, 8, 8).astype(np.float32), labels=np.arange(5) % 2)
    ds = load_npz(tmp_path / "nchw.npz", channels=1, size=16)
    assert ds.shape == (1, 16, 16) and ds.labels.tolist() == [0, 1, 0, 1, 0]
    assert float(ds.images.min()) >= -1 and float(ds.images.max()) <= 1            # normalised (x - .5) / .5
    np.savez(tmp_path / "nhw.npz", images=(rs.rand(4, 8, 8) * 255).astype(np.uint8), y=np.array([0, 1, 2, 3]))
    ds = load_npz(tmp_path / "nhw.npz", labels="y", channels=3)
    assert ds.shape == (3, 8, 8) and ds.num_classes == 4
    with pytest.raises(DataError, match=r"no array 'label'.*\['images', 'y'\]"):
        load_npz(tmp_path / "nhw.npz", labels="label")
    np.savez(tmp_path / "amb.npz", images=rs.rand(4, 5, 8, 3))
    with pytest.raises(DataError, match="look channels-last.*NHWC"):
        load_npz(tmp_path / "amb.npz")
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "fl.npz", images=rs.rand(4, 1, 8, 8), labels=np.array([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(DataError, match="labels are float"):
        load_npz(tmp_path / "fl.npz")


def test_class_names_are_saved_and_checked(tmp_path):
    for c in ("cat", "dog"):
        for i in range(4):
            _img(tmp_path / "src" / c / f"{i}.png", 200 if c == "cat" else 20 + i)
    data = DataRef(image_folder=str(tmp_path / "src"), channels=1, resize=28, crop=28).build()
    res = dfkt.train_supervised(build_model("shot-lenet", num_classes=2, seed=0), data, epochs=1, batch_size=4,
                                out=tmp_path / "run", **CPU)
    model = dfkt.load(tmp_path / "run" / "model.pt")
    assert model.dfkt_classes == ["cat", "dog"] and res.model.dfkt_classes == ["cat", "dog"]
    for c in ("cat", "emu"):
        for i in range(2):
            _img(tmp_path / "tgt" / c / f"{i}.png", 100)
    other = DataRef(image_folder=str(tmp_path / "tgt"), channels=1, resize=28, crop=28).build()
    with pytest.raises(DataError, match="index 1 is 'dog' for the model but 'emu' for the data"):
        dfkt.adapt(model, other, method="shot", **CPU)


# ----------------------------------------------------------------------------- CLI / logging
def test_version_and_list_into_a_closed_pipe():
    r = _run([sys.executable, "-m", "dfkt", "--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"dfkt {dfkt.__version__}"
    r = _run(f"{sys.executable} -m dfkt list | head -1", shell=True)
    assert r.stdout.startswith("methods:") and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


def test_api_warnings_are_visible_without_logging_setup():
    code = ("import dfkt; from dfkt.models import build_model; from dfkt.data import get_domain; "
            "dfkt.adapt(build_model('shot-lenet').half(), get_domain('digits', split='test'), method='source-only', "
            "device='cpu')")
    r = _run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("float16") == 1 and "WARNING" in r.stderr
    r = _run([sys.executable, "-c", "import logging; logging.basicConfig(format='APP %(message)s'); " + code])
    assert r.stderr.count("float16") == 1 and "APP the model holds float16" in r.stderr   # the app's format, once


def test_progress_bars_only_on_a_terminal(source, digits, capsys):
    dfkt.adapt(source, digits.subset(list(range(64))), method="shot-im", epochs=1, device="cpu")   # progress=None
    assert "shot-im 1/1" not in capsys.readouterr().err        # pytest's stderr is no terminal
    dfkt.adapt(source, digits.subset(list(range(64))), method="shot-im", epochs=1, device="cpu", progress=True)
    assert "shot-im 1/1" in capsys.readouterr().err
