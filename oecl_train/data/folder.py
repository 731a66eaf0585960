"""The folder reader: one sub-directory per class of image files, split by the folders (train/,
test/) or deterministically, each image decoded through the runtime's own pre-processing."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from oecl_runtime.files import os_reason, regular_file_problem, short_path
from oecl_runtime.preprocess import ImageError, InputSpec, decode, to_model_input
from oecl_train.data.reader_base import (
    DataError,
    ImageSet,
    Reader,
    deterministic_split,
    progress_enabled,
    require_dir,
)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}

# Pillow modes that hold one gray level per pixel (with or without alpha).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


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
        tr, te = deterministic_split(len(full.labels), full.labels, self.test_fraction, self.seed)
        out = full.subset(tr if split == "train" else te)
        out.skipped = full.skipped
        return out
