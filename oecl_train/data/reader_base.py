"""What every reader shares: the `ImageSet` a reader returns, the `Reader` interface, the one-line
`DataError`, and the checks and helpers of the readers (files, directories, labels, splits,
progress bars)."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oecl_runtime.files import os_reason, regular_file_problem, short_path


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


def from_hwc(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2)) if arr.ndim == 4 else arr[:, None]


def deterministic_split(n: int, labels: np.ndarray, test_fraction: float, seed: int):
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


def progress_enabled(progress: bool | None) -> bool:
    """A progress bar is drawn when asked, or by default only on a terminal: written to a
    file, a bar's carriage-return redraws are just noise."""
    return sys.stderr.isatty() if progress is None else progress
