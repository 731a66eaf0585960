"""Pieces shared by the Triton path, the torch twin and the dense reference."""

from __future__ import annotations

from typing import NamedTuple

import torch

# Same clamp as F.normalize: a row whose norm is at most NORM_EPS is divided by NORM_EPS
# instead of its norm, so an all-zero projection gives u = 0 rather than NaN.
NORM_EPS = 1e-12

# The kernel keeps one (rows x padded d) tile of unit vectors in registers; past 512 the
# tile no longer fits next to the accumulators, and projection heads are far narrower.
MAX_FEATURE_DIM = 512

# Rows per similarity tile of the torch twin: its memory is O(N * chunk).
DEFAULT_CHUNK = 1024

LOW_PRECISION = (torch.float16, torch.bfloat16)


class NTXentOEOutput(NamedTuple):
    """Result of the OECL loss.

    ``loss`` is the differentiable objective; the other three are detached fp32 scalars
    meant for logging.
    """

    loss: torch.Tensor
    contrastive: torch.Tensor
    id_norm: torch.Tensor
    oe_norm: torch.Tensor


def empty_oe(z_id: torch.Tensor) -> torch.Tensor:
    """An (0, d) OE batch, used when the caller passes ``None``."""
    return z_id.new_zeros((0, z_id.shape[1]))


def check_inputs(z_id: torch.Tensor, z_oe: torch.Tensor, temperature: float) -> None:
    """Validate shapes and values common to every backend; raise ValueError otherwise."""
    if z_id.dim() != 2:
        raise ValueError(f"z_id must be 2-D (N, d), got shape {tuple(z_id.shape)}")
    n = z_id.shape[0]
    if n < 2 or n % 2:
        raise ValueError(
            f"z_id must hold an even number N >= 2 of rows (two views), got N={n}"
        )
    if z_oe.dim() != 2:
        raise ValueError(f"z_oe must be 2-D (M, d), got shape {tuple(z_oe.shape)}")
    if z_oe.device != z_id.device:
        raise ValueError(f"z_id is on {z_id.device} but z_oe is on {z_oe.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, z in (("z_id", z_id), ("z_oe", z_oe)):
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")


def compute_dtype(z: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16; float64 stays float64 so gradcheck is exact."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32
