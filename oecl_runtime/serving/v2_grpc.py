"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), for
`oecl serve --grpc-port`: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and
ModelInfer, answered by the same code as the /v2 REST routes (`V2Rest.run`) and so through the
same batcher, limits and /metrics.

The service's message classes and its servicer base are the ones tritonclient[grpc] generates
from Triton's `grpc_service.proto`; with grpcio they make the `grpc` extra. The server runs on
the HTTP server's event loop (grpc.aio), started and stopped with the app's lifespan; a request
that fails gets the gRPC status matching the HTTP status /v2 would answer, with the same text.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .v2_codec import InferRequest, ProtocolError, Tensor
from .v2_rest import VERSION, model_metadata

if TYPE_CHECKING:
    from .v2_rest import V2Rest

# The InferTensorContents field that carries each datatype when not sent raw.
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
             "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
LABEL = "grpc:ModelInfer"


def missing() -> str | None:
    """Why the gRPC endpoint cannot start here, or None."""
    try:
        import grpc  # noqa: F401
        from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: F401
    except ImportError as e:
        return (f"--grpc-port needs grpcio and tritonclient[grpc] (pip install 'oecl[grpc]'): "
                f"{e}")
    return None


def _param(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def to_request(msg: Any) -> InferRequest:
    """A `ModelInferRequest` as the protocol-neutral request of `v2_codec`."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} "
                            "inputs")
    tensors = []
    for i, inp in enumerate(msg.inputs):
        shape = tuple(int(d) for d in inp.shape)
        if any(d < 0 for d in shape):
            raise ProtocolError(f"input {inp.name!r}: shape must be a list of sizes, got "
                                f"{list(shape)}")
        t = Tensor(inp.name, inp.datatype, shape)
        if raw:
            t.raw = memoryview(raw[i])
        else:
            field = _CONTENTS.get(inp.datatype)
            if field is None:
                raise ProtocolError(f"input {inp.name!r}: datatype {inp.datatype!r} is not "
                                    "supported")
            values = list(getattr(inp.contents, field))
            t.data = values if inp.datatype != "BYTES" else [bytes(v) for v in values]
        tensors.append(t)
    outputs = None
    if len(msg.outputs):
        outputs = [(o.name, True) for o in msg.outputs]
    params = {k: _param(v) for k, v in msg.parameters.items()}
    return InferRequest(msg.id or None, tensors, params, outputs)


async def _never() -> dict[str, Any]:
    # gRPC has no ASGI receive: a cancelled call is cancelled by grpc.aio itself.
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


def _code(status: int) -> Any:
    import grpc

    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
            408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
            503: grpc.StatusCode.UNAVAILABLE}.get(status, grpc.StatusCode.INTERNAL)


def servicer(v2: V2Rest) -> Any:
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    app = v2.app

    async def check_model(request: Any, context: Any) -> None:
        if request.name != v2.name:
            await context.abort(_code(404), f"unknown model {request.name!r}; this server "
                                            f"serves {v2.name!r}")
        if request.version not in ("", VERSION):
            await context.abort(_code(404), f"unknown version {request.version!r} of model "
                                            f"{request.name!r}; it has version {VERSION}")

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:
            return pb.ServerReadyResponse(ready=app.batcher.alive)

        async def ModelReady(self, request: Any, context: Any) -> Any:
            await check_model(request, context)
            return pb.ModelReadyResponse(ready=app.batcher.alive)

        async def ServerMetadata(self, request: Any, context: Any) -> Any:
            from .. import __version__

            return pb.ServerMetadataResponse(name="oecl", version=__version__,
                                             extensions=["parameters"])

        async def ModelMetadata(self, request: Any, context: Any) -> Any:
            await check_model(request, context)
            meta = model_metadata(v2.name, v2.input, app.chw)
            T = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[T(**t) for t in meta["inputs"]], outputs=[T(**t) for t in meta["outputs"]])

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            t0 = time.perf_counter()
            status = 200
            try:
                if request.model_name != v2.name or request.model_version not in ("", VERSION):
                    status = 404
                    what = (f"unknown model {request.model_name!r}; this server serves "
                            f"{v2.name!r}" if request.model_name != v2.name else
                            f"unknown version {request.model_version!r}; it has {VERSION}")
                    await context.abort(_code(404), what)
                try:
                    outputs, _ = await v2.run(to_request(request), _never)
                except Exception as e:  # noqa: BLE001 - each is this request's error
                    status, payload, _ = v2.failure(e)
                    await context.abort(_code(status), payload["error"])
                reply = pb.ModelInferResponse(model_name=v2.name, model_version=VERSION,
                                              id=request.id)
                for name, datatype, arr, _ in outputs:
                    reply.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
                    reply.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
                return reply
            finally:
                app.metrics.request(LABEL, status)
                if status == 200:
                    app.metrics.latency.observe(time.perf_counter() - t0)

    return Servicer(), pb_grpc.add_GRPCInferenceServiceServicer_to_server


async def start(v2: V2Rest, host: str, port: int) -> Any:
    """A started grpc.aio server on `host:port` (on the running event loop)."""
    import grpc

    limit = v2.app.cfg.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", max(limit, 4 << 20))])
    impl, add = servicer(v2)
    add(impl, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    return server
