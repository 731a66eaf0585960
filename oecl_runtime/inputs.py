"""What callers may pass as "images", sorted into model-ready arrays and sources to decode.

Accepted: a path, bytes, a PIL image, a uint8 array (HW, HWC, an already pre-processed CHW
matching the model, NHWC, or an NCHW batch matching the model), or any sequence of those.

Untrusted bodies are measured before they are decoded: an `.npy` body is counted and
size-checked from its header (`npy_array`), so a 2 MB array of two million 1x1 images is
refused before a single one is resized.
"""

from __future__ import annotations

import ast
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    InputSpec,
    check_size,
    load,
    load_opened,
)

_SINGLE = (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)
_NPY_MAGIC = b"\x93NUMPY"


class Abandoned(Exception):
    """The caller stopped waiting (e.g. the HTTP client went away); the work was dropped."""


def _wrong_shape(shape: tuple[int, ...], spec: InputSpec) -> ImageError:
    c, h, w = spec.channels, spec.height, spec.width
    return ImageError(f"an array of images must be shaped HW, HWC (C = 1, 3 or 4), CHW "
                      f"({c}, {h}, {w}), NHWC (C = 1, 3 or 4) or NCHW (N, {c}, {h}, {w}); "
                      f"got shape {shape}")


def _array_items(arr: np.ndarray, spec: InputSpec) -> Iterator[tuple[bool, Any]]:
    if arr.dtype != np.uint8:
        raise ImageError(f"array images must be uint8, got {arr.dtype}")
    chw = (spec.channels, spec.height, spec.width)
    array_count(arr.shape, spec)
    if arr.ndim == 4:
        if arr.shape[1:] == chw:
            # An NCHW batch already in model form: rows are used as they are, without copies.
            yield from ((True, row) for row in arr)
        else:
            yield from ((False, img) for img in arr)
    elif arr.ndim == 3 and arr.shape == chw:
        yield True, arr
    else:
        yield False, arr


def array_count(shape: Sequence[int], spec: InputSpec) -> int:
    """How many images an array of `shape` holds, without touching its data; ImageError (saying
    which shapes are accepted) for a shape that is none of them."""
    chw = (spec.channels, spec.height, spec.width)
    shape = tuple(shape)
    if len(shape) == 4 and (shape[1:] == chw or shape[3] in (1, 3, 4)):
        return shape[0]
    if len(shape) == 2 or (len(shape) == 3 and (shape == chw or shape[2] in (1, 3, 4))):
        return 1
    raise _wrong_shape(shape, spec)


def _image_hw(shape: tuple[int, ...], spec: InputSpec) -> tuple[int, int]:
    chw = (spec.channels, spec.height, spec.width)
    if shape[-3:] == chw:
        return spec.height, spec.width
    return (shape[1], shape[2]) if len(shape) == 4 else (shape[0], shape[1])


def npy_array(body: bytes, spec: InputSpec, max_images: int,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An `.npy` body as a read-only uint8 array over `body` (no copy), refused from its header
    alone when it is not uint8, holds more than `max_images` images, or images over the cap.

    Raises ImageError for a bad body and TooManyImages (from the batcher) for too many images.
    """
    from .batcher import TooManyImages

    shape, dtype, fortran, offset = _npy_header(body)
    if dtype != np.uint8:
        raise ImageError(f"array images must be uint8, got {dtype}")
    n = array_count(shape, spec)
    if n > max_images:
        raise TooManyImages(f"request has {n} images, the server queues at most {max_images}")
    if n and len(shape) >= 2:
        h, w = _image_hw(shape, spec)
        check_size(w, h, max_pixels, "array image")
    size = math.prod(shape)  # Python ints: a forged shape cannot overflow to a small size
    if len(body) - offset != size:
        raise ImageError(f"body is not a valid .npy array: header says {size} bytes of data, "
                         f"body has {len(body) - offset}")
    arr = np.frombuffer(body, np.uint8, count=size, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def _npy_header(body: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    bad = "body is not a valid .npy array"
    if len(body) < 10 or body[:6] != _NPY_MAGIC:
        raise ImageError(f"{bad}: no .npy magic")
    major = body[6]
    if major == 1:
        hlen, start = int.from_bytes(body[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(body[8:12], "little"), 12
    else:
        raise ImageError(f"{bad}: unknown format version {major}")
    if len(body) < start + hlen or hlen > 65535:
        raise ImageError(f"{bad}: truncated header")
    try:
        # The header is a Python literal; literal_eval evaluates no code.
        header = ast.literal_eval(body[start:start + hlen].decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
        dtype = np.dtype(descr)
    except Exception as e:  # SyntaxError, KeyError, TypeError, ValueError from a bad header
        raise ImageError(f"{bad}: unreadable header ({type(e).__name__})") from e
    if dtype.hasobject:
        raise ImageError(f"{bad}: object arrays are not images")
    if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ImageError(f"{bad}: shape {shape!r} is not a tuple of sizes")
    if not isinstance(fortran, bool):
        raise ImageError(f"{bad}: fortran_order must be true or false")
    return shape, dtype, fortran, start + hlen


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


def prepare(item: tuple[bool, Any], spec: InputSpec, name: str | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    ready, obj = item
    return obj if ready else load(obj, spec, name, max_pixels)


def to_batch(images: Any, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
             stop: threading.Event | None = None) -> np.ndarray:
    """All of `images` as one uint8 (N, C, H, W) batch; ImageError names the first bad one.

    `stop` set (the caller went away) abandons the work between images.
    """
    items = list(iter_items(images, spec))
    out = np.empty((len(items), spec.channels, spec.height, spec.width), dtype=np.uint8)
    for i, item in enumerate(items):
        if stop is not None and stop.is_set():
            raise Abandoned
        try:
            out[i] = prepare(item, spec, None, max_pixels)
        except ImageError as e:
            if len(items) == 1:
                raise
            raise ImageError(f"image {i}: {e}") from e
    return out


def load_each(images: Sequence[Image.Image | ImageError], names: Sequence[str], spec: InputSpec,
              max_pixels: int = DEFAULT_MAX_PIXELS, stop: threading.Event | None = None
              ) -> tuple[np.ndarray, list[str | None]]:
    """Finish decoding images opened with `open_image` (or the ImageError opening them gave):
    (batch of the readable ones, per-image error or None). One unreadable file costs only its
    own entry, as in `oecl score`."""
    out = np.empty((len(images), spec.channels, spec.height, spec.width), dtype=np.uint8)
    errors: list[str | None] = []
    n = 0
    for img, name in zip(images, names, strict=True):
        if stop is not None and stop.is_set():
            raise Abandoned
        try:
            if isinstance(img, ImageError):
                raise img
            out[n] = load_opened(img, spec, name, max_pixels)
        except ImageError as e:
            errors.append(str(e))
            continue
        errors.append(None)
        n += 1
    return out[:n], errors
