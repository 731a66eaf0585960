"""The one interface every backend implements: a uint8 NCHW batch in, float32 norms out."""

from __future__ import annotations

import os
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


def nvidia_gpu_present() -> bool:
    """Whether the NVIDIA driver exposes a GPU, without importing any CUDA library.

    Used by `auto` so that a CPU-only box never imports torch or CUDA runtimes just to learn
    that there is no GPU.
    """
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
