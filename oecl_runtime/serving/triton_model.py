"""The Triton Python-backend model of `oecl triton-repo --backend python`: the whole
`oecl_runtime` scorer inside Triton Inference Server.

The repository's `model.py` only imports `TritonPythonModel` from here, so the model Triton runs
is this module of the installed `oecl_runtime` (one definition of decoding and scoring, shared
with `oecl serve`). Each request carries either the artifact's uint8 input (`images`,
[N, C, H, W]) or `image_bytes` (BYTES [N], encoded images decoded and resized per `oecl.json`);
Triton's dynamic batcher hands several requests to `execute` at once, and their images run as
one batch. Outputs: `norm` (FP32 [N]) and `is_anomaly` (BOOL [N], `norm` below the request's
`threshold` parameter, else the artifact's). A request whose input is bad gets its own error;
the others in the batch are answered.

`triton_python_backend_utils` exists only inside Triton's Python backend, so it is imported
when Triton creates the model, not when this module is imported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..inputs import to_batch
from ..names import BYTES_INPUT
from ..preprocess import ImageError
from ..scorer import Scorer
from ..triton_repo import ARTIFACT_DIR


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value is None else value


def request_threshold(request: Any, default: float) -> float:
    """The request's `threshold` parameter (JSON of the request's parameters), else `default`."""
    params = getattr(request, "parameters", None)
    raw = json.loads(params()) if params is not None else {}
    t = raw.get("threshold", default)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ImageError(f"parameter threshold must be a finite number, got {t!r}")
    return float(t)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        directory = Path(args["model_repository"]) / args["model_version"] / ARTIFACT_DIR
        threads = int(_parameter(config, "oecl_threads", "0")) or None
        self.scorer = Scorer.open(directory, backend=_parameter(config, "oecl_backend", "auto"),
                                  precision=_parameter(config, "oecl_precision", "") or None,
                                  threads=threads)
        self.input = self.scorer.artifact.input_name
        self.chw = (self.scorer.spec.channels, self.scorer.spec.height, self.scorer.spec.width)

    def _images(self, request: Any) -> np.ndarray:
        tensor = self.pb.get_input_tensor_by_name(request, self.input)
        if tensor is not None:
            arr = tensor.as_numpy()
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != self.chw:
                raise ImageError(f"input {self.input!r} must be uint8 [N, "
                                 f"{', '.join(map(str, self.chw))}], got {arr.dtype} "
                                 f"{list(arr.shape)}")
            return arr
        tensor = self.pb.get_input_tensor_by_name(request, BYTES_INPUT)
        if tensor is None:
            raise ImageError(f"send {self.input} (UINT8) or {BYTES_INPUT} (BYTES)")
        blobs = [bytes(b) for b in tensor.as_numpy().reshape(-1)]
        return to_batch(blobs, self.scorer.spec)

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        # Per request: (images, threshold) or the error that answers it.
        parsed: list[tuple[np.ndarray, float] | str] = []
        for request in requests:
            try:
                threshold = request_threshold(request, self.scorer.threshold)
                parsed.append((self._images(request), threshold))
            except ImageError as e:
                parsed.append(str(e))
        ready = [p[0] for p in parsed if not isinstance(p, str)]
        norms = iter(np.split(self.scorer.score_array(np.concatenate(ready)),
                              np.cumsum([len(b) for b in ready])[:-1]) if ready else [])
        responses = []
        for p in parsed:
            if isinstance(p, str):
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(p)))
                continue
            norm = next(norms).astype(np.float32)
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor("norm", norm), pb.Tensor("is_anomaly", norm < p[1])]))
        return responses

    def finalize(self) -> None:
        self.scorer.close()
