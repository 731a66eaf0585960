"""Torch-free serving of OECL models: pre-processing, backends, scoring, HTTP server, benchmark.

The public names below load on first use, so `import oecl_runtime` (and a CLI's `--help`) costs
nothing; onnxruntime, TensorRT and torch load only when a backend that needs them is opened.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "SCHEMA_VERSION": "artifact", "Artifact": "artifact", "ArtifactError": "artifact",
    "Backend": "backends", "BackendUnavailable": "backends",
    "ImageError": "preprocess", "InputSpec": "preprocess",
    "FileResult": "scorer", "Scorer": "scorer", "ScoreResult": "scorer",
}

__all__ = [
    "SCHEMA_VERSION", "Artifact", "ArtifactError", "Backend", "BackendUnavailable", "FileResult",
    "ImageError", "InputSpec", "Scorer", "ScoreResult", "__version__",
]

if TYPE_CHECKING:
    from .artifact import SCHEMA_VERSION, Artifact, ArtifactError
    from .backends import Backend, BackendUnavailable
    from .preprocess import ImageError, InputSpec
    from .scorer import FileResult, Scorer, ScoreResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
