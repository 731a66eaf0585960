"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts
this directory on sys.path)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device ("auto": CUDA when present), else "<n>-core <CPU model>"
    from /proc/cpuinfo."""
    if device.startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model}"
