"""The one pre-processing path shared by training-time evaluation, export verification and serving.

An image becomes a uint8 CHW array in the colour mode and size an artifact declares:
decode → colour mode → resize the shorter side to `resize` → centre crop to (height, width).
Mean/std normalisation is not done here: it lives inside the exported graph.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

_RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


class ImageError(ValueError):
    """An input that cannot be turned into a model input; the message names the problem."""


@dataclass(frozen=True)
class InputSpec:
    height: int
    width: int
    channels: int = 3  # 1 = "L" (grayscale), 3 = "RGB"
    resize: int | None = None  # shorter side to this, then centre crop; None: crop only
    interpolation: str = "bilinear"

    @property
    def color_mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

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


def decode(source: Any) -> Image.Image:
    """Open a path, raw bytes, a PIL image or a uint8 array (HW or HWC) as a PIL image."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise ImageError(f"array images must be uint8, got {source.dtype}")
        if source.ndim == 3 and source.shape[2] == 1:
            source = source[:, :, 0]
        if source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (3, 4)):
            raise ImageError(f"array image must be HW, HWC with 1/3/4 channels, got {source.shape}")
        return Image.fromarray(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(source)))
        elif isinstance(source, (str, os.PathLike)):
            img = Image.open(source)
        else:
            raise ImageError(f"cannot read an image from {type(source).__name__}")
        img.load()
        return img
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"no such file: {source}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"cannot decode {_name(source)}: not a recognised image format") from e
    except Image.DecompressionBombError as e:
        # A small file that would expand to gigapixels: refuse it before it takes the memory.
        raise ImageError(f"cannot decode {_name(source)}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode {_name(source)}: {e}") from e


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "image bytes"


def to_model_input(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Colour-convert, resize and centre-crop a PIL image to a uint8 (C, H, W) array."""
    img = img.convert(spec.color_mode)
    if spec.resize is not None:
        w, h = img.size
        scale = spec.resize / min(w, h)
        nw, nh = max(spec.width, round(w * scale)), max(spec.height, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _RESAMPLE[spec.interpolation])
    w, h = img.size
    if w < spec.width or h < spec.height:
        raise ImageError(
            f"image {w}x{h} is smaller than the model input {spec.width}x{spec.height} "
            "and no resize rule is set"
        )
    left, top = (w - spec.width) // 2, (h - spec.height) // 2
    img = img.crop((left, top, left + spec.width, top + spec.height))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def load(source: Any, spec: InputSpec) -> np.ndarray:
    """decode + to_model_input: any supported source to a uint8 (C, H, W) array."""
    return to_model_input(decode(source), spec)
