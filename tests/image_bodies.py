"""Request bodies the serving tests send: encoded images, `.npy` arrays, and one small image
of each format the server refuses."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

NPY = {"content-type": "application/x-npy"}
# The formats the server decodes, as its refusals list them.
ACCEPTED = "PNG, JPEG, BMP, GIF"


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def encoded(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid grayscale PNG of zeros, compressed row by row (never held whole)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    z, row, idat = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        idat.append(z.compress(row))
    idat.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat))
            + chunk(b"IEND", b""))


def ico_holding(png: bytes) -> bytes:
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def refused_bodies() -> dict[str, bytes]:
    """One small image of each refused format, as Pillow writes it (where it can)."""
    img = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    out = {"ICO": ico_holding(encoded(img, "PNG"))}
    for fmt, name in (("EPS", "EPS"), ("TIFF", "TIFF"), ("JPEG2000", "JPEG 2000"),
                      ("WEBP", "WebP"), ("AVIF", "AVIF"), ("QOI", "QOI"), ("IM", "IM"),
                      ("PPM", "Netpbm"), ("DDS", "DDS"), ("SGI", "SGI")):
        try:
            out[name] = encoded(img, fmt)
        except (KeyError, OSError):  # a Pillow built without that codec
            continue
    return out

