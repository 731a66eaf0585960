"""One Open Inference Protocol client, run unchanged against Triton and `oecl serve`.

Everything goes through tritonclient (HTTP or gRPC, the module is the only difference): uint8
tensors as the Triton repository takes them, encoded images as `image_bytes`, JSON and binary
tensors over HTTP, and the request parameter `threshold`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def client_module(protocol: str) -> Any:
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def connect(protocol: str, url: str) -> Any:
    return client_module(protocol).InferenceServerClient(url)


def infer(client: Any, protocol: str, model: str, name: str, data: np.ndarray,
          outputs: tuple[str, ...] = ("norm", "is_anomaly"), binary: bool = True,
          threshold: float | None = None) -> dict[str, np.ndarray]:
    """One request of `data` as input `name` (UINT8 images or an object array of encoded
    images for BYTES); the requested outputs as arrays."""
    m = client_module(protocol)
    datatype = "BYTES" if data.dtype == object else "UINT8"
    inp = m.InferInput(name, list(data.shape), datatype)
    if protocol == "http":
        inp.set_data_from_numpy(data, binary_data=binary)
        wanted = [m.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    else:
        inp.set_data_from_numpy(data)
        wanted = [m.InferRequestedOutput(o) for o in outputs]
    params = None if threshold is None else {"threshold": threshold}
    result = client.infer(model, [inp], outputs=wanted, parameters=params)
    return {o: result.as_numpy(o) for o in outputs}


def encoded(blobs: list[bytes]) -> np.ndarray:
    """Encoded images as the BYTES tensor `image_bytes` [N, 1] (Triton's batch form)."""
    arr = np.empty((len(blobs), 1), dtype=object)
    arr[:, 0] = blobs
    return arr


def check_server(protocol: str, url: str, model: str) -> dict[str, Any]:
    """Health and metadata through the client: what both servers must say alike."""
    c = connect(protocol, url)
    meta = c.get_model_metadata(model)
    if protocol == "grpc":
        names = [i.name for i in meta.inputs]
        outs = [o.name for o in meta.outputs]
    else:
        names = [i["name"] for i in meta["inputs"]]
        outs = [o["name"] for o in meta["outputs"]]
    return {"live": c.is_server_live(), "ready": c.is_server_ready(),
            "model_ready": c.is_model_ready(model), "inputs": sorted(names),
            "outputs": sorted(outs)}
