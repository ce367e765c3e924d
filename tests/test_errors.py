"""Bad input gives a specific dfkt error whose message says what is wrong and how to fix it.

One test per kind of mistake; each checks the error TYPE (dfkt.errors) and key words of the message.
Everything here fails before any training step, so the tests are fast.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dfkt
from dfkt import api
from dfkt.config import from_dict
from dfkt.core.checkpoint import save_model
from dfkt.core.context import Context, TrainConfig
from dfkt.core.device import resolve_device
from dfkt.core.loader import make_loader
from dfkt.data import ArrayDataset, ImageFolder, ImageList, IndexedDataset, get_domain
from dfkt.errors import CheckpointError, ConfigError, DataError, DfktError, ModelError
from dfkt.models import build_model
from dfkt.runconfig import AdaptConfig, DataRef, parse

CPU = {"device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def target28() -> ArrayDataset:
    return get_domain("digits", split="test", size=28)


@pytest.fixture(scope="module")
def shot_net() -> nn.Module:
    torch.manual_seed(0)
    return build_model("shot-lenet", num_classes=10)


class PairDataset(Dataset):
    """Yields (x, y) without the sample index."""

    def __init__(self, n: int = 8, shape=(1, 28, 28)):
        self.x, self.y = torch.randn(n, *shape), torch.arange(n) % 10

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class EmptyDataset(Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise KeyError(i)          # not even IndexError: dfkt must not index an empty set at all


def test_errors_share_a_base_class() -> None:
    for e in (ConfigError, DataError, ModelError, CheckpointError, dfkt.NonFiniteError):
        assert issubclass(e, DfktError)


# ----------------------------------------------------------------------------- names and configs
def test_unknown_method_suggests_close_matches(shot_net, target28) -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'shoot'.*Did you mean 'shot'") as ei:
        dfkt.adapt(shot_net, target28, method="shoot", **CPU)
    assert "Available:" in str(ei.value) and "tent" in str(ei.value)
    with pytest.raises(ConfigError, match=r"'dafl' is a dfkd method: use dfkt.distill\(\)"):
        dfkt.adapt(shot_net, target28, method="dafl", **CPU)
    with pytest.raises(ConfigError, match=r"unknown method 'dfda'.*Did you mean.*'dfad'"):
        api.distill(build_model("lenet5"), build_model("lenet5-half"), method="dfda", input_shape=(1, 32, 32))


def test_misspelled_config_key_suggests_close_match(shot_net, target28) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'epoch'.*Did you mean 'epochs'"):
        from_dict(TrainConfig, {"epoch": 3}, "train")
    with pytest.raises(ConfigError, match=r"adapt config.train: unknown key 'batchsize'.*'batch_size'"):
        parse("adapt", {"method": "shot", "target": {"domain": "digits"}, "train": {"batchsize": 8}})
    with pytest.raises(ConfigError, match=r"adapt config: unknown key 'targte'.*Did you mean 'target'"):
        parse("adapt", {"method": "shot", "targte": {"domain": "digits"}})
    with pytest.raises(ConfigError, match=r"unknown option 'bta' for method 'shot'.*Did you mean 'beta'"):
        dfkt.adapt(shot_net, target28, method="shot", bta=0.3, **CPU)


def test_wrong_value_type_in_config() -> None:
    with pytest.raises(ConfigError, match=r"train.lr: expected a number, got 'fast' \(str\)"):
        parse("adapt", {"method": "shot", "target": {"domain": "digits"}, "train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 2.5"):
        from_dict(AdaptConfig, {"method": "shot", "target": {"domain": "digits"}, "train": {"epochs": 2.5}})
    with pytest.raises(ConfigError, match=r"train.amp: expected true/false, got 'yes please'"):
        from_dict(TrainConfig, {"amp": "yes please"}, "train")
    with pytest.raises(ConfigError, match=r"input_shape: expected a list, got 32"):
        parse("distill", {"method": "dafl", "teacher": {"name": "lenet5"}, "student": {"name": "lenet5-half"},
                          "input_shape": 32})
    with pytest.raises(ConfigError, match=r"train.epochs must be >= 1, got 0"):
        from_dict(TrainConfig, {"epochs": 0}, "train")
    with pytest.raises(ConfigError, match=r"adapt config.target: give exactly one of domain, image_list"):
        parse("adapt", {"method": "shot", "target": {"domain": "digits", "image_folder": "x"}})


# ----------------------------------------------------------------------------- data
def test_missing_data_file_or_directory(tmp_path, monkeypatch) -> None:
    with pytest.raises(DataError, match=r"image list .*nope.txt' not found"):
        ImageList(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"image folder .*no_dir' does not exist"):
        ImageFolder(tmp_path / "no_dir")
    with pytest.raises(DataError, match=r"data folder .*missing' .*does not exist"):
        get_domain("mnist10k", root=tmp_path / "missing")
    with pytest.raises(DataError, match=r"required data file not found: .*mnist10k.npz"):
        get_domain("mnist10k", root=tmp_path)
    monkeypatch.delenv("DFKT_DATA", raising=False)
    with pytest.raises(DataError, match=r"DFKT_DATA"):
        DataRef(domain="mnist10k").build()
    with pytest.raises(DataError, match=r"unknown domain 'mnsit'.*Did you mean.*'mnist'"):
        get_domain("mnsit")


def test_empty_target_set(shot_net, tmp_path) -> None:
    for empty in (EmptyDataset(), IndexedDataset(TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0).long()))):
        with pytest.raises(DataError, match=r"is empty \(0 samples\)"):
            dfkt.adapt(shot_net, empty, method="shot", **CPU)
    with pytest.raises(DataError, match=r"is empty \(0 images\)"):
        ArrayDataset(torch.zeros(0, 1, 28, 28))
    (tmp_path / "list.txt").write_text("# only a comment\n\n")
    with pytest.raises(DataError, match=r"image list .* is empty"):
        ImageList(tmp_path / "list.txt")
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"holds no images"):
        ImageFolder(tmp_path / "imgs")


def test_image_list_with_a_missing_image(tmp_path) -> None:
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "list.txt").write_text("a/ok.png 0\na/gone.png 1\n")
    with pytest.raises(DataError, match=r"1 of 2 images listed .* are missing .*line 2: .*gone.png.*root="):
        ImageList(tmp_path / "list.txt")
    (tmp_path / "bad.txt").write_text("a/ok.png zero\n")
    with pytest.raises(DataError, match=r"bad.txt:1: cannot parse"):
        ImageList(tmp_path / "bad.txt")


def test_label_out_of_range_in_labelled_set(tmp_path) -> None:
    with pytest.raises(DataError, match=r"label 12 is outside \[0, 10\)"):
        ArrayDataset(torch.zeros(3, 1, 8, 8), torch.tensor([0, 12, 3]), num_classes=10)
    with pytest.raises(DataError, match=r"label -1 is outside"):
        ArrayDataset(torch.zeros(2, 1, 8, 8), torch.tensor([0, -1]))
    (tmp_path / "x.png").touch()
    (tmp_path / "list.txt").write_text("x.png 31\n")
    with pytest.raises(DataError, match=r"list.txt:1: label 31 is outside \[0, 31\)"):
        ImageList(tmp_path / "list.txt", num_classes=31)
    # labels beyond the model's head in supervised training
    data = ArrayDataset(torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5]), num_classes=6)
    with pytest.raises(ModelError, match=r"labels go up to 5 but the model has 3 outputs.*num_classes=6"):
        dfkt.train_supervised(build_model("shot-lenet", num_classes=3), data, **CPU)


# ----------------------------------------------------------------------------- models
def test_head_class_count_differs_from_num_classes(shot_net, target28) -> None:
    with pytest.raises(ModelError, match=r"head has 10 outputs but num_classes=12"):
        dfkt.adapt(shot_net, target28, method="shot", num_classes=12, **CPU)
    small = build_model("shot-lenet", num_classes=5)
    with pytest.raises(ModelError, match=r"target data set has 10 classes but the model's head has 5"):
        dfkt.adapt(small, target28, method="shot", **CPU)


def test_teacher_and_student_class_counts_differ() -> None:
    with pytest.raises(ModelError, match=r"teacher has 10 classes but the student has 7.*num_classes=10"):
        api.distill(build_model("lenet5", num_classes=10), build_model("lenet5-half", num_classes=7),
                    method="dafl", input_shape=(1, 32, 32), **CPU)


def test_input_shape_the_model_cannot_take(shot_net) -> None:
    with pytest.raises(ModelError, match=r"cannot take input_shape \(3, 32, 32\).*expects input of shape "
                                         r"\(1, 32, 32\)"):
        api.distill(build_model("lenet5"), build_model("lenet5-half"), method="dafl", input_shape=(3, 32, 32),
                    **CPU)
    wrong_size = ArrayDataset(torch.randn(4, 1, 20, 20), torch.arange(4))
    with pytest.raises(ModelError, match=r"cannot take input_shape \(1, 20, 20\).*\(1, 28, 28\)"):
        dfkt.adapt(shot_net, wrong_size, method="shot", **CPU)


def test_bn_method_on_a_model_without_batchnorm() -> None:
    no_bn = build_model("lenet5", num_classes=10)
    target = get_domain("digits", split="test", size=32)
    with pytest.raises(ModelError, match=r"method 'adabn' works on BatchNorm layers.*but the model "
                                         r"\(LeNet5\) has no BatchNorm layers.*SFDA: shot"):
        dfkt.adapt(no_bn, target, method="adabn", **CPU)
    # tent falls back to LayerNorm/GroupNorm; a model with no normalisation layer at all is refused
    with pytest.raises(ModelError, match=r"tent updates the scale/shift of normalisation layers.*'shot'"):
        dfkt.adapt(no_bn, target, method="tent", **CPU)


def test_deepinversion_on_a_teacher_without_batchnorm() -> None:
    with pytest.raises(ModelError, match=r"'deepinversion' works on BatchNorm layers.*no BatchNorm.*lenet5-bn"):
        api.distill(build_model("lenet5"), build_model("lenet5-half"), method="deepinversion",
                    input_shape=(1, 32, 32), **CPU)


def test_method_needing_indices_on_data_without_them(shot_net) -> None:
    with pytest.raises(DataError, match=r"method 'shot' keeps per-sample memory banks and needs sample indices.*"
                                        r"yields tuple of length 2.*IndexedDataset"):
        dfkt.adapt(shot_net, PairDataset(), method="shot", **CPU)
    # wrapped, it is accepted up to the first step (1 epoch of 8 samples)
    res = dfkt.adapt(shot_net, IndexedDataset(PairDataset()), method="shot", epochs=1, batch_size=4, **CPU)
    assert len(res.history.records) == 1


def test_batch_larger_than_data_set_with_drop_last(target28) -> None:
    small = target28.subset(range(20))
    with pytest.raises(DataError, match=r"batch_size 32 is larger than the data set \(20 samples per process\) "
                                        r"with drop_last=True.*batch_size <= 20"):
        make_loader(small, 32, torch.device("cpu"), drop_last=True)
    ctx = Context(learner=build_model("shot-lenet"), teacher=None, train=TrainConfig(batch_size=64).resolved({}),
                  device=torch.device("cpu"), num_classes=10, input_shape=(1, 28, 28))
    with pytest.raises(DataError, match=r"batch_size 64 is larger"):
        ctx.loader(small, drop_last=True)
    assert len(ctx.loader(small, drop_last=False)) == 1


# ----------------------------------------------------------------------------- checkpoints and devices
def test_checkpoint_from_another_architecture(tmp_path) -> None:
    path = save_model(tmp_path / "model.pt", build_model("lenet5"), method="supervised")
    with pytest.raises(CheckpointError, match=r"saved from another architecture than LeNet5Half.*Build the same "
                                              r"model"):
        dfkt.load(path, model=build_model("lenet5-half"))
    with pytest.raises(CheckpointError, match=r"another architecture"):
        dfkt.load(path, model=build_model("lenet5", num_classes=7))
    assert dfkt.load(path).dfkt_spec["name"] == "lenet5"         # rebuilt from its spec
    with pytest.raises(CheckpointError, match=r"not found"):
        dfkt.load(tmp_path / "missing.pt")


def test_cuda_requested_without_cuda_falls_back_to_cpu(caplog, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(logging.getLogger("dfkt"), "propagate", True)   # the CLI may have turned it off
    with caplog.at_level(logging.WARNING, logger="dfkt"):
        assert resolve_device("cuda") == torch.device("cpu")
        assert resolve_device("cuda:1") == torch.device("cpu")
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 2
    assert "'cuda' requested but CUDA is not available" in msgs[0] and "falling back to 'cpu'" in msgs[0]
    with pytest.raises(ConfigError, match=r"unknown device 'gpu0'"):
        resolve_device("gpu0")
