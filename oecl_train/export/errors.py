"""The exporter's errors: both carry a one-line message naming the cause."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be made; the message is one line naming the cause."""


class VerificationFailed(ExportError):
    """An exported file scores outside the tolerances; nothing was written."""
