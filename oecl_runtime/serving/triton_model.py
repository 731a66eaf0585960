"""The Triton Python-backend models `oecl triton-repo` writes, running `oecl_runtime` inside
Triton Inference Server.

- `TritonPythonModel` (`--backend python`): the whole scorer. Each request carries either the
  artifact's uint8 input (`images`, [N, C, H, W]) or `image_bytes` (BYTES [N, 1], encoded
  images decoded and resized per `oecl.json`); Triton's dynamic batcher hands several requests
  to `execute` at once and their images run as one batch. Outputs: `norm` (FP32) and
  `is_anomaly` (BOOL, `norm` below the request's `threshold` parameter, else the artifact's).
- `TritonPreprocessModel` (the first step of the `--backend native` ensemble): the same
  inputs, answered with the model-ready uint8 batch (`pixels`) that the ensemble feeds to the
  ONNX or TensorRT model.

The repository's `model.py` only imports one of these, so the code Triton runs is the installed
`oecl_runtime`'s: one definition of decoding and scoring, shared with `oecl serve`. A request
whose input is bad gets its own error; the others in the batch are answered.
`triton_python_backend_utils` exists only inside Triton's Python backend, so it is imported
when Triton creates a model, not with this module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..inputs import to_batch
from ..names import BYTES_INPUT
from ..preprocess import ImageError, InputSpec
from ..scorer import Scorer
from ..triton_repo import ARTIFACT_DIR, PIXELS

Parsed = list[tuple[np.ndarray, float] | str]  # per request: (images, threshold) or its error


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


class _Inputs:
    """Reads a request's `images` or `image_bytes` as a model-ready uint8 batch."""

    def _setup(self, input_name: str, spec: InputSpec, default_threshold: float) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb, self.input, self.spec = pb_utils, input_name, spec
        self.chw = (spec.channels, spec.height, spec.width)
        self.default_threshold = default_threshold

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
        return to_batch(blobs, self.spec)

    def _parse(self, requests: list[Any]) -> Parsed:
        parsed: Parsed = []
        for request in requests:
            try:
                threshold = request_threshold(request, self.default_threshold)
                parsed.append((self._images(request), threshold))
            except ImageError as e:
                parsed.append(str(e))
        return parsed

    def _error(self, message: str) -> Any:
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))


class TritonPythonModel(_Inputs):
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        directory = Path(args["model_repository"]) / args["model_version"] / ARTIFACT_DIR
        threads = int(_parameter(config, "oecl_threads", "0")) or None
        self.scorer = Scorer.open(directory, backend=_parameter(config, "oecl_backend", "auto"),
                                  precision=_parameter(config, "oecl_precision", "") or None,
                                  threads=threads)
        art = self.scorer.artifact
        self._setup(art.input_name, art.spec, art.threshold)

    def execute(self, requests: list[Any]) -> list[Any]:
        parsed = self._parse(requests)
        ready = [p[0] for p in parsed if not isinstance(p, str)]
        norms = iter(np.split(self.scorer.score_array(np.concatenate(ready)),
                              np.cumsum([len(b) for b in ready])[:-1]) if ready else [])
        responses = []
        for p in parsed:
            if isinstance(p, str):
                responses.append(self._error(p))
                continue
            norm = next(norms).astype(np.float32)
            responses.append(self.pb.InferenceResponse(output_tensors=[
                self.pb.Tensor("norm", norm), self.pb.Tensor("is_anomaly", norm < p[1])]))
        return responses

    def finalize(self) -> None:
        self.scorer.close()


class TritonPreprocessModel(_Inputs):
    def initialize(self, args: dict[str, Any]) -> None:
        path = Path(args["model_repository"]) / args["model_version"] / "oecl.json"
        meta = json.loads(path.read_text(encoding="utf-8"))
        self._setup(str(meta["input"]["name"]), InputSpec.from_json(meta["input"]),
                    float(meta["score"]["threshold"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._error(p) if isinstance(p, str) else
                self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(PIXELS, p[0])])
                for p in self._parse(requests)]
