"""Tensors of the Open Inference Protocol's REST form, and Triton's binary tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes: the
`Inference-Header-Content-Length` header says where the JSON ends, and each input that carries
`parameters.binary_data_size` takes that many bytes, in input order. BYTES tensors in binary
form are elements of a 4-byte little-endian length and the bytes. Responses use the same form
for outputs the client asked to receive as binary (`binary_data` on an output, or
`binary_data_output` on the request).

Everything here is checked against the body before any element is read: a shape is counted
with Python integers, a byte length must match the shape, and the binary sections must add up
to the body exactly. Failures are `ProtocolError` (HTTP 400) naming the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "inference-header-content-length"
# Fixed-size datatypes of the protocol and their little-endian numpy forms.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_LEN = struct.Struct("<I")


class ProtocolError(ValueError):
    """A request that does not follow the protocol (HTTP 400)."""


@dataclass
class Tensor:
    """One input: raw bytes (binary extension) or the JSON `data` list, not yet interpreted."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: memoryview | None = None
    data: Any = None

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    # (name, binary: True/False, None when the output does not say) per requested output;
    # None: all outputs.
    outputs: list[tuple[str, bool | None]] | None = None


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ProtocolError(f"input {name!r}: shape must be a list of sizes, got {value!r}")
    return tuple(value)


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be an object")
    return value


def parse_infer(body: bytes, header_length: bytes | str | None) -> InferRequest:
    """The inference request in `body`; `header_length` is the header's value, if sent."""
    if header_length is None:
        split = len(body)
    else:
        text = (header_length.decode("latin-1") if isinstance(header_length, bytes)
                else header_length)
        if not text.strip().isdigit():
            raise ProtocolError(f"Inference-Header-Content-Length must be a number, got {text!r}")
        split = int(text)
        if split > len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {split} is beyond the "
                                f"{len(body)} byte body")
    try:
        head = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"request header is not JSON: {e}") from None
    if not isinstance(head, dict):
        raise ProtocolError("request must be a JSON object")
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("request has no inputs")
    binary = memoryview(body)[split:]
    offset = 0
    tensors = []
    for spec in inputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("each input needs a name")
        name = spec["name"]
        datatype = spec.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"input {name!r} has no datatype")
        t = Tensor(name, datatype, _shape(spec.get("shape"), name))
        size = _dict(spec.get("parameters"), f"input {name!r} parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"input {name!r}: binary_data_size must be a byte count")
            if offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the "
                                    f"{len(binary)} bytes of binary data in the body")
            t.raw = binary[offset:offset + size]
            offset += size
        elif "data" in spec:
            t.data = spec["data"]
        else:
            raise ProtocolError(f"input {name!r} has neither data nor binary_data_size")
        tensors.append(t)
    if offset != len(binary):
        raise ProtocolError(f"the inputs' binary_data_size add up to {offset} bytes, the body "
                            f"carries {len(binary)} after the JSON header")
    params = _dict(head.get("parameters"), "request parameters")
    outputs = None
    if head.get("outputs"):  # absent, null or empty: every output, as Triton answers
        if not isinstance(head["outputs"], list):
            raise ProtocolError("outputs must be a list")
        outputs = []
        for out in head["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise ProtocolError("each requested output needs a name")
            oparams = _dict(out.get("parameters"), f"output {out['name']!r} parameters")
            binary = oparams.get("binary_data")
            outputs.append((out["name"], None if binary is None else binary is True))
    rid = head.get("id")
    return InferRequest(None if rid is None else str(rid), tensors, params, outputs)


def as_array(t: Tensor, datatype: str, dims: tuple[int | None, ...]) -> np.ndarray:
    """`t` as an array of a fixed-size `datatype` whose shape matches `dims` (None: any size).
    Binary data is viewed in place, without a copy."""
    if t.datatype != datatype:
        raise ProtocolError(f"input {t.name!r} must be {datatype}, got {t.datatype}")
    if len(t.shape) != len(dims) or any(
            d is not None and d != s for d, s in zip(dims, t.shape, strict=True)):
        want = ", ".join("-1" if d is None else str(d) for d in dims)
        raise ProtocolError(f"input {t.name!r} must have shape [{want}], got {list(t.shape)}")
    dtype = DTYPES[datatype]
    if t.raw is not None:
        if len(t.raw) != t.count * dtype.itemsize:
            raise ProtocolError(f"input {t.name!r}: {len(t.raw)} bytes of data, shape "
                                f"{list(t.shape)} of {datatype} needs {t.count * dtype.itemsize}")
        return np.frombuffer(t.raw, dtype).reshape(t.shape)
    try:
        arr = np.asarray(t.data)
    except ValueError:
        raise ProtocolError(f"input {t.name!r}: data is not a regular array") from None
    if arr.size != t.count:
        raise ProtocolError(f"input {t.name!r}: {arr.size} elements of data, shape "
                            f"{list(t.shape)} needs {t.count}")
    if dtype.kind in "iu":
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < np.iinfo(dtype).min
                         or arr.max() > np.iinfo(dtype).max):
            raise ProtocolError(f"input {t.name!r}: data must be integers within {datatype}")
    elif arr.size and arr.dtype.kind not in "biuf":
        raise ProtocolError(f"input {t.name!r}: data must be numbers")
    return arr.astype(dtype).reshape(t.shape)


def as_bytes_list(t: Tensor) -> list[bytes]:
    """The elements of a BYTES tensor of shape [N, 1] (Triton's form of one element per batch
    item) or [N]: strings in JSON, length-prefixed in binary."""
    if t.datatype != "BYTES":
        raise ProtocolError(f"input {t.name!r} must be BYTES, got {t.datatype}")
    if len(t.shape) not in (1, 2) or t.shape[1:] not in ((), (1,)):
        raise ProtocolError(f"input {t.name!r} must have shape [-1, 1] or [-1], got "
                            f"{list(t.shape)}")
    n = t.shape[0]
    if t.raw is None:
        data = t.data
        if isinstance(data, list) and len(t.shape) == 2 and all(
                isinstance(row, list) and len(row) == 1 for row in data):
            data = [row[0] for row in data]
        if not isinstance(data, list) or len(data) != n or not all(
                isinstance(s, (str, bytes)) for s in data):
            raise ProtocolError(f"input {t.name!r}: data must be a list of {n} strings")
        return [s.encode("utf-8") if isinstance(s, str) else s for s in data]
    raw, out, pos = t.raw, [], 0
    for i in range(n):
        if pos + 4 > len(raw):
            raise ProtocolError(f"input {t.name!r}: element {i} runs past the tensor's data")
        (size,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise ProtocolError(f"input {t.name!r}: element {i} runs past the tensor's data")
        out.append(bytes(raw[pos:pos + size]))
        pos += size
    if pos != len(raw):
        raise ProtocolError(f"input {t.name!r}: {len(raw) - pos} bytes left after its {n} "
                            "elements")
    return out


def encode_response(model: str, version: str, rid: str | None,
                    outputs: list[tuple[str, str, np.ndarray, bool]],
                    parameters: dict[str, Any] | None = None
                    ) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) of an inference response; `outputs` are (name, datatype, array,
    binary?)."""
    head: dict[str, Any] = {"model_name": model, "model_version": version}
    if rid is not None:
        head["id"] = rid
    if parameters:
        head["parameters"] = parameters
    tensors, chunks = [], []
    for name, datatype, arr, binary in outputs:
        desc: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr, DTYPES[datatype]).tobytes()
            desc["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            desc["data"] = arr.ravel().tolist()
        tensors.append(desc)
    head["outputs"] = tensors
    header = json.dumps(head).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream",
                                         HEADER_LENGTH: str(len(header))}
