"""TensorRT engines (`model.plan`, `model.int8.plan`) built from the exported ONNX files.

Written against the TensorRT 10 Python API, with the TensorRT 11 changes handled:
- fp16 engine: on TensorRT 10, a weakly typed network of the fp32 ONNX with `BuilderFlag.FP16`;
  on TensorRT >= 11 (which removed the precision flags) a strongly typed network of the fp16
  ONNX, whose casts already say where half precision runs.
- int8 engine: explicit quantization from the QDQ ONNX (symmetric int8 Q/DQ pairs, as TensorRT
  requires); on TensorRT 10 with `INT8 | FP16` so the layers left unquantized may run in fp16.
- one optimisation profile: batch 1 .. `max_batch`, tuned for `max_batch`.
- a timing cache per TensorRT version and GPU architecture under ~/.cache/oecl/tensorrt, read
  before and written after every build, so a rebuild of the same layers skips their timing.

`tensorrt` is imported only here, and only when an engine is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oecl_runtime.atomic import write_bytes
from oecl_runtime.backends.base import nvidia_gpu_present


class TensorRTUnavailable(ValueError):
    """TensorRT cannot build here; the message names the missing piece."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0" = Hopper


def preflight(verify: bool) -> None:
    """Fail fast, before any export work, when an engine cannot be built (or checked) here."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise TensorRTUnavailable(
            "--format tensorrt needs the tensorrt Python package, which is not installed "
            "(pip install tensorrt)"
        ) from None
    if not nvidia_gpu_present():
        raise TensorRTUnavailable("--format tensorrt needs an NVIDIA GPU and none is visible")
    gpu_info()  # a GPU node without a working driver/runtime fails here, not mid-export
    if verify:
        # The engine is verified through the runtime's own TensorRT backend, which needs it.
        from oecl_runtime.backends.base import BackendUnavailable
        from oecl_runtime.backends.trt import _import_cudart

        try:
            _import_cudart()
        except BackendUnavailable as e:
            raise TensorRTUnavailable(
                f"verifying a TensorRT engine needs cuda-python: {e} (or pass --no-verify)"
            ) from None


def gpu_info(device_id: int = 0) -> GpuInfo:
    """Name and compute capability of the GPU an engine is built for."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device_id)
            return GpuInfo(torch.cuda.get_device_name(device_id), f"{major}.{minor}")
    except ImportError:
        pass
    # A CPU-only torch next to a GPU: ask the CUDA runtime directly.
    from oecl_runtime.backends.base import BackendUnavailable
    from oecl_runtime.backends.trt import _Cuda

    try:
        cuda = _Cuda()
        props = cuda(cuda.rt.cudaGetDeviceProperties(device_id))
    except (BackendUnavailable, RuntimeError) as e:
        raise TensorRTUnavailable(f"cannot query the GPU for TensorRT: {e}") from None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return GpuInfo(str(name).rstrip("\x00"), f"{props.major}.{props.minor}")


def timing_cache_path(trt_version: str, gpu: GpuInfo) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "oecl" / "tensorrt"
    # Timing entries are only valid for one TensorRT version on one GPU architecture.
    return root / f"timing-{trt_version}-sm{gpu.compute_capability.replace('.', '')}.cache"


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    precision: str,
    input_name: str,
    chw: tuple[int, int, int],
    max_batch: int,
    workspace_gib: float = 4.0,
    log: Any = None,
) -> dict[str, str]:
    """Build one engine from `onnx_path` into `plan_path`; returns the file-entry extras.

    `precision` is "fp16" (from the fp32 ONNX on TensorRT 10, the fp16 ONNX on >= 11) or "int8"
    (from the QDQ ONNX). The caller picks the ONNX file; see `source_for`.
    """
    import tensorrt as trt

    gpu = gpu_info()
    strongly_typed = not hasattr(trt.BuilderFlag, "FP16")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            # Explicit quantization: the Q/DQ scales come from the graph, no calibrator is set.
            config.set_flag(trt.BuilderFlag.INT8)

    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, *chw), (max_batch, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)

    cache_path = timing_cache_path(trt.__version__, gpu)
    cached = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cached)
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(
            f"TensorRT could not build a {precision} engine from {onnx_path.name} "
            "(see the TensorRT messages above)"
        )
    write_bytes(plan_path, bytes(memoryview(plan)))
    write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    if log is not None:
        log(f"tensorrt: timing cache {cache_path} ({'reused' if cached else 'new'})")
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "strongly_typed": strongly_typed,
    }


def source_for(precision: str, onnx_files: dict[str, Path]) -> Path:
    """Which exported ONNX file an engine of `precision` is built from on this TensorRT."""
    import tensorrt as trt

    if precision == "int8":
        return onnx_files["int8-tensorrt"]
    if hasattr(trt.BuilderFlag, "FP16"):
        return onnx_files["fp32"]
    return onnx_files["fp16"]


def needs_fp16_onnx() -> bool:
    """TensorRT >= 11 builds fp16 only from an fp16 graph (strong typing)."""
    import tensorrt as trt

    return not hasattr(trt.BuilderFlag, "FP16")
