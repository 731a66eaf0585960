"""What every protocol of `oecl serve` shares: the HTTP-status error and the decode threshold."""

from __future__ import annotations

# Images up to this many pixels are decoded on the event loop: a 32x32 PNG decodes in tens of
# microseconds, less than handing it to a thread and back. Larger ones go to the thread pool.
INLINE_PIXELS = 128 * 128


class HTTPError(Exception):
    """A request's failure as an HTTP status, its reason and the /metrics error kind."""

    def __init__(self, status: int, reason: str, kind: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind, self.headers = status, reason, kind, headers or {}
