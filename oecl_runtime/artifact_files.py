"""The integrity of an artifact's files: hashes and sizes for `files[]`, the external data an
ONNX graph loads, and paths that stay inside the artifact directory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from .artifact_schema import ArtifactError, _check_file_entry, _r, _short
from .errors import one_line
from .names import DATA_PRECISIONS, FILE_FORMATS, PRECISIONS


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | os.PathLike, fmt: str, precision: str, **extra: Any) -> dict[str, Any]:
    """The `files[]` entry for one model file; the file must already sit in the artifact dir.

    `extra` carries format-specific keys (a TensorRT plan needs `tensorrt_version`, `gpu_name`
    and `compute_capability`).
    """
    path = Path(path)
    if fmt not in FILE_FORMATS:
        raise ArtifactError(f"unknown file format {fmt!r} for {path.name} (known: {FILE_FORMATS})")
    if precision not in (DATA_PRECISIONS if fmt == "npy" else PRECISIONS):
        raise ArtifactError(
            f"unknown precision {precision!r} for {path.name} (known: {PRECISIONS})"
        )
    entry = {
        "path": path.name,
        "format": fmt,
        "precision": precision,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }
    if fmt == "onnx":
        # Weights stored beside the graph are loaded with it: they are hashed like the graph.
        refs = onnx_external_data(path)
        if refs:
            entry["external_data"] = [
                {"path": ref, "sha256": sha256_file(path.parent / ref),
                 "bytes": (path.parent / ref).stat().st_size} for ref in refs]
    entry.update(extra)
    _check_file_entry(entry, 0)
    return entry


def onnx_external_data(path: str | os.PathLike) -> list[str]:
    """The external-data files (relative locations) an ONNX graph loads its tensors from.

    Every tensor anywhere in the model counts: initializers and sparse initializers of the
    graph and of every subgraph, tensors and sparse tensors held in node attributes, function
    bodies and their attribute defaults, training graphs. The walk is generic over the protobuf
    messages, so a place ONNX adds later is not missed either.
    """
    import onnx  # deferred: only an ONNX file's check pays for it, not every artifact read

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, a recursion limit, a truncated file
        raise ArtifactError(f"{Path(path).name}: not a readable ONNX graph: "
                            f"{one_line(e)}") from e
    found: list[str] = []
    for t in _tensors(model, onnx.TensorProto):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if loc not in found:
                found.append(loc)
    return found


def _tensors(message: Any, kind: type) -> Iterable[Any]:
    """Every message of type `kind` reachable from `message` (itself included)."""
    from google.protobuf.message import Message  # deferred with onnx, which brings it

    stack = [message]
    while stack:
        m = stack.pop()
        if isinstance(m, kind):
            yield m
        for desc, value in m.ListFields():
            if desc.message_type is None:
                continue
            # A single message field, or a repeated one (a container of messages).
            if isinstance(value, Message):
                stack.append(value)
            else:
                stack.extend(v for v in value if isinstance(v, Message))


def _inside(directory: Path, relative: str) -> Path:
    """`directory / relative` with symlinks resolved; refused (naming only the listed path,
    nothing about the target) when it leads outside the resolved `directory`."""
    try:
        path = (directory / relative).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name the system cannot hold
        raise ArtifactError(f"{_short(relative)} cannot be resolved: {one_line(e)}") from e
    if path != directory and directory not in path.parents:
        raise ArtifactError(f"{relative} resolves outside the artifact directory (a symlink?); "
                            "refusing to read it")
    return path


def _beside(graph: str, ref: str) -> str:
    """An external-data location, relative to the artifact directory (it is relative to the
    graph that names it)."""
    return str(PurePosixPath(graph).parent / ref)


def _check_relative_ref(ref: str, graph: str) -> None:
    pp = PurePosixPath(ref)
    if not ref or pp.is_absolute() or ".." in pp.parts or "\\" in ref:
        raise ArtifactError(f"{graph} loads external data from {_r(ref)}, outside the artifact "
                            "directory; refusing to load it")
