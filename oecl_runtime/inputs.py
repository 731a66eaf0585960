"""What callers may pass as "images", sorted into model-ready arrays and sources to decode.

Accepted: a path, bytes, a PIL image, a uint8 array (HW, HWC, an already pre-processed CHW
matching the model, NHWC, or an NCHW batch matching the model), or any sequence of those.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from .preprocess import ImageError, InputSpec, load

_SINGLE = (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)


def _array_items(arr: np.ndarray, spec: InputSpec) -> Iterator[tuple[bool, Any]]:
    if arr.dtype != np.uint8:
        raise ImageError(f"array images must be uint8, got {arr.dtype}")
    chw = (spec.channels, spec.height, spec.width)
    if arr.ndim == 4:
        if arr.shape[1:] == chw:
            # An NCHW batch already in model form: rows are used as they are, without copies.
            yield from ((True, row) for row in arr)
        elif arr.shape[3] in (1, 3, 4):
            yield from ((False, img) for img in arr)
        else:
            raise ImageError(
                f"a 4-d array must be NCHW {('N', *chw)} or NHWC with 1/3/4 channels, "
                f"got {arr.shape}"
            )
    elif arr.ndim == 3 and arr.shape == chw:
        yield True, arr
    elif arr.ndim in (2, 3):
        yield False, arr
    else:
        raise ImageError(f"array images must be HW, HWC, CHW, NHWC or NCHW, got shape {arr.shape}")


def iter_items(images: Any, spec: InputSpec) -> Iterator[tuple[bool, Any]]:
    """Yield (ready, item): ready items are uint8 CHW arrays, others still need `load`."""
    if isinstance(images, np.ndarray):
        yield from _array_items(images, spec)
    elif isinstance(images, _SINGLE):
        yield False, images
    elif isinstance(images, Iterable):
        for item in images:
            if isinstance(item, np.ndarray):
                yield from _array_items(item, spec)
            elif isinstance(item, _SINGLE):
                yield False, item
            else:
                raise ImageError(f"cannot read an image from {type(item).__name__}")
    else:
        raise ImageError(f"cannot read an image from {type(images).__name__}")


def prepare(item: tuple[bool, Any], spec: InputSpec) -> np.ndarray:
    ready, obj = item
    return obj if ready else load(obj, spec)


def to_batch(images: Any, spec: InputSpec) -> np.ndarray:
    """All of `images` as one uint8 (N, C, H, W) batch; ImageError names the first bad one."""
    items = list(iter_items(images, spec))
    out = np.empty((len(items), spec.channels, spec.height, spec.width), dtype=np.uint8)
    for i, item in enumerate(items):
        try:
            out[i] = prepare(item, spec)
        except ImageError as e:
            if len(items) == 1:
                raise
            raise ImageError(f"image {i}: {e}") from e
    return out
