"""The Open Inference Protocol (KServe v2) over REST, beside `/v1/score` in `oecl serve`.

```
GET  /v2/health/live | /v2/health/ready | /v2
GET  /v2/models/{name}[/versions/1] | /v2/models/{name}[/versions/1]/ready
POST /v2/models/{name}[/versions/1]/infer
```

One model, version "1", inputs `images` (UINT8 [N, C, H, W], the Triton repository's input,
named as the artifact's input) or `image_bytes` (BYTES [N, 1] or [N], encoded images decoded
and resized per `oecl.json` by the same code as `/v1/score`), outputs `norm` (FP32 [N, 1]) and
`is_anomaly` (BOOL [N, 1], `norm` below the request's `threshold` parameter, else the
server's). The [N, 1] shapes are Triton's: a batching model there cannot declare a tensor of
the batch dimension alone, so the repository of `oecl triton-repo` answers [N, 1], and so does
this server, for one client code against both. A request's images go to the server's batcher
like `/v1/score`'s, under the same body, image, pixel, queue and time limits, and are counted
in the same /metrics; errors answer `{"error": "..."}` with the status `/v1/score` gives for
the same fault (400 for a tensor that breaks the protocol, 404 for an unknown model or
version).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..batcher import TooManyImages
from ..names import BYTES_INPUT
from ..preprocess import ImageError, load_opened, open_image
from ..scorer import ScoreError, check_threshold, non_finite
from .common import HTTPError, inline_body, inline_decode
from .v2_codec import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    Tensor,
    as_array,
    as_bytes_list,
    encode_response,
    parse_infer,
)

if TYPE_CHECKING:
    from .app import ScoringApp

VERSION = "1"
OUTPUTS = {"norm": "FP32", "is_anomaly": "BOOL"}
_Reply = tuple[int, bytes, dict[str, str]]


def _json(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> _Reply:
    return status, json.dumps(payload).encode(), {"content-type": "application/json",
                                                  **(headers or {})}


def model_metadata(name: str, input_name: str, chw: tuple[int, int, int]) -> dict[str, Any]:
    return {"name": name, "versions": [VERSION], "platform": "oecl_runtime",
            "inputs": [{"name": input_name, "datatype": "UINT8", "shape": [-1, *chw]},
                       {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1, 1]}],
            "outputs": [{"name": n, "datatype": d, "shape": [-1, 1]}
                        for n, d in OUTPUTS.items()]}


class V2Rest:
    """ASGI handler of every `/v2` path of a `ScoringApp` (which owns batcher and metrics)."""

    def __init__(self, app: ScoringApp, model_name: str) -> None:
        self.app, self.name = app, model_name
        self.input = app.scorer.artifact.input_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        label, (status, body, headers) = await self._route(scope, receive)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode())]
                    + [(k.encode(), v.encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": body})
        self.app.metrics.request(label, status)
        if status == 200 and label.endswith("/infer"):
            self.app.metrics.latency.observe(time.perf_counter() - t0)

    async def _route(self, scope: Scope, receive: Receive) -> tuple[str, _Reply]:
        parts = scope["path"].rstrip("/").split("/")[2:]
        method = scope["method"]
        if parts in (["health", "live"], ["health", "ready"], []):
            label = "/".join(["/v2", *parts])
            if method != "GET":
                return label, _json(405, {"error": "method not allowed; use GET"},
                                    {"allow": "GET"})
            if not parts:
                return label, _json(200, {"name": "oecl", "version": __version__,
                                          "extensions": ["binary_tensor_data", "parameters"]})
            return label, self._ready() if parts[1] == "ready" else _json(200, {"live": True})
        if len(parts) < 2 or parts[0] != "models":
            return "other", _json(404, {"error": f"no route {scope['path']}; see /v2/models/"
                                                 f"{self.name}"})
        name, rest = parts[1], parts[2:]
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        else:
            version = None
        label = "/v2/models/{name}" + "".join(f"/{p}" for p in rest)
        if rest not in ([], ["ready"], ["infer"]):
            return "other", _json(404, {"error": f"no route {scope['path']}"})
        if name != self.name:
            return label, _json(404, {"error": f"unknown model {name!r}; this server serves "
                                               f"{self.name!r}"})
        if version not in (None, VERSION):
            return label, _json(404, {"error": f"unknown version {version!r} of model "
                                               f"{name!r}; it has version {VERSION}"})
        want = "POST" if rest == ["infer"] else "GET"
        if method != want:
            return label, _json(405, {"error": f"method not allowed; use {want}"},
                                {"allow": want})
        if rest == ["infer"]:
            return label, await self._infer(scope, receive)
        if rest == ["ready"]:
            return label, self._ready()
        return label, _json(200, model_metadata(self.name, self.input, self.app.chw))

    def _ready(self) -> _Reply:
        ok = self.app.batcher.alive
        return _json(200 if ok else 503, {"ready": ok})

    # ---- POST .../infer

    async def _infer(self, scope: Scope, receive: Receive) -> _Reply:
        try:
            headers = dict(scope["headers"])
            encoding = headers.get(b"content-encoding", b"identity").decode("latin-1")
            if encoding.strip().lower() != "identity":
                raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; send the "
                                    "request uncompressed")
            body = await self.app._read_body(receive, headers.get(b"content-length"))
            req = parse_infer(body, headers.get(HEADER_LENGTH.encode()))
            outputs, threshold = await self.run(req, receive)
        except Exception as e:
            status, payload, extra = self.failure(e)
            return _json(status, payload, extra)
        body, extra = encode_response(self.name, VERSION, req.id, outputs,
                                      {"threshold": threshold})
        return 200, body, extra

    def failure(self, e: Exception) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        """(HTTP status, body, headers) of a failed request, counted as /v1/score counts it."""
        if isinstance(e, ProtocolError):
            e = HTTPError(400, str(e), "bad_request")
        return self.app._failure(e)

    async def run(self, req: InferRequest, receive: Receive
                  ) -> tuple[list[tuple[str, str, np.ndarray, bool]], float]:
        """Score a parsed request through the server's batcher (any transport): its outputs
        as (name, datatype, array, binary?) and the threshold used. `receive` is watched for
        the client going away while its images wait."""
        threshold = _threshold(req.parameters, self.app.scorer.threshold)
        wanted = _outputs(req)
        if len(req.inputs) != 1:
            raise ProtocolError(f"send one input, {self.input} or image_bytes; got "
                                f"{len(req.inputs)}")
        batch = await self._batch(req.inputs[0], receive)
        norms = (await self.app._infer(batch, receive)).astype(np.float32).reshape(-1, 1)
        bad = ~np.isfinite(norms[:, 0])
        if bad.any():  # never a decision ("not below the threshold") on a NaN
            i = int(np.argmax(bad))
            raise ScoreError(f"image {i}: {non_finite(float(norms[i, 0]))}")
        arrays = {"norm": norms, "is_anomaly": norms < threshold}
        return [(n, OUTPUTS[n], arrays[n], binary) for n, binary in wanted], threshold

    async def _batch(self, t: Tensor, receive: Receive) -> np.ndarray:
        app = self.app
        n = t.shape[0] if t.shape else 0
        if t.name not in (self.input, BYTES_INPUT):
            raise ProtocolError(f"unknown input {t.name!r}; this model takes {self.input} "
                                f"(UINT8 [N, {', '.join(map(str, app.chw))}]) or image_bytes "
                                "(BYTES [N, 1])")
        if n > app.cfg.max_queue:
            raise TooManyImages(f"input {t.name!r} has {n} images, the server queues at most "
                                f"{app.cfg.max_queue}")
        if t.name == self.input:
            batch = as_array(t, "UINT8", (None, *app.chw))
        else:
            batch = await self._decode(as_bytes_list(t), receive)
        if not len(batch):
            raise ProtocolError(f"input {t.name!r} holds no images")
        return batch

    async def _decode(self, blobs: list[bytes], receive: Receive) -> np.ndarray:
        """Encoded images to a model batch, as `/v1/score` decodes its files; the first
        unreadable one is the request's error, named by its index."""
        app = self.app
        cap, names = app.cfg.max_image_pixels, [f"image_bytes[{i}]" for i in range(len(blobs))]
        if len(blobs) == 1 and inline_body(blobs[0]):  # the same rule as /v1/score
            img = open_image(blobs[0], names[0], cap)
            if inline_decode(img) and img.width * img.height <= app.cfg.max_request_pixels:
                return load_opened(img, app.spec, names[0], cap)[None]
        # Headers, the request's pixel total and the decode, all off the event loop.
        batch, errors = await app._off_loop(receive, app._open_and_load,
                                            list(zip(names, blobs, strict=True)))
        for err in errors:
            if err is not None:
                raise ImageError(err)
        return batch


def _threshold(params: dict[str, Any], default: float) -> float:
    t = params.get("threshold", default)
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ProtocolError(f"parameter threshold must be a finite number >= 0, got {t!r}")
    try:
        return check_threshold(t)
    except ValueError as e:
        raise ProtocolError(f"parameter {e}") from None


def _outputs(req: Any) -> list[tuple[str, bool]]:
    default = req.parameters.get("binary_data_output") is True
    if req.outputs is None:
        return [(n, default) for n in OUTPUTS]
    for name, _ in req.outputs:
        if name not in OUTPUTS:
            raise ProtocolError(f"unknown output {name!r}; this model has norm and is_anomaly")
    return [(n, default if b is None else b) for n, b in req.outputs]
