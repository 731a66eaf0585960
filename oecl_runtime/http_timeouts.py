"""Per-connection limits for uvicorn's HTTP protocols: a header read timeout (answered 408)
and a cap on open connections that closes the oldest idle one first.

uvicorn calls the app only once a request's headers are complete, and has no deadline for them:
a client sending its headers at 2 bytes/s holds a connection (and a slot of
`limit_concurrency`) for ever. These protocol classes start a timer when a connection opens
and when the first byte of each later request arrives, and stop it when the headers are in;
if it fires first, the client gets a 408 and the connection is closed. The body's deadline is
the app's (it reads the body).

The header timeout travels on the uvicorn `Config` as `header_timeout_s` (and the Retry-After
of a refused connection as `retry_after_s`), so worker processes started by uvicorn's
supervisor get them with the rest of the configuration; a `Config` without them gets
`ServerConfig`'s defaults. Each 408 is told to the app being served, if it has an
`on_header_timeout()` (to count it): the app, unlike the protocol class, is one per server, so
two servers in one process count apart.

Open connections are capped separately from requests (`max_connections` on the `Config`):
uvicorn's own `limit_concurrency` counts sockets, so a few hundred clients that connect and
send nothing made every request, `/healthz` included, a 503. Here a connection over the cap
closes the connection that has been idle longest (waiting for its first request, for the
headers of the next, or kept alive after a response); only when every connection has a
request in progress is the newcomer turned away (503, closed). Requests in flight are bounded
by the app (see `serving.app.ScoringApp`), which counts requests, not sockets.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .serving.config import ServerConfig

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: uvicorn runs h11
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

_DEFAULTS = ServerConfig()


def timeout_response(reason: str) -> bytes:
    body = json.dumps({"error": reason}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
            + body)


def busy_response(retry_after_s: int) -> bytes:
    body = json.dumps({"error": "server has no free connection: every one has a request in "
                                "progress; retry later"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nretry-after: "
            + str(retry_after_s).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class _HeaderDeadline:
    """Mixed in before a uvicorn protocol class (httptools or h11)."""

    _header_timer: asyncio.TimerHandle | None = None
    # When the connection last had no request in progress; time.monotonic, not the loop's
    # clock, which uvloop keeps in milliseconds (connections accepted together would tie).
    _idle_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._idle_since = time.monotonic()
        self._arm()
        cap = getattr(self.config, "max_connections", None)  # type: ignore[attr-defined]
        if cap and len(self.connections) > cap:  # type: ignore[attr-defined]
            self._make_room()

    def on_response_complete(self) -> None:
        self._idle_since = time.monotonic()
        super().on_response_complete()  # type: ignore[misc]

    def _idle(self) -> bool:
        cycle = self.cycle  # type: ignore[attr-defined]
        return ((cycle is None or cycle.response_complete)
                and not getattr(self, "pipeline", None)  # httptools queues pipelined requests
                and not self.transport.is_closing())  # type: ignore[attr-defined]

    def _make_room(self) -> None:
        """Over the cap: close the connection idle longest, or, when none is idle, this one.
        A scan of the open connections, paid only by a connection that arrives at the cap."""
        oldest = None
        for conn in self.connections:  # type: ignore[attr-defined]
            if conn is not self and isinstance(conn, _HeaderDeadline) and conn._idle() and (
                    oldest is None or conn._idle_since < oldest._idle_since):
                oldest = conn
        if oldest is not None:
            oldest._disarm()
            oldest.transport.close()  # type: ignore[attr-defined]
            hook = _app_hook(self.app, "on_connection_shed")  # type: ignore[attr-defined]
        else:
            self._disarm()
            retry = getattr(self.config, "retry_after_s", _DEFAULTS.retry_after_s)  # type: ignore[attr-defined]
            self.transport.write(busy_response(retry))  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]
            hook = _app_hook(self.app, "on_connection_refused")  # type: ignore[attr-defined]
        if hook is not None:
            hook()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        if self._header_timer is None and (cycle is None or cycle.response_complete):
            self._arm()  # first bytes of a new request on a kept-alive connection
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # type: ignore[attr-defined]
            self._disarm()  # the parser has a complete head: the app has the request now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        timeout = getattr(self.config, "header_timeout_s", _DEFAULTS.header_timeout_s)  # type: ignore[attr-defined]
        if timeout:
            self._header_timer = self.loop.call_later(timeout, self._expire)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        transport = self.transport  # type: ignore[attr-defined]
        cycle = self.cycle  # type: ignore[attr-defined]
        if transport.is_closing() or (cycle is not None and not cycle.response_complete):
            return
        timeout = getattr(self.config, "header_timeout_s", _DEFAULTS.header_timeout_s)  # type: ignore[attr-defined]
        transport.write(timeout_response(f"request headers not received within {timeout:g} s"))
        transport.close()
        hook = _app_hook(self.app, "on_header_timeout")  # type: ignore[attr-defined]
        if hook is not None:
            hook()


def _app_hook(app: Any, name: str) -> Any:
    """The served app's method `name` (e.g. `on_header_timeout`), found under uvicorn's
    middleware (each wrapper keeps the app it wraps as `.app`)."""
    while app is not None:
        hook = getattr(app, name, None)
        if hook is not None:
            return hook
        app = getattr(app, "app", None)
    return None


class H11TimeoutProtocol(_HeaderDeadline, H11Protocol):
    """uvicorn's pure-Python HTTP/1.1 protocol with the header timeout."""


if HttpToolsProtocol is not None:

    class HttpToolsTimeoutProtocol(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools (C parser) protocol with the header timeout."""


def protocol_name() -> str:
    """The import string of the header-timeout protocol over what uvicorn's "auto" would pick;
    a string, so that uvicorn's worker processes can import it."""
    name = "HttpToolsTimeoutProtocol" if HttpToolsProtocol is not None else "H11TimeoutProtocol"
    return f"{__name__}:{name}"
