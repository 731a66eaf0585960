"""TensorRT engines built from an artifact's ONNX files, on the GPU that will run them.

A plan is valid only for the TensorRT version and GPU it was built with, so the edge box builds
its own (`oecl engine`), from the artifact alone: no training run, no torch. `oecl export
--format tensorrt` calls the same `build_engines`, so there is one way to build an engine.

Written against the TensorRT 10 Python API, with TensorRT 11 handled:
- fp16: on TensorRT 10 a weakly typed network of the fp32 ONNX with `BuilderFlag.FP16`; on
  TensorRT >= 11 (no precision flags any more) a strongly typed network of the fp16 ONNX.
- int8: explicit quantisation from the artifact's symmetric QDQ file (`consumers: tensorrt`;
  TensorRT's ONNX parser needs zero points of 0), on TensorRT 10 with `INT8 | FP16` so the
  layers left unquantised may run in half precision.
- fp32: TF32 off, so the engine computes what its label says.
- one optimisation profile: batch 1 .. max_batch, tuned for max_batch.
- a timing cache per TensorRT version and GPU model under ~/.cache/oecl/tensorrt; a cache
  TensorRT rejects is replaced, and the log says which happened.

Every new plan is scored on the artifact's golden set through the runtime's TensorRT backend
before it is recorded in `oecl.json`; one outside the exporter's tolerances is deleted.
`tensorrt` and cuda-python are imported only when an engine is asked for.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from . import golden
from .artifact import Artifact, file_entry, update_files
from .atomic import write_bytes
from .backends.base import BackendUnavailable, nvidia_gpu_present
from .backends.trt import _Cuda
from .errors import one_line
from .names import ENGINE_PRECISIONS

PLAN_FILES = {"fp32": "model.fp32.plan", "fp16": "model.plan", "int8": "model.int8.plan"}
DEFAULT_WORKSPACE_MB = 4096

Log = Callable[[str], None]


class EngineError(ValueError):
    """An engine that cannot be built or recorded here; the message is one line."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0" = Hopper, "8.7" = Jetson Orin


class Builder(Protocol):
    """What `build_engines` needs from a builder (TensorRTBuilder; tests pass their own)."""

    strongly_typed: bool

    def build(self, onnx_path: Path, plan_path: Path, *, precision: str, input_name: str,
              chw: tuple[int, int, int], max_batch: int) -> dict[str, Any]: ...


def _quiet(log: Log | None) -> Log:
    return log or (lambda msg: None)


# ---------------------------------------------------------------- what is needed here


def import_tensorrt() -> Any:
    """The tensorrt module, or EngineError naming why not. A broken install (missing libnvinfer,
    wrong CUDA) raises OSError or RuntimeError rather than ImportError; all say the same."""
    try:
        import tensorrt as trt  # optional (the gpu extra), and only an engine build needs it
    except ImportError:
        raise EngineError("building an engine needs the tensorrt Python package, which is not "
                          "installed (pip install 'oecl[gpu]'; on a Jetson it comes with JetPack)"
                          ) from None
    except Exception as e:
        raise EngineError(f"tensorrt is installed but does not import: {one_line(e)}") from None
    return trt


def needs_fp16_onnx() -> bool:
    """TensorRT >= 11 builds fp16 only from an fp16 graph (strong typing, no FP16 flag)."""
    return not hasattr(import_tensorrt().BuilderFlag, "FP16")


def preflight() -> None:
    """Fail fast, before any work, with one line naming what is missing: tensorrt, cuda-python,
    an NVIDIA GPU, or a working driver."""
    import_tensorrt()
    if not nvidia_gpu_present():
        raise EngineError("building an engine needs an NVIDIA GPU and none is visible")
    gpu_info()


def gpu_info(device_id: int = 0) -> GpuInfo:
    """Name and compute capability of the GPU, from the CUDA runtime (cuda-python, no torch)."""
    try:
        cuda = _Cuda()
        props = cuda(cuda.rt.cudaGetDeviceProperties(device_id))
    except BackendUnavailable as e:
        raise EngineError(str(e)) from None
    except Exception as e:  # no driver, or a driver older than the CUDA runtime
        raise EngineError(f"cannot query GPU {device_id}: {one_line(e)}") from None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return GpuInfo(str(name).rstrip("\x00").strip(), f"{props.major}.{props.minor}")


# ---------------------------------------------------------------- timing cache


def timing_cache_path(trt_version: str, gpu: GpuInfo) -> Path:
    """Timing entries hold for one TensorRT version on one GPU model: the same SM differs in
    clocks, memory and SM count between models (an H100's cache is rejected on an H200)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "oecl" / "tensorrt"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-") or "gpu"
    sm = gpu.compute_capability.replace(".", "")
    return root / f"timing-trt{trt_version}-{slug}-sm{sm}.cache"


def attach_timing_cache(config: Any, path: Path, log: Log) -> Any:
    """Give `config` the timing cache stored at `path`, or a new one if there is none or
    TensorRT refuses it (`set_timing_cache` returns False on a version or device mismatch).
    Returns the cache object that the build fills."""
    data = path.read_bytes() if path.is_file() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
            accepted = cache is not None and bool(config.set_timing_cache(cache, False))
        except Exception:  # a truncated or foreign file
            accepted = False
        if accepted:
            log(f"tensorrt: timing cache {path} reused")
            return cache
        log(f"tensorrt: timing cache {path} rejected by TensorRT; timing from scratch")
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, False):
        raise EngineError("TensorRT refused a new, empty timing cache")
    if not data:
        log(f"tensorrt: new timing cache {path}")
    return cache


# ---------------------------------------------------------------- the builder


class TensorRTBuilder:
    """Builds one plan from one ONNX file with the TensorRT Python API on GPU `device_id`."""

    def __init__(self, workspace_mb: int = DEFAULT_WORKSPACE_MB, device_id: int = 0,
                 log: Log | None = None) -> None:
        if workspace_mb < 1:
            raise EngineError(f"--workspace-mb must be positive, got {workspace_mb}")
        preflight()
        self._trt = import_tensorrt()
        self.version = str(self._trt.__version__)
        self.gpu = gpu_info(device_id)
        self.workspace_bytes = int(workspace_mb) << 20
        self.log = _quiet(log)
        # TensorRT 11 removed the precision flags: the ONNX types decide where fp16 runs.
        self.strongly_typed = needs_fp16_onnx()

    def build(self, onnx_path: Path, plan_path: Path, *, precision: str, input_name: str,
              chw: tuple[int, int, int], max_batch: int) -> dict[str, Any]:
        """Write the plan to `plan_path`; return the `files[]` keys a plan needs."""
        trt = self._trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if self.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {onnx_path.name}: {one_line(errors)}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if not self.strongly_typed and precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if not self.strongly_typed and precision == "int8":
            # Explicit quantisation: the Q/DQ scales come from the graph, no calibrator is set.
            config.set_flag(trt.BuilderFlag.INT8)
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            # TF32 is on by default and rounds fp32 products to 10 mantissa bits.
            config.clear_flag(trt.BuilderFlag.TF32)

        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, (1, *chw), (max_batch, *chw), (max_batch, *chw))
        config.add_optimization_profile(profile)

        cache_path = timing_cache_path(self.version, self.gpu)
        attach_timing_cache(config, cache_path, self.log)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT could not build a {precision} engine from "
                              f"{onnx_path.name} (see the TensorRT messages above)")
        write_bytes(plan_path, bytes(memoryview(plan)))
        # The config's cache, which the build has added its timings to.
        write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        return {"tensorrt_version": self.version, "gpu_name": self.gpu.name,
                "compute_capability": self.gpu.compute_capability,
                "strongly_typed": self.strongly_typed}


def source_entry(artifact: Artifact, precision: str, strongly_typed: bool) -> dict[str, Any]:
    """The ONNX file of the artifact an engine of `precision` is built from."""
    if precision == "int8":
        entry = artifact.find("onnx", "int8", consumer="tensorrt")
        if entry is None:
            withheld = artifact.meta.get("verification", {}).get("withheld", {})
            why = next((f"export withheld it ({p}: {w})" for p, w in withheld.items()
                        if p.endswith(".onnx")), "export with --format onnx-int8")
            raise EngineError("an int8 engine is built from the symmetric int8 ONNX file "
                              f"(consumers: tensorrt), which this artifact lacks: {why}")
        return entry
    want = "fp16" if precision == "fp16" and strongly_typed else "fp32"
    entry = artifact.find("onnx", want, consumer="tensorrt")
    if entry is None:
        raise EngineError(f"TensorRT builds {precision} engines here from the {want} ONNX file, "
                          f"which this artifact lacks (export with --format onnx-{want})"
                          if want != "fp32" else "the artifact has no fp32 ONNX file")
    return entry


# ---------------------------------------------------------------- into the artifact


def _check_engine(artifact: Artifact, entry: dict[str, Any]) -> dict[str, Any]:
    return golden.verify(artifact, backend="tensorrt", precision=entry["precision"])


def build_engines(
    directory: str | os.PathLike,
    precisions: Sequence[str] = ("fp16",),
    max_batch: int | None = None,
    *,
    builder: Builder | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    verify: bool = True,
    check: Callable[[Artifact, dict[str, Any]], dict[str, Any]] = _check_engine,
    log: Log | None = None,
) -> dict[str, Any]:
    """Build, verify on the golden set, and record one plan per precision; returns the new
    metadata. Raises EngineError (one line) and leaves the artifact as it was on any failure.

    `check(artifact_view, entry)` scores the unrecorded plan (default: the golden set through
    the TensorRT backend) and returns a golden report with `pass`.
    """
    log = _quiet(log)
    directory = Path(directory)
    unknown = [p for p in precisions if p not in ENGINE_PRECISIONS]
    if unknown or not precisions:
        raise EngineError(f"engine precision must be one of {', '.join(ENGINE_PRECISIONS)}, "
                          f"got {', '.join(unknown) or 'none'}")
    art = Artifact.open(directory)
    limit = art.max_batch
    max_batch = limit if max_batch is None else max_batch
    if not 1 <= max_batch <= limit:
        raise EngineError(f"--max-batch must be between 1 and the artifact's max_batch {limit}, "
                          f"got {max_batch}")
    if verify and "golden" not in art.meta:
        raise EngineError("the artifact has no golden set to verify the engine on; re-export "
                          "it, or pass --no-verify")
    builder = builder or TensorRTBuilder(workspace_mb, log=log)
    spec = art.spec
    chw = (spec.channels, spec.height, spec.width)
    meta = art.meta
    for precision in dict.fromkeys(precisions):
        src = source_entry(art, precision, builder.strongly_typed)
        name = PLAN_FILES[precision]
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            log(f"engine: building {name} ({precision}, batch 1..{max_batch}) from {src['path']}")
            extra = builder.build(art.path_of(src), tmp, precision=precision,
                                  input_name=art.input_name, chw=chw, max_batch=max_batch)
            entry = file_entry(tmp, "tensorrt", precision, **extra, source=src["path"],
                               max_batch=max_batch,
                               built=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            if verify:
                view = _with_plan(art, entry)
                report = check(view, view.require("tensorrt", precision))
                if not report["pass"]:
                    raise EngineError(f"{name} fails on the golden set: {report['problems'][0]}; "
                                      "not recorded")
                entry["golden"] = {k: report[k] for k in (
                    "max_rel_diff", "mean_rel_diff", "mean_diff_of_id_norm", "AUROC",
                    "AUROC_diff")}
                log(f"engine: {name} on the golden set: max rel diff "
                    f"{report['max_rel_diff']:.2e}, AUROC {report['AUROC']:.4f} (pass)")
            entry["path"] = name
            # Unlist first, then swap the file, then list it: a crash between any two steps
            # leaves an artifact whose every listed hash still matches.
            update_files(directory, remove=[name])
            os.replace(tmp, directory / name)
            meta = update_files(directory, add=[entry])
            log(f"engine: recorded {name} ({extra['gpu_name']}, compute capability "
                f"{extra['compute_capability']}, TensorRT {extra['tensorrt_version']})")
        finally:
            tmp.unlink(missing_ok=True)
        art = Artifact(directory, meta)
    return meta


def _with_plan(art: Artifact, entry: dict[str, Any]) -> Artifact:
    """The artifact as it would be with `entry` (still under its temporary name) recorded."""
    files = [f for f in art.meta["files"]
             if not (f["format"] == "tensorrt" and f["precision"] == entry["precision"])]
    return Artifact(art.directory, {**art.meta, "files": [*files, entry]})


