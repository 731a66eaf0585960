"""Protocols as configuration: which images are ID for training, validation and test, and the OE.

- one-vs-rest: ID = one class; test = every test image, ID positive.
- leave-one-out: ID = every class but one; the held-out class is OOD at test time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from oecl_runtime.preprocess import InputSpec
from oecl_train.data.reader_base import DataError, ImageSet
from oecl_train.data.readers import conform, make_reader

PROTOCOLS = ("one-vs-rest", "leave-one-out")


@dataclass
class Splits:
    spec: InputSpec
    id_train: np.ndarray  # uint8 NCHW
    id_val: np.ndarray  # held-out ID training images: threshold and model selection
    test_images: np.ndarray
    test_is_id: np.ndarray  # bool, ID = positive class
    test_labels: np.ndarray  # original class labels
    test_paths: list[str] | None
    oe: np.ndarray | None  # external OE images; None for "none" and "self"
    oe_mode: str  # "none" | "self" | "external"
    classes: list[str]
    id_classes: list[int]
    skipped: int = 0

    @classmethod
    def from_config(cls, cfg: Any, *, progress: bool | None = None, **overrides: Any) -> Splits:
        """The splits a run's config names (a `TrainConfig`, or anything with its data
        fields); `overrides` replace fields, e.g. `oe="none"` where OE is never scored."""
        fields = {k: getattr(cfg, k) for k in CONFIG_FIELDS}
        return build_splits(**{**fields, **overrides}, progress=progress)


# The TrainConfig fields that decide the splits.
CONFIG_FIELDS = (
    "data", "data_root", "id_class", "protocol", "oe", "oe_root", "image_size", "channels",
    "val_fraction", "seed", "strict",
)


def infer_spec(sample: ImageSet, image_size: int | None, channels: int | None) -> InputSpec:
    c = channels or sample.images.shape[1]
    if c not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {c}")
    if image_size is None:
        h, w = sample.images.shape[2:]
        return InputSpec(height=h, width=w, channels=c)
    return InputSpec(height=image_size, width=image_size, channels=c, resize=image_size)


def _val_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction))) if n > 1 else 0
    return np.sort(idx[k:]), np.sort(idx[:k])


def align_classes(train: ImageSet, test: ImageSet) -> tuple[list[str], np.ndarray]:
    """One class list for both splits, matched by name: the training classes in their order,
    then the classes only the test split has (MVTec AD's defect folders). Returns that list
    and the test labels as indices into it."""
    classes = list(train.classes) + sorted(set(test.classes) - set(train.classes))
    position = {c: i for i, c in enumerate(classes)}
    index = np.array([position[c] for c in test.classes], np.int64)
    return classes, index[test.labels] if len(test.labels) else test.labels


def check_splits(splits: Splits, where: str) -> None:
    """Everything evaluation and export will need, checked before the first training step."""
    names = [splits.classes[c] for c in splits.id_classes]
    if not splits.test_is_id.any():
        raise DataError(
            f"{where}: the test split has no ID images (no test images of {', '.join(names)}); "
            "evaluation needs both ID and OOD test images"
        )
    if splits.test_is_id.all():
        raise DataError(
            f"{where}: the test split has no OOD images (every test image is of "
            f"{', '.join(names)}); add test images of other classes, e.g. test/<defect>/"
        )
    if len(splits.id_val) == 0:
        raise DataError(
            f"{where}: no ID-validation images to set the threshold on ({len(splits.id_train)} "
            f"ID training images of {', '.join(names)}); at least 2 are needed"
        )


def build_splits(
    *,
    data: str,
    data_root: str | None,
    id_class: str | int,
    protocol: str,
    oe: str,
    oe_root: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    progress: bool | None = None,
) -> Splits:
    """Read the sources once and cut them into the protocol's splits (deterministic by seed).

    Classes are matched across the train and test splits by name; a class found only in the
    test split is OOD under either protocol. Raises DataError (one line) when the splits could
    not be evaluated: no ID or no OOD test images, or no ID-validation images for a threshold.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    # The size rule only: the colour mode stays the data's unless --channels sets it.
    spec0 = InputSpec(image_size, image_size, 3, resize=image_size) if image_size else None
    reader = make_reader(
        data, data_root, spec=spec0, strict=strict, seed=seed, channels=channels,
        progress=progress,
    )
    train, test = reader.load("train"), reader.load("test")
    spec = infer_spec(train, image_size, channels)
    classes, test_labels = align_classes(train, test)
    trained = sorted(set(train.classes[c] for c in np.unique(train.labels)))
    if str(id_class) in classes and str(id_class) not in train.classes:
        raise DataError(
            f"class {str(id_class)!r} has test images only, so it is OOD; the ID class must "
            f"have training images: {', '.join(train.classes)}"
        )
    k = train.class_index(id_class)
    if protocol == "one-vs-rest":
        id_classes = [k]
    else:
        id_classes = [c for c, name in enumerate(train.classes) if c != k and name in trained]
    in_id = np.isin(train.labels, id_classes)
    if not (train.labels == k).any():
        raise DataError(f"class {train.classes[k]!r} has no training images")
    tr_idx, val_idx = _val_split(int(in_id.sum()), val_fraction, seed)
    id_images = conform(train.images[in_id], spec)

    oe_images, oe_mode = None, {"none": "none", "self": "self"}.get(oe, "external")
    if oe_mode == "external":
        same_source = oe == data and (oe_root is None or oe_root == data_root)
        if same_source:
            # Near-OE from the same labelled source: only non-ID classes, never an ID image.
            oe_images = conform(train.images[~in_id], spec)
            if len(oe_images) == 0:
                raise DataError("OE from the ID source leaves no non-ID classes")
        else:
            oe_reader = make_reader(
                oe, oe_root, spec=spec, strict=strict, seed=seed, channels=spec.channels,
                progress=progress,
            )
            oe_images = conform(oe_reader.load("train").images, spec)

    splits = Splits(
        spec=spec,
        id_train=id_images[tr_idx],
        id_val=id_images[val_idx],
        test_images=conform(test.images, spec),
        test_is_id=np.isin(test_labels, id_classes),
        test_labels=test_labels,
        test_paths=test.paths,
        oe=oe_images,
        oe_mode=oe_mode,
        classes=classes,
        id_classes=id_classes,
        skipped=train.skipped + test.skipped,
    )
    check_splits(splits, data_root or data)
    return splits
