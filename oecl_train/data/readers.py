"""Readers: each turns one on-disk (or bundled) format into uint8 images and integer labels.

Every reader returns an `ImageSet` per split ("train" or "test"). Images are decoded once
and kept as uint8 NCHW; conversion to the model's input spec happens in `conform`.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import stat
import struct
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from oecl_runtime.files import os_reason, regular_file_problem, short_path
from oecl_runtime.preprocess import ImageError, InputSpec, decode, to_model_input
from oecl_train.config import DATA_SOURCES

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}


class DataError(ValueError):
    """A data problem found before training starts; the message is one line for the user."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    paths: list[str] | None = None  # source files, when the set was read from files
    skipped: int = 0  # unreadable files left out

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                f"images must be uint8 NCHW, got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def subset(self, idx: np.ndarray) -> ImageSet:
        paths = None if self.paths is None else [self.paths[i] for i in idx]
        return ImageSet(self.images[idx], self.labels[idx], self.classes, paths)

    def class_index(self, name: str | int) -> int:
        """A class by folder name, or by index only where that cannot be mistaken for a name.

        Indices follow the sorted class names. When some class names are themselves numbers
        (MNIST's "0".."9", or folders named "1", "2"), a number is only ever read as a name.
        """
        text = str(name)
        if text in self.classes:
            return self.classes.index(text)
        listing = ", ".join(f"{i}={c}" for i, c in enumerate(self.classes))
        if not text.lstrip("-").isdigit():
            raise DataError(f"no class {text!r}; classes are {listing}")
        if any(c.isdigit() for c in self.classes):
            raise DataError(
                f"no class {text!r}; class names here are numbers, so --id-class takes a name: "
                f"{', '.join(self.classes)}"
            )
        i = int(text)
        if not 0 <= i < len(self.classes):
            raise DataError(f"no class {i}; classes are {listing}")
        return i


def _from_hwc(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2)) if arr.ndim == 4 else arr[:, None]


def _deterministic_split(n: int, labels: np.ndarray, test_fraction: float, seed: int):
    """Stratified index split that depends only on (labels, seed)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class Reader:
    """Interface: `load(split)` → ImageSet, for split in {"train", "test"}."""

    name = "reader"

    def load(self, split: str) -> ImageSet:
        raise NotImplementedError


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
        tr, te = _deterministic_split(len(labels), labels, self.test_fraction, self.seed)
        idx = tr if split == "train" else te
        return ImageSet(images[idx], labels[idx], [str(i) for i in range(10)])


def require_file(path: Path) -> None:
    """Refuse anything but a regular file before it is opened (a FIFO blocks its reader)."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise DataError(f"{short_path(path)}: {problem}")


def require_dir(path: Path) -> None:
    """A data root that is a directory, or one line saying why not (a symlink loop or a name
    too long included: `Path.is_dir` raises on the latter)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{short_path(path)}: no such directory") from None
    except OSError as e:
        raise DataError(f"{short_path(path)}: {os_reason(e)}") from None
    if not stat.S_ISDIR(mode):
        raise DataError(f"{short_path(path)}: not a directory")


def check_labels(raw: np.ndarray, source: str, n_classes: int) -> np.ndarray:
    """Class labels as int64, checked once: whole numbers in 0..n_classes-1. A float array of
    whole numbers is accepted; NaN, fractions and anything out of range are refused with the
    first bad index (a -1 would otherwise index the last class, 0.7 truncate to 0)."""
    labels = np.asarray(raw).reshape(-1)
    if labels.dtype == np.bool_ or not (np.issubdtype(labels.dtype, np.integer)
                                        or np.issubdtype(labels.dtype, np.floating)):
        raise DataError(f"{source}: labels must be integers, got {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{source}: label {labels[i]:g} at index {i} is not an integer "
                            "class index")
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        i = int(bad[0])
        value = labels[i].item()
        text = f"{value:g}" if isinstance(value, float) else str(value)
        raise DataError(f"{source}: label {text} at index {i} is outside the class indices "
                        f"0..{n_classes - 1}")
    return labels.astype(np.int64)


# Largest IDX payload read (the header declares it): MNIST's training images are 47 MB, the
# largest EMNIST split 547 MB.
IDX_MAX_BYTES = 1 << 31


def _read_exact(f: Any, out: memoryview) -> int:
    got = 0
    while got < len(out):
        n = f.readinto(out[got:])
        if not n:
            break
        got += n
    return got


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array of `ndim` dimensions, raw or gzipped. Exactly the bytes the
    header declares are read: a gzip that inflates to more is refused after that many, never
    inflated whole."""
    require_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    name = short_path(path)
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{name}: not an IDX file (shorter than its 4-byte header)")
            zero, dtype_code, dims = struct.unpack(">HBB", head)
            if zero != 0 or dtype_code != 0x08:
                raise DataError(f"{name}: not an unsigned-byte IDX file")
            if dims != ndim:
                raise DataError(f"{name}: an IDX file of {dims} dimensions, expected {ndim}")
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise DataError(f"{name}: truncated IDX header")
            shape = struct.unpack(f">{ndim}I", sizes)
            size = math.prod(shape)
            if size > IDX_MAX_BYTES:
                raise DataError(f"{name}: the IDX header declares {shape} = {size} bytes, over "
                                f"the limit of {IDX_MAX_BYTES}")
            arr = np.empty(size, np.uint8)
            got = _read_exact(f, memoryview(arr))
            if got < size:
                raise DataError(f"{name}: truncated IDX file ({got} of {size} bytes)")
            if f.read(1):
                raise DataError(f"{name}: more data than the IDX header declares ({shape} = "
                                f"{size} bytes); the file is not one IDX array")
        return arr.reshape(shape)
    except (OSError, EOFError, zlib.error) as e:
        # gzip's BadGzipFile is an OSError; a corrupt deflate stream is a zlib.error and a cut
        # one an EOFError.
        raise DataError(f"{name}: cannot read IDX file: {e}") from e


class MnistReader(Reader):
    """MNIST (or Fashion-MNIST) IDX files, raw or gzipped, from a directory."""

    name = "mnist"
    FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _find(self, stem: str) -> Path:
        for cand in (self.root / stem, self.root / f"{stem}.gz"):
            if os.path.lexists(cand):
                return cand
        raise DataError(f"{self.root}: missing {stem}[.gz]")

    def load(self, split: str) -> ImageSet:
        img_name, lab_name = self.FILES[split]
        images = _read_idx(self._find(img_name), 3)
        lab_path = self._find(lab_name)
        labels = check_labels(_read_idx(lab_path, 1), short_path(lab_path), 10)
        return ImageSet(images[:, None], labels, [str(i) for i in range(10)])


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals a CIFAR python batch needs: numpy's array reconstruction."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR batch holds only arrays, lists and strings")
        return super().find_class(module, name)


class CifarReader(Reader):
    """CIFAR-10/100 'python version' pickle batches from their extracted directory."""

    def __init__(self, root: str | Path, variant: str = "cifar10"):
        self.root, self.variant = Path(root), variant
        self.name = variant

    def _unpickle(self, path: Path) -> dict:
        if not os.path.lexists(path):
            raise DataError(
                f"{self.root}: missing {path.name} (expected the python-version batches)"
            )
        require_file(path)
        # The CIFAR distribution is itself a pickle, and a pickle can run code: these files are
        # read by an unpickler that builds only what CIFAR batches hold (dicts, lists, strings,
        # numbers, numpy arrays) and refuses any other global.
        try:
            with open(path, "rb") as f:
                batch = _CifarUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise DataError(f"{path}: {e}") from e
        except (EOFError, ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: not a CIFAR batch ({e})") from e
        if not isinstance(batch, dict):
            raise DataError(f"{path}: not a CIFAR batch (expected a dict)")
        return batch

    def load(self, split: str) -> ImageSet:
        if self.variant == "cifar10":
            files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            meta, key, names_key = "batches.meta", "labels", "label_names"
        else:
            files, meta, key, names_key = [split], "meta", "fine_labels", "fine_label_names"
        names = self._unpickle(self.root / meta)
        if names_key not in names:
            raise DataError(f"{short_path(self.root / meta)}: no {names_key}")
        classes = [str(c) for c in names[names_key]]
        batches = [self._unpickle(self.root / f) for f in files]
        for f, b in zip(files, batches, strict=True):
            missing = sorted({"data", key} - set(b))
            if missing:
                raise DataError(f"{short_path(self.root / f)}: not a CIFAR batch (no "
                                f"{', '.join(missing)})")
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([
            check_labels(np.asarray(b[key]), short_path(self.root / f), len(classes))
            for f, b in zip(files, batches, strict=True)
        ])
        return ImageSet(data.reshape(-1, 3, 32, 32), labels, classes)


# Pillow modes that hold one gray level per pixel (with or without alpha).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def progress_enabled(progress: bool | None) -> bool:
    """A progress bar is drawn when asked, or by default only on a terminal: written to a
    file, a bar's carriage-return redraws are just noise."""
    return sys.stderr.isatty() if progress is None else progress


class FolderReader(Reader):
    """One sub-directory per class of PNG/JPEG/BMP files (ImageNet-30, DIOR, WBC, HAM10000 layout).

    With `root/train/<class>` and `root/test/<class>` those are the splits (the MVTec AD layout
    `train/good`, `test/good`, `test/<defect>` included; anything else under root, such as
    MVTec's `ground_truth/` masks, is not read). Otherwise the class folders sit directly under
    root and a deterministic stratified split is made. Classes are matched across splits by
    folder name in `build_splits`.

    Each image is converted to the model's colour mode on its own, as the runtime converts each
    request: to `channels` when given, else to gray when every image of the split is gray and
    to RGB (gray replicated) when any is colour.
    """

    name = "folder"

    def __init__(
        self,
        root: str | Path,
        spec: InputSpec | None = None,
        strict: bool = False,
        test_fraction: float = 0.3,
        seed: int = 0,
        channels: int | None = None,
        progress: bool | None = None,
    ):
        self.root, self.spec, self.strict = Path(root), spec, strict
        self.test_fraction, self.seed = test_fraction, seed
        self.channels, self.progress = channels, progress
        require_dir(self.root)
        has = [(self.root / d).is_dir() for d in ("train", "test")]
        if any(has) and not all(has):
            missing = "test" if has[0] else "train"
            raise DataError(
                f"{self.root}: has {'train' if has[0] else 'test'}/ but no {missing}/; give both "
                "(train/<class>/, test/<class>/) or put the class folders directly under it"
            )

    def _to_array(self, img) -> np.ndarray:
        channels = self.channels or (1 if img.mode in GRAY_MODES else 3)
        if self.spec is not None:
            return to_model_input(img, replace(self.spec, channels=channels))
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def _unlisted(self, e: OSError) -> None:
        message = f"cannot list {short_path(e.filename)}: {os_reason(e)}"
        if self.strict:
            raise DataError(message)
        print(f"warning: {message}; its images are not read", file=sys.stderr)

    def _images_under(self, folder: Path) -> list[Path]:
        """Every entry under `folder` named like an image, sorted; a directory that cannot be
        listed is one warning line (an error with strict), never left out in silence."""
        found = []
        for top, dirs, names in os.walk(folder, onerror=self._unlisted):
            found += [Path(top, n) for n in dirs + names
                      if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
        return sorted(found)

    def _read_dir(self, root: Path) -> ImageSet:
        try:
            classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        except OSError as e:
            raise DataError(f"cannot list {short_path(root)}: {os_reason(e)}") from None
        files = [
            (p, c) for c, name in enumerate(classes) for p in self._images_under(root / name)
        ]
        if not files:
            raise DataError(f"{root}: no images (expected <class>/<image>.png|jpg|bmp)")
        print(f"reading {len(files)} images from {root}", file=sys.stderr, flush=True)
        arrays, labels, paths, skipped = [], [], [], 0
        bar = tqdm(files, disable=not progress_enabled(self.progress), unit="img", leave=False)
        for path, label in bar:
            # Only regular files are opened: a FIFO named x.png would block the read forever.
            problem = regular_file_problem(path)
            if problem is not None:
                if self.strict:
                    raise DataError(f"{short_path(path)}: {problem}")
                print(f"warning: skipped {path}: {problem}", file=sys.stderr)
                skipped += 1
                continue
            try:
                arr = self._to_array(decode(path, spec=self.spec))
            except ImageError as e:
                if self.strict:
                    raise DataError(str(e)) from e
                print(f"warning: skipped unreadable image {path}: {e}", file=sys.stderr)
                skipped += 1
                continue
            arrays.append(arr)
            labels.append(label)
            paths.append(str(path))
        if not arrays:
            raise DataError(f"{root}: none of the {len(files)} image files could be read")
        if len({a.shape[1:] for a in arrays}) > 1:
            first = arrays[0].shape[1:]
            other = next(i for i, a in enumerate(arrays) if a.shape[1:] != first)
            raise DataError(
                f"{root}: images differ in size ({paths[0]} is {first[1]}x{first[0]}, "
                f"{paths[other]} is {arrays[other].shape[2]}x{arrays[other].shape[1]}); "
                "pass --image-size N to resize the shorter side to N and centre-crop"
            )
        if len({a.shape[0] for a in arrays}) > 1:
            # Gray images among colour ones: replicate gray, exactly Pillow's L -> RGB.
            arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
        if skipped:
            print(
                f"warning: {skipped} of {len(files)} images in {root} were unreadable and skipped",
                file=sys.stderr,
            )
        return ImageSet(np.stack(arrays), np.asarray(labels, np.int64), classes, paths, skipped)

    def load_all(self) -> ImageSet:
        """Every image under root (one sub-folder per class), unsplit."""
        return self._read_dir(self.root)

    def load(self, split: str) -> ImageSet:
        if (self.root / split).is_dir():
            return self._read_dir(self.root / split)
        full = self._read_dir(self.root)
        tr, te = _deterministic_split(len(full.labels), full.labels, self.test_fraction, self.seed)
        out = full.subset(tr if split == "train" else te)
        out.skipped = full.skipped
        return out


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
            images = _from_hwc(images)
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
