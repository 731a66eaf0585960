"""Protocols as configuration: which images are ID for training, validation and test, and the OE.

- one-vs-rest: ID = one class; test = every test image, ID positive.
- leave-one-out: ID = every class but one; the held-out class is OOD at test time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oecl_runtime.preprocess import InputSpec
from oecl_train.data.readers import DataError, ImageSet, conform, make_reader

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
) -> Splits:
    """Read the sources once and cut them into the protocol's splits (deterministic by seed)."""
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    spec0 = (
        InputSpec(image_size, image_size, channels or 3, resize=image_size) if image_size else None
    )
    reader = make_reader(data, data_root, spec=spec0, strict=strict, seed=seed)
    train, test = reader.load("train"), reader.load("test")
    spec = infer_spec(train, image_size, channels)
    k = train.class_index(id_class)
    n_classes = len(train.classes)
    id_classes = [k] if protocol == "one-vs-rest" else [c for c in range(n_classes) if c != k]
    in_id = np.isin(train.labels, id_classes)
    if not in_id.any():
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
            oe_reader = make_reader(oe, oe_root, spec=spec, strict=strict, seed=seed)
            oe_images = conform(oe_reader.load("train").images, spec)

    return Splits(
        spec=spec,
        id_train=id_images[tr_idx],
        id_val=id_images[val_idx],
        test_images=conform(test.images, spec),
        test_is_id=np.isin(test.labels, id_classes),
        test_labels=test.labels,
        test_paths=test.paths,
        oe=oe_images,
        oe_mode=oe_mode,
        classes=train.classes,
        id_classes=id_classes,
        skipped=train.skipped + test.skipped,
    )
