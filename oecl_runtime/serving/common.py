"""What every protocol of `oecl serve` shares: the HTTP-status error and the rule for what is
decoded on the event loop."""

from __future__ import annotations

import struct
from typing import Any

# Images up to this many pixels, in bodies up to this many bytes, are decoded on the event
# loop: a 32x32 PNG decodes in tens of microseconds, less than handing it to a thread and back.
# The byte bound also bounds the header parsing `open` does (chunks, markers) on the loop.
# Everything else goes to the thread pool.
INLINE_PIXELS = 128 * 128
INLINE_BYTES = 64 * 1024
# PNG chunks that Pillow inflates besides the pixels (text, ICC profile): up to 1 MB each, so a
# small body holding them is not a small constant's work.
_INFLATED_PNG_CHUNKS = frozenset((b"zTXt", b"iTXt", b"iCCP"))
_PNG_CHUNKS_WALKED = 32
_PNG_CHUNK_HEAD = struct.Struct(">I4s")


class HTTPError(Exception):
    """A request's failure as an HTTP status, its reason and the /metrics error kind."""

    def __init__(self, status: int, reason: str, kind: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind, self.headers = status, reason, kind, headers or {}


def _plain_png(data: bytes) -> bool:
    """Whether a PNG body holds no chunk that Pillow inflates besides the pixels, from a walk
    over at most `_PNG_CHUNKS_WALKED` chunk headers (a typical body has three to ten; more,
    and the body is not called plain). A substring search of the body cost several times more."""
    pos, end = 8, len(data) - 8
    for _ in range(_PNG_CHUNKS_WALKED):
        if pos > end:
            return True  # truncated: the decode fails at once
        length, kind = _PNG_CHUNK_HEAD.unpack_from(data, pos)
        if kind in _INFLATED_PNG_CHUNKS:
            return False
        if kind == b"IEND":
            return True
        pos += 12 + length
    return False


def inline_body(data: bytes) -> bool:
    """Whether opening `data` (reading its header) on the event loop is a small constant's
    work; then `inline_decode` says whether the rest is."""
    return len(data) <= INLINE_BYTES and (not data.startswith(b"\x89PNG") or _plain_png(data))


def inline_decode(img: Any) -> bool:
    """Whether finishing the decode of `img` (opened from an `inline_body`) is a small
    constant's work."""
    if img.width * img.height > INLINE_PIXELS:
        return False
    if img.format == "JPEG":
        return "progression" not in img.info  # each progressive scan passes over every pixel
    return True
