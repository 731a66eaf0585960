"""Torch-free serving of OECL models: pre-processing, backends, scoring, HTTP server, benchmark.

Importing this package loads numpy and Pillow only; onnxruntime, TensorRT and torch are
imported when a backend that needs them is opened.
"""

from .artifact import SCHEMA_VERSION, Artifact, ArtifactError
from .backends import Backend, BackendUnavailable
from .preprocess import ImageError, InputSpec
from .scorer import Scorer, ScoreResult

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION", "Artifact", "ArtifactError", "Backend", "BackendUnavailable",
    "ImageError", "InputSpec", "Scorer", "ScoreResult", "__version__",
]
