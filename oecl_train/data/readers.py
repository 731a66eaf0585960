"""Readers: each turns one on-disk (or bundled) format into uint8 images and integer labels.

Every reader returns an `ImageSet` per split ("train" or "test"). Images are decoded once
and kept as uint8 NCHW; conversion to the model's input spec happens in `conform`. The bundled
sources (digits, photos) and .npy arrays are read here; the folder reader is in
`oecl_train.data.folder`, MNIST and CIFAR in `oecl_train.data.published`, and what all of them
share in `oecl_train.data.reader_base`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from oecl_runtime.files import short_path
from oecl_runtime.preprocess import InputSpec, to_model_input
from oecl_train.config import DATA_SOURCES
from oecl_train.data.folder import FolderReader
from oecl_train.data.published import CifarReader, MnistReader
from oecl_train.data.reader_base import (
    DataError,
    ImageSet,
    Reader,
    check_labels,
    deterministic_split,
    from_hwc,
    require_dir,
    require_file,
)


class DigitsReader(Reader):
    """scikit-learn's bundled 8x8 digits (1,797 images, 16 gray levels → 0..255); no download."""

    name = "digits"

    def __init__(self, test_fraction: float = 0.3, seed: int = 0):
        self.test_fraction, self.seed = test_fraction, seed

    def load(self, split: str) -> ImageSet:
        from sklearn.datasets import load_digits  # optional (the train extra) and slow

        d = load_digits()
        images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)[:, None]
        labels = d.target.astype(np.int64)
        tr, te = deterministic_split(len(labels), labels, self.test_fraction, self.seed)
        idx = tr if split == "train" else te
        return ImageSet(images[idx], labels[idx], [str(i) for i in range(10)])


class NpyReader(Reader):
    """An .npy image array (N,H,W), (N,H,W,C) or (N,C,H,W) uint8, plus an .npy label array.

    `root` is a directory holding {train,test}_images.npy and {train,test}_labels.npy.
    """

    name = "npy"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def load(self, split: str) -> ImageSet:
        ip, lp = self.root / f"{split}_images.npy", self.root / f"{split}_labels.npy"
        for p in (ip, lp):
            if not os.path.lexists(p):
                raise DataError(f"{self.root}: missing {p.name}")
        images = _load_npy(ip)
        labels = check_labels(_load_npy(lp), short_path(lp), NPY_MAX_CLASSES)
        if images.dtype != np.uint8:
            raise DataError(f"{ip}: images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = from_hwc(images)
        elif images.ndim != 4:
            raise DataError(f"{ip}: expected (N,H,W), (N,H,W,C) or (N,C,H,W), got {images.shape}")
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        return ImageSet(np.ascontiguousarray(images), labels, [str(i) for i in range(n_classes)])


# Class indices an .npy label may hold: the class list is 0..max(label), so a corrupt label
# (10^12) would otherwise build a list of that many names.
NPY_MAX_CLASSES = 65536


def _load_npy(path: Path) -> np.ndarray:
    require_file(path)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # a cut or foreign file, or object arrays
        raise DataError(f"{short_path(path)}: cannot read .npy file: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


class PhotosReader(Reader):
    """Built-in far-OE: random crops of the natural photographs scikit-learn ships (no download).

    Crops are taken at random positions and scales (5–50% of the shorter side), so the set is
    a varied pile of textures, edges and colours unrelated to any ID data set.
    """

    name = "photos"

    def __init__(self, size: int = 32, count: int = 20000, seed: int = 0):
        self.size, self.count, self.seed = size, count, seed

    def load(self, split: str) -> ImageSet:
        from sklearn.datasets import load_sample_images  # optional (the train extra) and slow

        rng = np.random.default_rng(self.seed + (0 if split == "train" else 1))
        photos = [Image.fromarray(p) for p in load_sample_images().images]
        out = np.empty((self.count, 3, self.size, self.size), np.uint8)
        for i in range(self.count):
            img = photos[i % len(photos)]
            w, h = img.size
            side = int(min(w, h) * rng.uniform(0.05, 0.5))
            x, y = rng.integers(0, w - side), rng.integers(0, h - side)
            crop = img.crop((x, y, x + side, y + side)).resize(
                (self.size, self.size), Image.BILINEAR
            )
            out[i] = np.asarray(crop).transpose(2, 0, 1)
        return ImageSet(out, np.zeros(self.count, np.int64), ["photo"])


READERS = DATA_SOURCES


def make_reader(
    name: str,
    root: str | None = None,
    *,
    spec: InputSpec | None = None,
    strict: bool = False,
    seed: int = 0,
    channels: int | None = None,
    progress: bool | None = None,
) -> Reader:
    """Build a reader by name; `root` is the directory for the on-disk formats.

    `spec` sets the size rule of the folder reader (and the crop size of photos); `channels`
    its colour mode (None: the data's own)."""
    needs_root = {"mnist", "cifar10", "cifar100", "folder", "npy"}
    if name not in READERS:
        raise DataError(f"unknown data source {name!r}; choose from {', '.join(READERS)}")
    if name in needs_root:
        if not root:
            raise DataError(f"data source {name!r} needs a directory (--data-root / --oe-root)")
        require_dir(Path(root))
    if name == "digits":
        return DigitsReader(seed=seed)
    if name == "mnist":
        return MnistReader(root)
    if name in ("cifar10", "cifar100"):
        return CifarReader(root, name)
    if name == "folder":
        return FolderReader(root, spec, strict, seed=seed, channels=channels, progress=progress)
    if name == "npy":
        return NpyReader(root)
    return PhotosReader(size=spec.height if spec else 32, seed=seed)


def conform(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Bring uint8 NCHW images to the spec's channels and size through the runtime's own
    pre-processing, so training, evaluation and serving see identical pixels."""
    n, c, h, w = images.shape
    if (c, h, w) == (spec.channels, spec.height, spec.width):
        return images
    if (h, w) == (spec.height, spec.width) and spec.channels == 3 and c == 1:
        return np.repeat(images, 3, axis=1)
    if (h, w) != (spec.height, spec.width) and spec.resize is None:
        raise DataError(
            f"images are {w}x{h} but the model input is {spec.width}x{spec.height}; "
            "pass --image-size N to resize the shorter side to N and centre-crop"
        )
    out = np.empty((n, spec.channels, spec.height, spec.width), np.uint8)
    for i in range(n):
        arr = images[i, 0] if c == 1 else images[i].transpose(1, 2, 0)
        out[i] = to_model_input(Image.fromarray(arr), spec)
    return out
