"""Named digit domains (UCI digits, MNIST-10k, their corrupted versions) as in-memory ArrayDatasets."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from dfkt.data.arrays import ArrayDataset, Stat, load_digits_images, load_mnist10k, normalize, to_float
from dfkt.data.colordigits import color_mnist
from dfkt.data.corruptions import check_corruption, corrupt
from dfkt.data.shapes import make_shapes
from dfkt.errors import DataError, suggest

log = logging.getLogger(__name__)

DOMAINS = {"digits": "scikit-learn's embedded UCI digits (1,797; 28x28 'uci' recipe, size=8 native)",
           "mnist10k": "mnist10k.npz from the data folder (10,000 MNIST digits)",
           "shapes": "procedural grayscale silhouettes, 10 non-digit classes (10,000; dfkt.data.shapes)",
           "colormnist": "mnist10k's digits in colour on textured backgrounds, 3 channels (dfkt.data.colordigits)"}
COLOR = {"colormnist"}    # 3-channel domains (channels=1 gives their luminance)
ALIASES = {"uci": "digits", "mnist": "mnist10k"}
SPLITS = ("all", "train", "test", "source_train", "source_val", "train_fit", "train_val")
SPLIT_SEED = 0  # fixed permutation that mixes the classes of the (class-sorted-ish) UCI digits


def list_domains() -> list[str]:
    """Canonical domain names (aliases: uci -> digits, mnist -> mnist10k)."""
    return sorted(DOMAINS)


def split_indices(n: int, split: str, shuffle: bool) -> np.ndarray:
    """Row indices of ``split``: train/test = first 80 % / rest (mnist10k: [:8000]/[8000:]),
    source_train/source_val = first 90 % / last 10 % (SHOT); train_fit/train_val = first 90 % / last
    10 % of ``train`` (a source model that never sees ``test``, the shift suites' target rows);
    ``shuffle`` permutes first (fixed seed)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}.{suggest(str(split), SPLITS)} Use one of: {', '.join(SPLITS)}")
    order = np.random.RandomState(SPLIT_SEED).permutation(n) if shuffle else np.arange(n)
    if split == "all":
        return order
    if split in ("train_fit", "train_val"):
        train = order[:int(round(n * 0.8))]
        cut = int(round(len(train) * 0.9))
        return train[:cut] if split == "train_fit" else train[cut:]
    cut = int(round(n * (0.8 if split in ("train", "test") else 0.9)))
    return order[:cut] if split in ("train", "source_train") else order[cut:]


def get_domain(name: str, root: str | os.PathLike | None = None, split: str = "all", size: int = 28,
               channels: int | None = None, corruption: str | None = None, severity: int = 3, seed: int = 0,
               mean: Stat = 0.5, std: Stat = 0.5) -> ArrayDataset:
    """Domain ``name`` as a normalised float ArrayDataset ``[N,channels,size,size]`` with labels.

    ``corruption`` (see ``CORRUPTIONS``) is applied to the ``[0,1]`` images, deterministically by
    ``seed``, before normalisation; the data set is then named e.g. ``mnist10k-c:gaussian_noise@3``.
    ``channels`` defaults to the domain's own (1; 3 for ``colormnist``).
    """
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DOMAINS:
        raise DataError(f"unknown domain {name!r}.{suggest(str(name), list(DOMAINS) + list(ALIASES))} "
                        f"Use one of: {', '.join(list_domains())} (aliases: {', '.join(sorted(ALIASES))})")
    if channels is None:
        channels = 3 if key in COLOR else 1
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}; use 3 for RGB backbones")
    if int(size) < 1:
        raise DataError(f"size must be a positive integer, got {size!r}; use e.g. 28 or 32 (LeNet-5)")
    if corruption is not None:
        check_corruption(corruption, severity)
    if key == "digits":
        u8, labels = load_digits_images(8 if size == 8 else 28)
    elif key == "shapes":
        u8, labels = make_shapes()
    elif key in COLOR:   # coloured once for the whole set (an image looks the same in every split)
        u8, labels = color_mnist(root, size)
    else:
        u8, labels = load_mnist10k(root)
    idx = torch.from_numpy(split_indices(len(u8), split, shuffle=key == "digits"))
    x = to_float(u8[idx], size=None if key in COLOR else size, mean=0.0, std=1.0)
    ds_name = key
    if corruption is not None:
        x = corrupt(x, corruption, severity, seed)
        ds_name = f"{key}-c:{corruption}@{severity}"
    if channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1).contiguous()
    elif channels == 1 and x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    log.debug("domain %s split=%s: %d images %s", ds_name, split, len(x), tuple(x.shape[1:]))
    return ArrayDataset(normalize(x, mean, std), labels[idx], ds_name, num_classes=10)
