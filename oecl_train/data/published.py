"""Readers of published data sets in their own file formats: MNIST's IDX files (raw or gzipped)
and CIFAR-10/100's python batches (read by an unpickler that builds nothing but their arrays)."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from oecl_runtime.files import short_path
from oecl_train.data.reader_base import DataError, ImageSet, Reader, check_labels, require_file

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
