"""The coloured-digit domain (dfkt/data/colordigits.py, `colormnist`) of the dfkd-color suite."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dfkt.data import get_domain, list_domains
from dfkt.data.colordigits import color_digits
from dfkt.errors import DataError


@pytest.fixture()
def fake_mnist(tmp_path: Path) -> Path:
    """A small mnist10k.npz: a bright square (the 'ink') per image, class = its position."""
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 10, 200).astype(np.int64)
    images = np.zeros((200, 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 4 + 2 * y:10 + 2 * y, 8:20] = 255
    np.savez(tmp_path / "mnist10k.npz", images=images, labels=labels)
    return tmp_path


def test_colormnist_is_3x32x32_labelled_and_the_same_in_every_split(fake_mnist):
    assert "colormnist" in list_domains()
    train = get_domain("colormnist", root=fake_mnist, split="train", size=32)
    test = get_domain("colormnist", root=fake_mnist, split="test", size=32)
    every = get_domain("colormnist", root=fake_mnist, split="all", size=32)
    assert train.images.shape == (160, 3, 32, 32) and test.images.shape == (40, 3, 32, 32)
    assert torch.equal(train.labels, every.labels[:160]) and torch.equal(test.labels, every.labels[160:])
    assert torch.equal(train.images, every.images[:160])          # coloured once, before the split
    grey = get_domain("colormnist", root=fake_mnist, split="test", size=32, channels=1)
    assert grey.images.shape == (40, 1, 32, 32)


def test_color_digits_colours_deterministically_and_keeps_the_digit():
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 8:24, 12:20] = 1.0                                     # the ink
    a, b, c = color_digits(x, seed=0), color_digits(x, seed=0), color_digits(x, seed=1)
    assert a.shape == (64, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    ink = a[:, :, 16, 16]                                          # one colour per image over the ink
    assert torch.allclose(a[:, :, 10, 14], ink)
    assert ink.std(0).min() > 0.1                                  # the ink colour varies between images
    bg = a[:, :, 2:6, 2:6]
    assert (bg.flatten(2).std(2) > 0.01).float().mean() > 0.5      # the background is textured, not flat
    # the ink differs from the background in every channel (colorize's gap, before shading)
    assert ((ink - a[:, :, 2, 2]).abs() > 0.05).float().mean() > 0.9
    with pytest.raises(DataError, match=r"\[N,1,H,W\]"):
        color_digits(torch.zeros(2, 3, 32, 32))
