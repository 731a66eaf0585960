"""Backends behind one interface, and the `auto` choice among them.

Each backend module imports its heavy library only when opened, so importing this package
costs nothing and a box without torch or TensorRT never touches them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

from ..artifact import Artifact, ArtifactError
from ..names import BACKEND_CHOICES
from .base import Backend, BackendUnavailable, nvidia_gpu_present

__all__ = ["Backend", "BackendUnavailable", "BACKEND_CHOICES", "open_backend"]

log = logging.getLogger("oecl_runtime")



# A factory opens one backend: (artifact, precision, CPU intra-op threads or None) -> Backend.
Factory = Callable[[Artifact, str | None, int | None], Backend]


def _ort(device: str) -> Factory:
    def make(artifact: Artifact, precision: str | None, threads: int | None) -> Backend:
        from .ort import OnnxRuntimeBackend

        return OnnxRuntimeBackend(artifact, precision, device=device, threads=threads)

    return make


def _torch(device: str | None) -> Factory:
    def make(artifact: Artifact, precision: str | None, threads: int | None) -> Backend:
        from .torch_model import TorchBackend

        return TorchBackend(artifact, precision, device=device, threads=threads)

    return make


def _tensorrt(artifact: Artifact, precision: str | None, threads: int | None) -> Backend:
    from .trt import TensorRTBackend

    return TensorRTBackend(artifact, precision)  # the GPU does the work; no CPU pool to size


def _ort_default(artifact: Artifact, precision: str | None, threads: int | None) -> Backend:
    from .ort import available_devices

    gpu = "cuda" in available_devices() and nvidia_gpu_present()
    return _ort("cuda" if gpu else "cpu")(artifact, precision, threads)


_EXPLICIT: dict[str, Factory] = {
    "tensorrt": _tensorrt,
    "onnxruntime": _ort_default,
    "onnxruntime-cpu": _ort("cpu"),
    "onnxruntime-cuda": _ort("cuda"),
    "onnxruntime-tensorrt": _ort("tensorrt"),
    "torch": _torch(None),
    "torch-cpu": _torch("cpu"),
    "torch-cuda": _torch("cuda"),
}


def _auto_candidates(
    artifact: Artifact, precision: str | None
) -> list[tuple[str, Factory | None, str]]:
    """(name, factory or None, why not) in order of expected speed.

    Cheap checks first (files present, library installed, GPU node present) so that a CPU box
    goes straight to onnxruntime-cpu without importing torch, TensorRT or CUDA libraries.
    """
    gpu = nvidia_gpu_present()
    out: list[tuple[str, Factory | None, str]] = []

    def has(fmt: str, prec: str | None = precision) -> bool:
        return artifact.find(fmt, prec) is not None

    def installed(mod: str) -> bool:
        return importlib.util.find_spec(mod) is not None

    def add(name: str, factory: Factory,
            checks: list[tuple[bool, str]]) -> None:
        failed = [why for ok, why in checks if not ok]
        out.append((name, None if failed else factory, "; ".join(failed)))

    want = f" {precision}" if precision else ""
    add("tensorrt", _tensorrt, [(has("tensorrt"), f"no{want} TensorRT plan in the artifact"),
                                (installed("tensorrt"), "tensorrt not installed"),
                                (gpu, "no GPU")])
    ort_cuda_checks = [(has("onnx"), f"no{want} ONNX file"), (gpu, "no GPU")]
    if gpu:
        from .ort import cuda_provider_problem

        problem = cuda_provider_problem()
        ort_cuda_checks.append((problem is None, problem or ""))
    add("onnxruntime-cuda", _ort("cuda"), ort_cuda_checks)
    add("torch-cuda", _torch("cuda"),
        [(precision in (None, "fp32", "bf16", "fp16"), f"torch does not run {precision}"),
         (has("safetensors", None), "no safetensors weights"),
         ("architecture" in artifact.meta, "no architecture in oecl.json"),
         (gpu, "no GPU"), (installed("torch"), "torch not installed")])
    add("onnxruntime-cpu", _ort("cpu"), [(has("onnx"), f"no{want} ONNX file")])
    return out


def open_backend(
    artifact: Artifact,
    backend: str = "auto",
    precision: str | None = None,
    threads: int | None = None,
) -> Backend:
    """Open the named backend, or with "auto" the fastest one that works here.

    `threads` sizes the CPU intra-op pool of onnxruntime-cpu and torch-cpu (default: the
    library's own choice, one per physical core).

    auto order: tensorrt > onnxruntime-cuda > torch-cuda > onnxruntime-cpu. Any failure to
    open one (a missing library, a CUDA error, an engine that does not deserialise, a broken
    import) passes to the next; the choice and each "skipped, because ..." go to the
    `oecl_runtime` logger and to the backend's `passed_over`.
    """
    if backend != "auto":
        if backend not in _EXPLICIT:
            choices = ", ".join(BACKEND_CHOICES)
            raise ValueError(f"unknown backend {backend!r}; choose from {choices}")
        b = _EXPLICIT[backend](artifact, precision, threads)
        log.info("backend: %s (%s, max batch %d)", b.name, b.precision, b.max_batch)
        return b
    skipped: list[str] = []
    for name, factory, why in _auto_candidates(artifact, precision):
        if factory is None:
            skipped.append(f"{name}: skipped, because {why}")
            continue
        try:
            b = factory(artifact, precision, threads)
        except Exception as e:  # whatever stops this one, a slower one may still work
            skipped.append(f"{name}: skipped, because {_reason(e)}")
            continue
        log.info("backend: %s (%s, max batch %d), chosen by auto%s", b.name, b.precision,
                 b.max_batch, f"; passed over {' | '.join(skipped)}" if skipped else "")
        b.passed_over = tuple(skipped)
        return b
    raise ArtifactError("no backend can run this artifact here: " + " | ".join(skipped))


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, (BackendUnavailable, ArtifactError)):
        text = f"{type(e).__name__}: {text}"  # an unexpected failure: say what kind
    return text[:300] + ("..." if len(text) > 300 else "")
