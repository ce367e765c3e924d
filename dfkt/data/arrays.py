"""In-memory array data sets and the loaders of the embedded / shared digit arrays."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dfkt.errors import DataError

log = logging.getLogger(__name__)

Indices = Union[Sequence[int], np.ndarray, torch.Tensor, slice]
Stat = Union[float, Sequence[float]]

MNIST10K_FILE = "mnist10k.npz"
_MNIST10K_HINT = (
    f"set the environment variable DFKT_DATA (or pass --data-root / data_root=) to the folder "
    f"that holds {MNIST10K_FILE} (keys 'images' uint8 [10000,28,28], 'labels' int64 [10000])"
)


LAYOUTS = ("NCHW", "NHWC", "NHW")
_CHANNELS = (1, 3, 4)


def to_nchw(images: torch.Tensor, layout: str | None, name: str) -> torch.Tensor:
    """``images`` in ``layout`` ('NCHW' | 'NHWC' | 'NHW'; ``None``: NHW for 3-D arrays, NCHW for 4-D
    ones, refused when they look NHWC) as ``[N,C,H,W]``."""
    if layout is not None and str(layout).upper() not in LAYOUTS:
        raise DataError(f"data set {name!r}: unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    layout = str(layout).upper() if layout is not None else None
    shape = tuple(images.shape)
    want = {"NHW": 3}.get(layout or "", 4 if layout else None)
    if want is not None and images.dim() != want:
        raise DataError(f"data set {name!r}: layout {layout} needs a {want}-D array, got shape {shape}")
    if images.dim() == 3:
        return images.unsqueeze(1)
    if images.dim() != 4:
        raise DataError(f"data set {name!r}: images must be [N,C,H,W] (or [N,H,W] / [N,H,W,C] with layout=), got "
                        f"shape {shape}; reshape the array before building the data set")
    if layout == "NHWC":
        return images.permute(0, 3, 1, 2).contiguous()
    if layout is None and shape[1] not in _CHANNELS and shape[3] in _CHANNELS:
        raise DataError(f"data set {name!r}: images of shape {shape} look channels-last (NHWC); pass "
                        f"layout='NHWC' (config: `layout: NHWC`) or permute them: images.permute(0, 3, 1, 2)")
    return images


def _check_finite(images: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(images.reshape(images.shape[0], -1)).all(1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise DataError(f"data set {name!r}: {len(idx)} of {images.shape[0]} images hold NaN/inf values (sample "
                        f"indices {idx[:10]}{' ...' if len(idx) > 10 else ''}); remove or repair them (they would "
                        f"turn BatchNorm statistics and the model into NaN)")


class ArrayDataset(Dataset):
    """Images ``[N,C,H,W]`` (float, already normalised) and labels ``[N]`` held in memory.

    ``dataset[i]`` is ``(x, y, i)``; ``y`` is ``-1`` when the set is unlabeled (``labels=None``).
    ``layout``: 'NCHW' (default for 4-D arrays), 'NHWC' or 'NHW'. uint8 images are divided by 255;
    float images are used as given. Images with NaN/inf values and float labels are refused.
    """

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None,
                 name: str = "arrays", num_classes: int | None = None, layout: str | None = None) -> None:
        images = to_nchw(torch.as_tensor(images), layout, name)
        if images.shape[0] == 0:
            raise DataError(f"data set {name!r} is empty (0 images); check the split / file it was built from")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            images = images.float()
        _check_finite(images, name)
        if images.numel() and float(images.max()) > 50:
            log.warning("data set %r: image values reach %.0f: they look like 0-255 pixel values stored as floats; "
                        "divide them by 255 (and normalise, e.g. dfkt.data.to_float) unless that is meant",
                        name, float(images.max()))
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise DataError(f"data set {name!r}: labels are {str(labels.dtype).replace('torch.', '')}; class "
                                f"labels must be integers 0..K-1 (convert whole-number floats with .long(), or "
                                f"argmax one-hot / soft labels first)")
            labels = labels.long().reshape(-1)
            if labels.shape[0] != images.shape[0]:
                raise DataError(f"data set {name!r}: {images.shape[0]} images but {labels.shape[0]} labels; "
                                f"give exactly one label per image")
            lo, hi = int(labels.min()), int(labels.max())
            if num_classes is None:
                num_classes = hi + 1
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                why = (" (the labels start at 1: dfkt counts classes from 0, subtract 1)"
                       if lo == 1 and hi == num_classes else "")
                raise DataError(f"data set {name!r}: label {bad} is outside [0, {num_classes}) "
                                f"(num_classes={num_classes}){why}; fix the labels or pass the right num_classes")
        self.images = images
        self.labels = labels
        self.name = name
        self.num_classes = int(num_classes) if num_classes is not None else 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        y = self.labels[i] if self.labels is not None else -1
        return self.images[i], y, i

    def __repr__(self) -> str:
        return (f"ArrayDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
                f"num_classes={self.num_classes}, labeled={self.has_labels}, device={self.images.device})")

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)``; labels are all ``-1`` for an unlabeled set."""
        if self.labels is None:
            return self.images, torch.full((len(self),), -1, dtype=torch.long, device=self.images.device)
        return self.images, self.labels

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape ``(C, H, W)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Indices, name: str | None = None) -> "ArrayDataset":
        """A new data set holding the selected rows (same name and class count)."""
        if not isinstance(indices, slice):
            idx = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
            indices = (idx if idx.dtype == torch.bool else idx.long()).to(self.images.device)
        labels = self.labels[indices] if self.labels is not None else None
        return ArrayDataset(self.images[indices], labels, name or self.name, self.num_classes or None)

    def to(self, device: torch.device | str) -> "ArrayDataset":
        """A copy with images and labels on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        labels = self.labels.to(device) if self.labels is not None else None
        return ArrayDataset(self.images.to(device), labels, self.name, self.num_classes or None)


def resolve_data_root(root: str | os.PathLike | None = None, needed: str | None = None) -> Path:
    """The data folder: explicit ``root`` > env ``DFKT_DATA`` > :class:`DataError`."""
    what = f" (looking for {needed})" if needed else ""
    if root is None or str(root) == "":
        env = os.environ.get("DFKT_DATA", "")
        if not env:
            raise DataError(f"no data folder given{what}: pass --data-root / data_root=PATH or set the "
                            f"environment variable DFKT_DATA=PATH to the folder holding the data files")
        root, src = env, "DFKT_DATA"
    else:
        src = "data_root"
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} (from {src}){what} does not exist or is not a folder; "
                        f"point {src} at an existing folder holding the data files")
    return path


def require_file(path: str | os.PathLike, how_to_get: str) -> Path:
    """``path`` as a Path, or :class:`DataError` naming it and how to obtain it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"required data file not found: {str(p)!r}. To fix: {how_to_get}")
    return p


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255).clamp_(0, 255).to(torch.uint8)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float ``[N,C,H,W]`` (align_corners=False, no antialias)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def load_digits_images(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's embedded UCI digits as uint8 ``[1797,size,size]`` and int64 labels.

    ``size=8``: native values ``round(x/16*255)``. ``size=28``: the "uci" recipe (/16, bilinear 8->20,
    zero-pad 4 each side, round*255). Other sizes (e.g. 32): the 28x28 uci image resized bilinearly.
    """
    if int(size) < 1:
        raise DataError(f"digits image size must be a positive integer, got {size!r}; use 8, 28 or 32")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    labels = torch.from_numpy(d.target.astype(np.int64))
    if size == 8:
        return _round_u8(x[:, 0]), labels
    x = F.pad(_resize(x, 20), (4, 4, 4, 4))
    u8 = _round_u8(x)
    if size != 28:
        u8 = _round_u8(_resize(u8.float() / 255.0, int(size)))
    return u8[:, 0], labels


def load_mnist10k(root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``mnist10k.npz`` as uint8 ``[N,28,28]`` images and int64 labels."""
    if root is None and not os.environ.get("DFKT_DATA"):
        raise DataError(f"{MNIST10K_FILE} needs a data folder: {_MNIST10K_HINT}")
    path = require_file(resolve_data_root(root, MNIST10K_FILE) / MNIST10K_FILE, _MNIST10K_HINT)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"images", "labels"} - set(z.files)
            if missing:
                raise DataError(f"{str(path)!r} lacks key(s) {sorted(missing)} (has {z.files}); "
                                f"replace it with an npz holding 'images' and 'labels'")
            images, labels = z["images"], z["labels"]
    except DataError:
        raise
    except Exception as e:  # corrupted / not an npz
        raise DataError(f"cannot read {str(path)!r} as an npz ({e}); replace it with a valid copy") from e
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) == 0:
        raise DataError(f"{str(path)!r}: 'images' must be uint8 [N,28,28], got {images.dtype} "
                        f"{list(images.shape)}; replace the file with the shared mnist10k.npz")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{str(path)!r}: 'labels' must be integer [{len(images)}], got {labels.dtype} "
                        f"{list(labels.shape)}; replace the file with the shared mnist10k.npz")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{str(path)!r}: labels must lie in 0..9, found {int(labels.min())}..{int(labels.max())}; "
                        f"replace the file with the shared mnist10k.npz")
    log.debug("loaded %d images from %s", len(images), path)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _stat(v: Stat, c: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
    if t.numel() not in (1, c):
        raise DataError(f"{what} has {t.numel()} values but the images have {c} channel(s); "
                        f"give one value or one per channel")
    if what == "std" and bool((t <= 0).any()):
        raise DataError(f"std must be > 0, got {t.tolist()}; use e.g. std=0.5")
    return t.reshape(1, -1, 1, 1) if t.numel() == c else t.reshape(1, 1, 1, 1)


def normalize(x: torch.Tensor, mean: Stat = 0.5, std: Stat = 0.5) -> torch.Tensor:
    """``(x - mean) / std`` over ``[N,C,H,W]`` with scalar or per-channel statistics."""
    c = x.shape[1]
    return (x - _stat(mean, c, "mean").to(x.device)) / _stat(std, c, "std").to(x.device)


def to_float(images: torch.Tensor | np.ndarray, size: int | None = None,
             mean: Stat = 0.5, std: Stat = 0.5) -> torch.Tensor:
    """uint8 ``[N,H,W]``/``[N,C,H,W]`` -> float ``[N,C,size,size]``: /255, bilinear resize, normalise.

    Float input is taken as already in ``[0,1]``. ``mean=0, std=1`` keeps the ``[0,1]`` range.
    """
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise DataError(f"to_float expects [N,H,W] or [N,C,H,W] images, got shape {tuple(x.shape)}; "
                        f"reshape the array first")
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    if size is not None:
        x = _resize(x, int(size))
    return normalize(x, mean, std)


def load_npz(path: str | os.PathLike, images: str = "images", labels: str | None = "labels",
             layout: str | None = None, size: int | None = None, channels: int | None = None,
             mean: Stat = 0.5, std: Stat = 0.5, num_classes: int | None = None,
             name: str | None = None) -> ArrayDataset:
    """An ``.npz`` file as a normalised :class:`ArrayDataset`.

    ``images``: the key of the image array (uint8 0..255, or float in [0, 1]), in ``layout`` 'NHW',
    'NHWC' or 'NCHW' (``None``: inferred when unambiguous, else an error asking for it). ``labels``:
    the key of the integer labels; a file without the default key ``'labels'`` (or ``labels=None``) is
    an unlabeled set. ``size`` resizes (bilinear), ``channels`` converts grey <-> RGB, then
    ``(x - mean) / std``.
    """
    p = Path(path).expanduser()
    label = name or p.stem
    if not p.is_file():
        raise DataError(f"npz file {str(p)!r} not found; check the path (relative paths are resolved against "
                        f"the data root: --data-root / DFKT_DATA)")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.files)
            if images not in keys:
                raise DataError(f"{str(p)!r} has no array {images!r} (it has {keys}); name the image array with "
                                f"`images: KEY`")
            x = z[images]
            y = None
            if labels is not None:
                if labels in keys:
                    y = z[labels]
                elif labels != "labels":
                    raise DataError(f"{str(p)!r} has no array {labels!r} (it has {keys}); name the label array "
                                    f"with `labels: KEY`, or leave it out for an unlabeled set")
    except DataError:
        raise
    except Exception as e:  # corrupted / not an npz / pickled objects
        raise DataError(f"cannot read {str(p)!r} as an npz of arrays ({type(e).__name__}: {e}); write it with "
                        f"numpy.savez(path, images=..., labels=...)") from e
    if x.dtype.kind not in "uif":
        raise DataError(f"{str(p)!r}: images are {x.dtype}; store uint8 (0..255) or float (0..1) pixels")
    t = to_nchw(torch.from_numpy(np.ascontiguousarray(x)), layout, label)
    if t.shape[0] == 0:
        raise DataError(f"{str(p)!r}: the image array {images!r} is empty")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    _check_finite(t, label)
    if float(t.max()) > 50:
        log.warning("%s: float images reach %.0f: they look like 0-255 values; dfkt takes float pixels in [0, 1] "
                    "(store uint8, or divide by 255)", p, float(t.max()))
    if channels is not None:
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels!r}")
        if t.shape[1] == 1 and channels == 3:
            t = t.expand(-1, 3, -1, -1)
        elif t.shape[1] == 3 and channels == 1:
            t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif t.shape[1] != channels:
            raise DataError(f"{str(p)!r}: images have {t.shape[1]} channels, cannot convert to {channels}")
    if size is not None:
        t = _resize(t, int(size))
    ds = ArrayDataset(normalize(t, mean, std), y, label, num_classes)
    log.debug("npz %s: %d images %s, %s", p, len(ds), ds.shape, "labelled" if y is not None else "unlabeled")
    return ds
