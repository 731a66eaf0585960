"""The exporter's errors: both carry a one-line message naming the cause."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be made; the message is one line naming the cause."""


class VerificationFailed(ExportError):
    """An exported file scores outside the tolerances; nothing was written.

    `precisions` names the precisions of every failing file, so a caller can export again
    without them (e.g. fp32 alone when only the int8 files drift)."""

    def __init__(self, message: str, precisions: tuple[str, ...] = ()):
        super().__init__(message)
        self.precisions = precisions
