"""The one pre-processing path shared by training-time evaluation, export verification and serving.

An image becomes a uint8 CHW array in the colour mode and size an artifact declares:
decode → colour mode → resize the shorter side to `resize` → centre crop to (height, width).
There is no crop-only rule: without `resize` the shorter side goes to the input's shorter side,
so an image of another size is brought to the size the model was trained at, never cut.
Mean/std normalisation is not done here: it lives inside the exported graph.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .names import DEFAULT_MAX_PIXELS

_RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}
# The rule an artifact states in `input.resize_rule` (its `resize` is always a number).
RESIZE_RULE = "shorter side to `resize`, then centre crop to height x width"


class ImageError(ValueError):
    """An input that cannot be turned into a model input; the message names the problem."""


@dataclass(frozen=True)
class InputSpec:
    height: int
    width: int
    channels: int = 3  # 1 = "L" (grayscale), 3 = "RGB"
    # Shorter side to this, then centre crop. None: to min(height, width), the size a model
    # trained on images of its input size saw (artifacts exported before every one stated a
    # number hold null; they are served the same way).
    resize: int | None = None
    interpolation: str = "bilinear"

    @property
    def color_mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def short_side(self) -> int:
        """The length the image's shorter side is resized to before the centre crop."""
        return self.resize if self.resize is not None else min(self.height, self.width)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["color_mode"] = self.color_mode
        d["resize_rule"] = "shorter side to `resize` (if set), then centre crop to height x width"
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InputSpec:
        return cls(
            height=int(d["height"]),
            width=int(d["width"]),
            channels=int(d.get("channels", 3)),
            resize=None if d.get("resize") is None else int(d["resize"]),
            interpolation=str(d.get("interpolation", "bilinear")),
        )


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _name(source: Any, name: str | None = None) -> str:
    if name is not None:
        return name
    return str(source) if isinstance(source, (str, os.PathLike)) else "image bytes"


class UnsupportedFormat(ImageError):
    """Bytes of an image format outside `ACCEPTED_FORMATS`, or of no image format at all."""


# The formats read, each checked for its pixel count from the header before any decode work.
# Others are refused from their leading bytes, before Pillow sees them: its ICO plugin decodes
# the whole embedded PNG inside `open()` (a 17 KB file held a 12000x12000 image), EPS calls
# Ghostscript, and TIFF, JPEG 2000 and the rest bring decoders whose cost a header does not bound.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF")
_ACCEPTED = ", ".join(ACCEPTED_FORMATS)

# Leading bytes -> the one Pillow plugin to use. Pillow otherwise probes its plugins in turn,
# which is a large share of the decode of a small image (an HTTP request's whole body).
_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"),
          (b"GIF8", "GIF"), (b"BM", "BMP"))
# Formats refused by name, so that the message says what was sent.
_REFUSED_MAGIC = (
    (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"),
    (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
    (b"qoif", "QOI"), (b"8BPS", "PSD"), (b"icns", "ICNS"), (b"DDS ", "DDS"),
    (b"\x59\xa6\x6a\x95", "Sun raster"), (b"\x01\xda", "SGI"), (b"SIMPLE  =", "FITS"),
    (b"\xffO\xffR", "JPEG 2000"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"\xff\x0a", "JPEG XL"),
)
_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF",
                b"mif1": "HEIF", b"msf1": "HEIF", b"jp2 ": "JPEG 2000"}
HEAD_BYTES = 32  # enough leading bytes to tell every format above


def _refused_name(head: bytes) -> str | None:
    for magic, fmt in _REFUSED_MAGIC:
        if head.startswith(magic):
            return fmt
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "ISO media (" + head[8:12].decode("latin-1") + ")")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return "Netpbm"
    if head.startswith(b"Image type:") or head.startswith(b"Image size"):
        return "IM"
    return None


def _formats(head: bytes, name: str) -> tuple[str, ...]:
    """The one accepted Pillow format `head` starts with; UnsupportedFormat otherwise."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return (fmt,)
    refused = _refused_name(head)
    if refused is not None:
        raise UnsupportedFormat(f"{name}: {refused} images are not accepted (accepted formats: "
                                f"{_ACCEPTED})")
    raise UnsupportedFormat(f"cannot decode {name}: not a recognised image format "
                            f"(accepted: {_ACCEPTED})")


def _open(source: Any, name: str) -> Image.Image:
    formats: tuple[str, ...] = ("image",)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            formats = _formats(bytes(source[:HEAD_BYTES]), name)
            return Image.open(io.BytesIO(source), formats=formats)
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                head = f.read(HEAD_BYTES)
            formats = _formats(head, name)
            return Image.open(source, formats=formats)
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"no such file: {source}") from e
    except UnidentifiedImageError as e:  # the leading bytes matched, the header did not parse
        raise ImageError(f"cannot decode {name}: not a valid {formats[0]} image") from e
    except Exception as e:  # Pillow's plugins raise many types on a malformed header
        raise ImageError(f"cannot decode {name}: {_reason(e)}") from e
    raise ImageError(f"cannot read an image from {type(source).__name__}")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def check_size(width: int, height: int, max_pixels: int, name: str) -> None:
    """Refuse an empty image or one over the decoded-pixel cap, from its declared size."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{name} is {width}x{height} = {width * height} pixels, over the "
                         f"limit of {max_pixels} decoded pixels per image")


def _draft(img: Image.Image, spec: InputSpec) -> None:
    # JPEG can decode at 1/2, 1/4 or 1/8 scale in the DCT; Pillow picks the smallest scale
    # that still covers the requested size, so the resize that follows sees at least as many
    # pixels as it needs. Other formats ignore draft. The colour mode is left to the decoder
    # (no mode given): a colour JPEG drafted straight to "L" keeps its raw luma, which is not
    # the documented RGB -> L conversion.
    if img.format != "JPEG":
        return
    img.draft(None, resized_size(*img.size, spec))


def decode(source: Any, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
           spec: InputSpec | None = None) -> Image.Image:
    """Open a path, raw bytes, a PIL image or a uint8 array (HW or HWC) as a PIL image.

    The size is checked against `max_pixels` from the header, before any pixel is decoded;
    with `spec`, a JPEG is decoded at the smallest DCT scale that still covers the model's
    resize. Every failure is an ImageError naming the image (`name`, else the path).
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise ImageError(f"array images must be uint8, got {source.dtype}")
        if source.ndim == 3 and source.shape[2] == 1:
            source = source[:, :, 0]
        if source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (3, 4)):
            raise ImageError("an array image must be HW, or HWC with 1, 3 or 4 channels; got "
                             f"shape {source.shape}")
        check_size(source.shape[1], source.shape[0], max_pixels, name or "array image")
        return Image.fromarray(source)
    label = _name(source, name)
    return _pixels(open_image(source, label, max_pixels), label, spec)


def open_image(source: Any, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open encoded bytes or a path and check the declared size; no pixel is decoded yet."""
    img = _open(source, name)
    try:
        check_size(*img.size, max_pixels, name)
    except Exception as e:  # a forged header can hold sizes that are not even integers
        img.close()
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"cannot decode {name}: {_reason(e)}") from e
    return img


def load_opened(img: Image.Image, spec: InputSpec, name: str,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Finish an `open_image`: decode its pixels and bring them to the model input."""
    return to_model_input(_pixels(img, name, spec), spec, name, max_pixels)


def _pixels(img: Image.Image, name: str, spec: InputSpec | None) -> Image.Image:
    try:
        if spec is not None:
            _draft(img, spec)
        img.load()
        return img
    except Exception as e:  # truncated data, bad chunks, IFD rationals, ...: all this image's
        raise ImageError(f"cannot decode {name}: {_reason(e)}") from e


def _to_8bit(img: Image.Image, name: str) -> Image.Image:
    """16-bit images keep their high byte (Pillow's "I;16" → "L" conversion clips instead:
    a typical 16-bit frame came out 99% white)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        return Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L")
    if mode == "I":  # 32-bit integers: 16-bit PNGs open so; wider ranges have no 8-bit reading
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(f"{name}: 32-bit integer pixels outside 0..65535 have no 8-bit "
                             "reading; convert the image to 8 bits first")
        return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), "L")
    if mode == "F":
        raise ImageError(f"{name}: floating-point pixels have no defined 8-bit range; "
                         "convert the image to 8 bits first")
    return img


def to_model_input(img: Image.Image, spec: InputSpec, name: str = "image",
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Colour-convert, resize and centre-crop a PIL image to a uint8 (C, H, W) array."""
    try:
        return _to_model_input(img, spec, name, max_pixels)
    except ImageError:
        raise
    except Exception as e:  # e.g. "conversion from LAB to RGB not supported"
        raise ImageError(f"cannot convert {name}: {_reason(e)}") from e


def resized_size(w: int, h: int, spec: InputSpec) -> tuple[int, int]:
    """The size a w x h image is resampled to before the centre crop: shorter side to
    `spec.short_side` (round half to even), never below the model input on either side."""
    scale = spec.short_side / min(w, h)
    return max(spec.width, round(w * scale)), max(spec.height, round(h * scale))


def _to_model_input(img: Image.Image, spec: InputSpec, name: str,
                    max_pixels: int) -> np.ndarray:
    check_size(*img.size, max_pixels, name)
    img = _to_8bit(img, name)
    if img.mode != spec.color_mode:
        img = img.convert(spec.color_mode)
    w, h = img.size
    nw, nh = resized_size(w, h, spec)
    # A 1 x 16M strip is within the pixel cap but would resize to 32 x 512M.
    if nw * nh > max_pixels:
        raise ImageError(f"{name}: {w}x{h} resizes to {nw}x{nh}, over the limit of "
                         f"{max_pixels} pixels (aspect ratio too extreme)")
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[spec.interpolation])
        w, h = nw, nh
    if (w, h) != (spec.width, spec.height):
        left, top = (w - spec.width) // 2, (h - spec.height) // 2
        img = img.crop((left, top, left + spec.width, top + spec.height))
    # From the raw bytes: cheaper than the array interface for the small images served.
    arr = np.frombuffer(img.tobytes(), np.uint8)
    if spec.channels == 1:
        return arr.reshape(1, spec.height, spec.width)
    return np.ascontiguousarray(arr.reshape(spec.height, spec.width, 3).transpose(2, 0, 1))


def load(source: Any, spec: InputSpec, name: str | None = None,
         max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """decode + to_model_input: any supported source to a uint8 (C, H, W) array."""
    label = name or ("array image" if isinstance(source, np.ndarray) else _name(source))
    img = decode(source, name=label, max_pixels=max_pixels, spec=spec)
    return to_model_input(img, spec, label, max_pixels)
