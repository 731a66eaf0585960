"""What a `--device` name means on this machine."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """auto = the GPU when CUDA is available, else the CPU; a CUDA name without CUDA fails."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev
