"""`oecl serve`'s configuration: the limits and batching the app enforces (`ServerConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..names import TRITON_MODEL_NAME
from ..preprocess import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ServerConfig:
    max_batch: int | None = None  # None: the backend's maximum
    max_delay_ms: float = 5.0
    max_queue: int = 256  # images waiting for inference, across all requests
    max_body_mb: float = 16.0
    retry_after_s: int = 1
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # decoded pixels per image
    max_request_pixels: int = 4 * DEFAULT_MAX_PIXELS  # decoded pixels per request, all images
    decode_threads: int = 2  # images decoded off the event loop at once, across requests
    header_timeout_s: float = 10.0  # 0: no limit
    body_timeout_s: float = 30.0  # whole body, from the end of the headers; 0: no limit
    model_name: str = TRITON_MODEL_NAME  # the model's name under /v2 (Open Inference Protocol)
    grpc_port: int = 0  # the Open Inference Protocol over gRPC on this port; 0: off
    grpc_host: str = "127.0.0.1"
    # Open connections, idle ones included; over it the one idle longest is closed. Lowered
    # to what the open-file limit leaves room for (`connection_cap`).
    max_connections: int = 1024

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

