"""Tests of dfkt.data: embedded/array loaders, domains, image files, torchvision sets, corruptions."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from dfkt.data import (CORRUPTIONS, ArrayDataset, Corrupt, ImageFolder, ImageList, IndexedDataset,
                       corrupt, default_transforms, get_domain, list_domains, load_digits_images,
                       load_mnist10k, require_file, resolve_data_root, split_indices, to_float,
                       torchvision_dataset)
from dfkt.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ----------------------------------------------------------------------------- embedded digits
def test_digits_native_8x8():
    from sklearn.datasets import load_digits

    u8, y = load_digits_images(8)
    assert u8.shape == (1797, 8, 8) and u8.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(u8.min()) == 0 and int(u8.max()) == 255
    assert torch.bincount(y).tolist() == np.bincount(load_digits().target).tolist() and len(torch.unique(y)) == 10
    ref = torch.round(torch.from_numpy(load_digits().images).float() / 16 * 255).to(torch.uint8)
    assert torch.equal(u8, ref)


def test_uci_28_recipe():
    from sklearn.datasets import load_digits

    u8, y = load_digits_images(28)
    assert u8.shape == (1797, 28, 28) and len(y) == 1797
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert int(u8[:, border].max()) == 0
    x = torch.from_numpy(load_digits().images.astype(np.float32) / 16).unsqueeze(1)
    centre = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False, antialias=False)
    assert torch.equal(u8[:, 4:24, 4:24], torch.round(centre[:, 0] * 255).to(torch.uint8))
    u32, _ = load_digits_images(32)
    assert u32.shape == (1797, 32, 32) and u32.dtype == torch.uint8


def test_digits_domain_splits_and_sizes():
    assert "digits" in list_domains() and "mnist10k" in list_domains()
    full = get_domain("uci")
    assert full.images.shape == (1797, 1, 28, 28) and full.num_classes == 10 and full.name == "digits"
    assert float(full.images.min()) == -1.0 and float(full.images.max()) == 1.0
    assert get_domain("digits", size=8).images.shape == (1797, 1, 8, 8)
    assert get_domain("digits", size=32, channels=3, split="test").images.shape == (359, 3, 32, 32)
    tr, te = get_domain("digits", split="train"), get_domain("digits", split="test")
    st, sv = get_domain("digits", split="source_train"), get_domain("digits", split="source_val")
    assert (len(tr), len(te), len(st), len(sv)) == (1438, 359, 1617, 180)
    assert len(torch.unique(sv.labels)) == 10  # the fixed permutation mixes the classes
    # same rows as the full set, reordered: the multiset of images is preserved
    both = torch.cat([st.images, sv.images]).flatten(1).sum(1).sort().values
    assert torch.allclose(both, full.images.flatten(1).sum(1).sort().values)
    with pytest.raises(DataError, match="mnist10k"):
        get_domain("mnist_10k")
    with pytest.raises(DataError, match="split"):
        get_domain("digits", split="val")


# ----------------------------------------------------------------------------- mnist10k npz
@pytest.fixture()
def mnist_root(tmp_path: Path) -> Path:
    rng = np.random.RandomState(0)
    images = np.zeros((10000, 28, 28), dtype=np.uint8)
    images[:, 10:18, 10:18] = rng.randint(0, 256, (10000, 1, 1), dtype=np.uint8)
    np.savez(tmp_path / "mnist10k.npz", images=images, labels=rng.randint(0, 10, 10000).astype(np.int64))
    return tmp_path


def test_mnist10k_loader_and_splits(mnist_root: Path, monkeypatch: pytest.MonkeyPatch):
    u8, y = load_mnist10k(mnist_root)
    assert u8.shape == (10000, 28, 28) and u8.dtype == torch.uint8 and y.dtype == torch.int64
    sizes = {s: len(get_domain("mnist", root=mnist_root, split=s))
             for s in ("all", "train", "test", "source_train", "source_val")}
    assert sizes == {"all": 10000, "train": 8000, "test": 2000, "source_train": 9000, "source_val": 1000}
    test = get_domain("mnist10k", root=mnist_root, split="test", size=32)
    assert test.images.shape == (2000, 1, 32, 32) and torch.equal(test.labels, y[8000:])
    monkeypatch.setenv("DFKT_DATA", str(mnist_root))
    assert resolve_data_root() == mnist_root and len(load_mnist10k()[0]) == 10000
    assert resolve_data_root(mnist_root / "..") == mnist_root / ".."  # explicit beats the env


def test_mnist10k_corrupted_domain(mnist_root: Path):
    a = get_domain("mnist10k", root=mnist_root, split="test", corruption="gaussian_noise", severity=3, seed=1)
    b = get_domain("mnist10k", root=mnist_root, split="test", corruption="gaussian_noise", severity=3, seed=1)
    clean = get_domain("mnist10k", root=mnist_root, split="test")
    assert a.name == "mnist10k-c:gaussian_noise@3" and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, clean.images)
    assert float(a.images.min()) >= -1.0 and float(a.images.max()) <= 1.0
    with pytest.raises(DataError, match="gaussian_noise"):
        get_domain("mnist10k", root=mnist_root, corruption="gauss_noise")


def test_mnist10k_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(DataError) as e:
        load_mnist10k(tmp_path)
    assert str(tmp_path / "mnist10k.npz") in str(e.value) and "DFKT_DATA" in str(e.value)
    monkeypatch.delenv("DFKT_DATA", raising=False)
    with pytest.raises(DataError, match="DFKT_DATA"):
        load_mnist10k()
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_root(tmp_path / "nope")
    np.savez(tmp_path / "mnist10k.npz", images=np.zeros((5, 32, 32), np.uint8), labels=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"\[N,28,28\]"):
        load_mnist10k(tmp_path)
    np.savez(tmp_path / "mnist10k.npz", pixels=np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(DataError, match="images"):
        load_mnist10k(tmp_path)
    with pytest.raises(DataError, match="download it from"):
        require_file(tmp_path / "x.bin", "download it from somewhere")


@pytest.mark.skipif(not (SHARED / "mnist10k.npz").is_file(), reason="needs ../shared/data/mnist10k.npz, which is not shipped with dfkt (the loader itself is tested on an npz the tests write)")
def test_real_mnist10k():
    ds = get_domain("mnist", root=SHARED, split="test")
    assert len(ds) == 2000 and len(torch.unique(ds.labels)) == 10


# ----------------------------------------------------------------------------- arrays
def test_array_dataset():
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    ds = ArrayDataset(x, y, "toy", num_classes=3)
    xi, yi, i = ds[4]
    assert torch.equal(xi, x[4]) and int(yi) == 1 and i == 4
    xb, yb, ib = next(iter(DataLoader(ds, batch_size=6, shuffle=False)))
    assert ib.tolist() == list(range(6)) and torch.equal(yb, y)
    sub = ds.subset([5, 1])
    assert len(sub) == 2 and sub.labels.tolist() == [2, 1] and sub.num_classes == 3
    unl = ArrayDataset(x, None, "unl", num_classes=3)
    assert unl[2][1] == -1 and unl.tensors[1].tolist() == [-1] * 6 and ds.to("cpu") is ds
    with pytest.raises(DataError, match="empty"):
        ArrayDataset(torch.zeros(0, 1, 4, 4), None)
    with pytest.raises(DataError, match=r"label 7 .*num_classes=3"):
        ArrayDataset(x, torch.tensor([0, 1, 2, 7, 0, 0]), num_classes=3)
    f = to_float(torch.full((2, 8, 8), 255, dtype=torch.uint8), size=16)
    assert f.shape == (2, 1, 16, 16) and torch.allclose(f, torch.ones_like(f))


# ----------------------------------------------------------------------------- image files
def _png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def test_image_list(tmp_path: Path):
    _png(tmp_path / "imgs/a.png", (255, 0, 0))
    _png(tmp_path / "imgs/b.png", (0, 255, 0))
    lst = tmp_path / "list.txt"
    lst.write_text(f"imgs/a.png 0\n\n{tmp_path / 'imgs/b.png'} 2\n")
    ds = ImageList(lst)
    assert len(ds) == 2 and ds.num_classes == 3 and ds.targets == [0, 2]
    x, y, i = ds[1]
    assert x.shape == (3, 8, 8) and y == 2 and i == 1 and float(x[1].mean()) == 1.0
    x, _, _ = ImageList(lst, transform=default_transforms(False, size=10, crop=6))[0]
    assert x.shape == (3, 6, 6)
    lst.write_text("imgs/a.png 0\nimgs/missing.png 1\nimgs/gone.png 1\n")
    with pytest.raises(DataError, match=r"2 of 3 .*line 2: .*missing\.png"):
        ImageList(lst)
    lst.write_text("imgs/a.png 0\nimgs/b.png\n")
    with pytest.raises(DataError, match=":2"):
        ImageList(lst)
    lst.write_text("imgs/a.png 0\nimgs/b.png 5\n")
    with pytest.raises(DataError, match="label 5"):
        ImageList(lst, num_classes=3)
    lst.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        ImageList(lst)
    with pytest.raises(DataError, match="not found"):
        ImageList(tmp_path / "nolist.txt")


def test_image_folder(tmp_path: Path):
    for cls, n in (("bike", 2), ("apple", 1)):
        for k in range(n):
            _png(tmp_path / "dom" / cls / f"{k}.png", (10 * k, 0, 0))
    ds = ImageFolder(tmp_path / "dom")
    assert ds.classes == ["apple", "bike"] and ds.num_classes == 2 and ds.targets == [0, 1, 1]
    x, y, i = ds[2]
    assert x.shape == (3, 8, 8) and y == 1 and i == 2
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty")


# ----------------------------------------------------------------------------- torchvision
def _idx(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
                     + arr.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_idx(tmp_path: Path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.zeros((3, 28, 28), np.uint8)
    imgs[1, 5, 5] = 255
    for prefix in ("train", "t10k"):
        _idx(raw / f"{prefix}-images-idx3-ubyte", imgs)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.array([4, 7, 1]))
    ds = torchvision_dataset("mnist", tmp_path, train=True)
    assert len(ds) == 3 and ds.num_classes == 10
    x, y, i = ds[1]
    assert x.shape == (1, 28, 28) and int(y) == 7 and i == 1
    assert float(x[0, 5, 5]) == 1.0 and float(x[0, 0, 0]) == -1.0
    x3, _, _ = torchvision_dataset("mnist", tmp_path, train=False, size=32, channels=3)[0]
    assert x3.shape == (3, 32, 32)
    with pytest.raises(DataError, match="fashion-mnist"):
        torchvision_dataset("fashion_mnst", tmp_path)


def test_torchvision_missing(tmp_path: Path):
    for name in ("mnist", "cifar10", "svhn"):
        with pytest.raises(DataError, match="download=True") as e:
            torchvision_dataset(name, tmp_path, download=False)
        assert str(tmp_path) in str(e.value)


def test_indexed_wrapper():
    ds = IndexedDataset([(torch.zeros(2), 3), torch.ones(2)])
    assert ds[0][1:] == (3, 0) and ds[1][1:] == (-1, 1)


# ----------------------------------------------------------------------------- corruptions
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur", "rotate", "shear",
          "translate", "elastic", "stripe", "dotted_line", "zigzag", "colorize", "texture"}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g) * 0.8 + 0.1
    x[:, :, :4] = 0.0  # some flat background, as digits have
    return x


def test_shapes_domain_and_train_fit_splits():
    from dfkt.data.shapes import make_shapes

    u8, labels = make_shapes(200, seed=1)
    assert u8.shape == (200, 28, 28) and u8.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10
    again, _ = make_shapes(200, seed=1)
    other, _ = make_shapes(200, seed=2)
    assert torch.equal(u8, again) and not torch.equal(u8, other)
    # every class draws ink, and classes differ on average
    means = torch.stack([u8[labels == c].float().mean(0) for c in range(10)])
    assert bool((means.flatten(1).sum(1) > 0).all()) and torch.cdist(means.flatten(1), means.flatten(1)).topk(
        2, largest=False).values[:, 1].min() > 50
    tr, te = get_domain("shapes", split="train_fit"), get_domain("shapes", split="test")
    va = get_domain("shapes", split="train_val")
    assert len(tr) == 7200 and len(va) == 800 and len(te) == 2000 and te.num_classes == 10
    assert not set(split_indices(10000, "train_fit", False)) & set(split_indices(10000, "test", False))
    assert set(split_indices(10000, "train_val", False)) <= set(split_indices(10000, "train", False))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_contract(name: str, images: torch.Tensor):
    assert len(CORRUPTIONS) >= 16
    for sev in (1, 5):
        out = corrupt(images, name, sev, seed=3)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.equal(out, corrupt(images, name, sev, seed=3))
        assert float((out - images).abs().mean()) > 0
    if name in RANDOM:
        assert not torch.equal(corrupt(images, name, 3, seed=1), corrupt(images, name, 3, seed=2))
    single = corrupt(images[0], name, 2, seed=0)
    assert single.shape == images[0].shape
    rgb = corrupt(images.expand(-1, 3, -1, -1), name, 2, seed=0)
    assert rgb.shape == (4, 3, 16, 16)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur",
                                  "motion_blur", "contrast"])
def test_severity_grows(name: str, images: torch.Tensor):
    d1 = (corrupt(images, name, 1, seed=0) - images).abs().mean()
    d5 = (corrupt(images, name, 5, seed=0) - images).abs().mean()
    assert d5 > d1


def test_corruption_errors_and_transform(images: torch.Tensor):
    with pytest.raises(DataError, match="gaussian_noise"):
        corrupt(images, "gausian_noise")
    for bad in (0, 6, 2.5, True):
        with pytest.raises(DataError, match="1..5"):
            corrupt(images, "contrast", bad)
    with pytest.raises(DataError, match=r"\[0,1\]"):
        corrupt(images * 2 - 1, "contrast")
    t1, t2 = Corrupt("rotate", 4, seed=5), Corrupt("rotate", 4, seed=5)
    seq1, seq2 = [t1(images[0]) for _ in range(2)], [t2(images[0]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(seq1, seq2)) and seq1[0].shape == images[0].shape
    with pytest.raises(DataError):
        Corrupt("nope")
