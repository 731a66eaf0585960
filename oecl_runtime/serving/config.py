"""`oecl serve`'s configuration, with one default for each setting.

`BatchPolicy` is how requests' images become batches, handed whole to the batcher (and the
queue delay of `oecl triton-repo`'s dynamic batching is its delay); `ServerConfig` is what the
app enforces, batch policy included; `ProcessConfig` is where the server listens and what it
logs, the same for one process or several. A field that is also an `oecl serve` option carries
its help text, flag and click type in its metadata (`option`), and the option's default is the
field's (`commands.common.field_options`). Imports click and `names` alone, so that
`oecl serve --help` loads no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from ..names import DEFAULT_MAX_PIXELS, TRITON_MODEL_NAME, valid_model_name

LOOPBACK = "127.0.0.1"
LOG_LEVELS = ("debug", "info", "warning", "error")
# A request's decoded pixels, all its images together, may be this many largest images'.
REQUEST_PIXELS_IN_IMAGES = 4


def check_model_name(name: str) -> str:
    """`name`, if Triton takes it as a directory and a URL path segment; else ValueError."""
    if not valid_model_name(name):
        raise ValueError(f"{name!r}: use letters, digits, '-', '_' or '.' (not first)")
    return name


def option(default: Any, help: str | None = None, *, flag: str | None = None,
           type: click.ParamType | None = None, show_default: bool = True,
           unset: bool = False, check: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field that is also an `oecl serve` option: `--field-name` unless `flag`
    names it otherwise. `unset`: the option's default is None, which leaves the field's
    default (the help text shows it); `check`: raises ValueError for a value it refuses."""
    return field(default=default, metadata={"option": {
        "help": help, "flag": flag, "type": type, "show_default": show_default,
        "unset": unset, "check": check}})


@dataclass(frozen=True)
class BatchPolicy:
    """The dynamic batching of requests' images (`batcher.DynamicBatcher`): a batch closes at
    `max_batch` images or when its oldest has waited `max_delay_ms`; at most `max_queue`
    images wait, across requests."""

    max_batch: int | None = option(
        None, "Largest inference batch; default: the backend's maximum.",
        type=click.IntRange(min=1), show_default=False)
    max_delay_ms: float = option(5.0, "Longest an image waits for its batch to fill.",
                                 type=click.FloatRange(min=0))
    max_queue: int = option(256, "Images waiting for inference before requests get 503.",
                            type=click.IntRange(min=1))

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0

    @property
    def max_delay_us(self) -> int:
        return round(self.max_delay_ms * 1000)


# The default per-image cap as `--help` writes it: a square's side.
_SIDE = math.isqrt(DEFAULT_MAX_PIXELS)


@dataclass(frozen=True)
class ServerConfig:
    """What the app enforces: its batch policy, the size and time limits of a request, the
    open connections, and the names and ports of the Open Inference Protocol."""

    batch: BatchPolicy = field(default_factory=BatchPolicy)
    max_body_mb: float = option(16.0, "Largest request body; larger ones get 413.",
                                type=click.FloatRange(min=0, min_open=True))
    retry_after_s: int = 1
    max_image_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        f"Decoded pixels allowed per image, checked from its header  [default: {_SIDE}x{_SIDE}]"
        "; larger images get 400.", type=click.IntRange(min=1), unset=True)
    # Decoded pixels per request, all images.
    max_request_pixels: int = REQUEST_PIXELS_IN_IMAGES * DEFAULT_MAX_PIXELS
    decode_threads: int = 2  # images decoded off the event loop at once, across requests
    header_timeout_s: float = option(
        10.0, "Seconds a client has to send its request headers (0: no limit); 408 after.",
        flag="--header-timeout", type=click.FloatRange(min=0))
    body_timeout_s: float = option(  # the whole body, counted from the end of the headers
        30.0, "Seconds a client has to send its request body (0: no limit); 408 after.",
        flag="--body-timeout", type=click.FloatRange(min=0))
    max_connections: int = option(
        1024, "Open connections per worker, idle ones included; a new one over it closes the "
              "one idle longest (lowered to fit the open-file limit).",
        type=click.IntRange(min=1))
    model_name: str = option(
        TRITON_MODEL_NAME, "The model's name under /v2/models/ (as `oecl triton-repo --name`).",
        check=check_model_name)
    grpc_port: int = option(
        0, "Also serve the Open Inference Protocol over gRPC on this port (0: off; needs the "
           "grpc extra).", type=click.IntRange(0, 65535))
    grpc_host: str = LOOPBACK
    # Seconds in-flight requests (HTTP and gRPC) get to finish once a stop is asked for.
    graceful_timeout_s: int = 30

    @property
    def max_queue(self) -> int:
        """The batch policy's: what every protocol counts a request's images against."""
        return self.batch.max_queue

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_requests(self) -> int:
        """Score requests past their body at once (decoding, queued or running); beyond it a
        request gets 503. Counts requests, not sockets."""
        return max(64, 2 * self.max_queue)

    @property
    def max_buffered_bytes(self) -> int:
        """Bytes of request bodies still arriving, across requests, before a 503: bounds the
        memory slow uploads hold (each also holds a connection until the body timeout)."""
        return max(64, 2 * self.max_queue) * self.max_body_bytes // 8

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServerConfig:
        """The config `dataclasses.asdict` made `values` of (e.g. sent to worker processes)."""
        return cls(**{**values, "batch": BatchPolicy(**values["batch"])})


@dataclass(frozen=True)
class ProcessConfig:
    """Where the server listens and what it logs, for one process or `--workers`."""

    host: str = option(LOOPBACK, "Interface to bind; 0.0.0.0 exposes the server to the "
                                 "network.")
    port: int = option(8000, type=click.IntRange(0, 65535))
    log_level: str = option("info", type=click.Choice(LOG_LEVELS))
    access_log: bool = option(False, "Log every request (off: /metrics counts them).")
