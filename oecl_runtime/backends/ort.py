"""onnxruntime backend: CPU, or the CUDA / TensorRT execution providers of onnxruntime-gpu."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import Artifact, ArtifactError
from ..errors import one_line
from .base import Backend, BackendUnavailable, gpu_models
from .outputs import norms_of, probe

_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def available_devices() -> list[str]:
    """The execution providers this onnxruntime build offers, as our device names."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [dev for dev, provider in _PROVIDERS.items() if provider in have]


def cuda_provider_problem() -> str | None:
    """Why onnxruntime offers no CUDA provider here, or None when it does."""
    import onnxruntime as ort

    if "cuda" in available_devices():
        return None
    from importlib import metadata

    have = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            have.add(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(have) == 2:
        # Both wheels write the same `onnxruntime` package; whichever came last wins.
        return ("onnxruntime and onnxruntime-gpu are both installed and share one module, so "
                "the CUDA provider may be missing: pip uninstall -y onnxruntime onnxruntime-gpu "
                "&& pip install onnxruntime-gpu")
    return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install "
            "onnxruntime-gpu in place of onnxruntime)")


def session_options(device: str = "cpu", threads: int | None = None,
                    spinning: bool = False) -> Any:
    """The `onnxruntime.SessionOptions` this backend opens its sessions with.

    `spinning`: whether the intra-op pool's idle threads busy-wait for the next run. Off by
    default: a server alternates short runs with event-loop work, and spinning threads take the
    cores that work needs (on a 2-core Xeon it cost `oecl serve` 40% more CPU per request for a
    K = 1 model and 15% for K = 8, and made in-process scoring slower whenever other processes
    shared the cores; benchmarks/RESULTS.md, "onnxruntime's spinning pool").
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # No "session.set_denormal_as_zero": onnxruntime applies it to the thread that opens the
    # first session too, which changes floating point for the whole process (the caller's
    # float("1e-320") became 0.0), and it measured no faster here.
    return opts


class OnnxRuntimeBackend(Backend):
    """One onnxruntime InferenceSession over the artifact's ONNX file of the chosen precision.

    device "cpu" runs the CPU provider. "cuda" and "tensorrt" need onnxruntime-gpu and a GPU;
    they use IO binding so that only the uint8 input goes to the device and only the norm
    output comes back (the embedding, if the graph has one, stays on the device).
    """

    def __init__(
        self,
        artifact: Artifact,
        precision: str | None = None,
        device: str = "cpu",
        device_id: int = 0,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if device not in _PROVIDERS:
            raise ValueError(f"unknown onnxruntime device {device!r} (use cpu, cuda or tensorrt)")
        if device not in available_devices():
            problem = cuda_provider_problem() if device == "cuda" else None
            raise BackendUnavailable(problem or (
                f"onnxruntime {ort.__version__} has no {_PROVIDERS[device]} "
                "(install onnxruntime-gpu in place of onnxruntime for cuda/tensorrt)"))
        # TensorRT's parser takes only symmetric int8: that execution provider gets its own file.
        entry = artifact.require("onnx", precision,
                                 consumer="tensorrt" if device == "tensorrt" else "onnxruntime")
        path = artifact.path_of(entry)
        self.name = f"onnxruntime-{device}"
        self.precision = entry["precision"]
        self.max_batch = artifact.max_batch
        self.device = device
        self._device_id = device_id
        self._input = artifact.input_name

        providers = self._providers(artifact, entry, device, device_id)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options(
                device, threads), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types per failure
            reason = one_line(e)
            raise ArtifactError(f"{entry['path']}: onnxruntime cannot load it: {reason}") from e
        # onnxruntime silently falls back to the CPU when a GPU provider fails to initialise.
        active = self.session.get_providers()[0]
        if active != _PROVIDERS[device]:
            raise BackendUnavailable(
                f"{_PROVIDERS[device]} did not initialise (the session runs on {active})"
            )
        self._check_signature(artifact, entry["path"])
        self._source = entry["path"]
        spec = artifact.spec
        probe(self, (spec.channels, spec.height, spec.width))

    @staticmethod
    def _providers(artifact: Artifact, entry: dict[str, Any], device: str,
                   device_id: int) -> list[Any]:
        if device == "cpu":
            return ["CPUExecutionProvider"]
        # TF32 (the CUDA provider's default) would round fp32 products to 10 mantissa bits.
        cuda = ("CUDAExecutionProvider", {"device_id": device_id,
                                          "use_tf32": int(entry["precision"] != "fp32")})
        if device == "cuda":
            return [cuda, "CPUExecutionProvider"]
        spec = artifact.spec
        chw = f"{spec.channels}x{spec.height}x{spec.width}"
        name = artifact.input_name
        trt_opts = {
            "device_id": device_id,
            "trt_fp16_enable": entry["precision"] == "fp16",
            "trt_int8_enable": entry["precision"] == "int8",
            # Building an engine takes minutes; cache it per model file so restarts are quick.
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(_engine_cache_dir(entry["sha256"], device_id)),
            "trt_profile_min_shapes": f"{name}:1x{chw}",
            "trt_profile_opt_shapes": f"{name}:{artifact.max_batch}x{chw}",
            "trt_profile_max_shapes": f"{name}:{artifact.max_batch}x{chw}",
        }
        return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]

    def _check_signature(self, artifact: Artifact, fname: str) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != self._input:
            names = [i.name for i in inputs]
            raise ArtifactError(f"{fname}: graph inputs {names}, oecl.json says [{self._input!r}]")
        if inputs[0].type != "tensor(uint8)":
            raise ArtifactError(f"{fname}: input {self._input!r} is {inputs[0].type}, not uint8")
        spec = artifact.spec
        shape = inputs[0].shape
        want = [spec.channels, spec.height, spec.width]
        fixed = [(d, w) for d, w in zip(shape[1:], want, strict=False) if isinstance(d, int)]
        if len(shape) != 4 or any(d != w for d, w in fixed):
            raise ArtifactError(f"{fname}: input shape {shape} does not match NCHW [N, {want}]")
        outs = [o.name for o in self.session.get_outputs()]
        if "norm" not in outs:
            raise ArtifactError(f"{fname}: graph outputs {outs} lack 'norm'")

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.device == "cpu":
            norms = self.session.run(["norm"], {self._input: batch})[0]
            return norms_of(norms, len(batch), self._source)
        io = self.session.io_binding()
        io.bind_cpu_input(self._input, np.ascontiguousarray(batch))
        io.bind_output("norm", "cuda", self._device_id)
        self.session.run_with_iobinding(io)
        return norms_of(io.copy_outputs_to_cpu()[0], len(batch), self._source)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def _engine_cache_dir(sha256: str, device_id: int = 0) -> Path:
    """Engines the TensorRT provider caches hold for one model, onnxruntime build, TensorRT
    version and GPU model: a change of any of them gets a directory of its own."""
    import onnxruntime as ort

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "oecl" / "ort-trt"
    gpus = gpu_models()
    gpu = gpus[device_id] if device_id < len(gpus) else (gpus[0] if gpus else "unknown-gpu")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    key = f"ort{ort.__version__}-trt{tensorrt_version()}-{slug}"
    path = root / sha256[:16] / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def tensorrt_version() -> str:
    """The TensorRT library onnxruntime's provider will load: from the tensorrt package's
    metadata, else from libnvinfer itself, else "unknown"."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import ctypes

    for soname in ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so.8"):
        try:
            # getInferLibVersion(): major*10000 + minor*100 + patch (TensorRT >= 10)
            return f"lib{int(ctypes.CDLL(soname).getInferLibVersion())}"
        except (OSError, AttributeError):
            continue
    return "unknown"


