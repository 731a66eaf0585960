"""The one interface every backend implements: a uint8 NCHW batch in, float32 norms out."""

from __future__ import annotations

import ctypes
import os
import sys
from abc import ABC, abstractmethod

import numpy as np


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (library or device missing); the message says which."""


class Backend(ABC):
    """A loaded model that turns a uint8 (N, C, H, W) batch into N float32 norms.

    `max_batch` is the largest N `run` accepts; callers split larger inputs. Backends are not
    required to be thread-safe: the scorer and the server call `run` from one thread at a time.
    """

    name: str
    precision: str
    max_batch: int
    # Filled by `auto`: the faster backends it tried first and why each could not run.
    passed_over: tuple[str, ...] = ()

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Norms of a contiguous uint8 (N, C, H, W) batch with 1 <= N <= max_batch."""

    def close(self) -> None:  # noqa: B027 (optional hook, most backends hold nothing)
        """Release device memory and sessions; the default has nothing to release."""

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "precision": self.precision, "max_batch": self.max_batch}

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.precision} max_batch={self.max_batch}>"


CUDA_SUCCESS = 0
LIBCUDA_NAMES = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")


def nvidia_gpu_present() -> bool:
    """Whether a CUDA GPU is usable here, asked of the CUDA driver without torch or any CUDA
    runtime: cuInit + cuDeviceGetCount through cuda-python when it is installed, else
    libcuda through ctypes. Only where no driver library loads at all do the NVIDIA device
    files decide (a Jetson's nvgpu driver has neither /dev/nvidia0 nor /proc/driver/nvidia,
    so the files alone would miss its GPU).

    Used by `auto` so that a CPU-only box never imports torch or CUDA runtimes just to learn
    that there is no GPU.
    """
    count = cuda_driver_device_count()
    if count is not None:
        return count > 0
    return nvidia_device_files_present()


def cuda_driver_device_count() -> int | None:
    """GPUs the CUDA driver reports: 0 when it loads but cuInit fails (no device, or a driver
    too old for the GPU); None when neither cuda-python nor libcuda can be loaded."""
    for probe in (_count_via_cuda_python, _count_via_libcuda):
        count = probe()
        if count is not None:
            return count
    return None


def _count_via_cuda_python() -> int | None:
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python
        except ImportError:
            return None
    try:
        (err,) = driver.cuInit(0)
        if int(err) != CUDA_SUCCESS:
            return 0
        err, count = driver.cuDeviceGetCount()
    except Exception:  # bindings present but libcuda missing: they raise on first call
        return None
    return int(count) if int(err) == CUDA_SUCCESS else 0


def _load_libcuda() -> ctypes.CDLL | None:
    for name in LIBCUDA_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _count_via_libcuda() -> int | None:
    lib = _load_libcuda()
    if lib is None:
        return None
    if lib.cuInit(0) != CUDA_SUCCESS:
        return 0
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != CUDA_SUCCESS:
        return 0
    return count.value


def nvidia_device_files_present() -> bool:
    """Whether the NVIDIA desktop/server driver's device files list a GPU."""
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.exists("/dev/nvidia0") or (os.path.isdir(gpus) and bool(os.listdir(gpus)))


def gpu_models() -> list[str]:
    """Model names of the NVIDIA GPUs the driver lists, in PCI order, without loading any CUDA
    library (from /proc/driver/nvidia/gpus/*/information; empty where that is absent)."""
    root = "/proc/driver/nvidia/gpus"
    names = []
    for bus in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, bus, "information"), encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip() == "Model":
                        names.append(value.strip())
                        break
        except OSError:
            continue
    return names
