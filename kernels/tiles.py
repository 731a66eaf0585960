"""Tiles, warps and pipeline stages of the NT-Xent kernels (:mod:`kernels.ntxent_oe_triton`)
for one GPU, chosen from its compute capability and shared memory alone, so that every target
can be checked without its hardware (:mod:`kernels.targets` compiles them offline).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton


class LaunchConfig(NamedTuple):
    """Tiles, warps and pipeline stages of the forward and backward NT-Xent kernels."""

    fwd_m: int
    fwd_n: int
    bwd_m: int
    bwd_n: int
    warps_fwd: int
    warps_bwd: int
    stages_fwd: int
    stages_bwd: int


# Bytes of shared memory kept free of the estimate below: barriers and the scratch of
# reductions and layout conversions that the compiler adds next to the staged tiles.
SMEM_RESERVE = 2048

# Tile candidates per padded width, best first: (fwd_m, fwd_n, warps) and (bwd_m, bwd_n,
# warps). The widest start from flash-attention's tiles for head dims 64-128; wider features
# get narrower tiles so that the row tile (and, in backward, its fp32 accumulator) stays in
# registers; the 16-row tiles are the fall-back that fits the smallest shared memory.
_FWD_TILES = {
    128: ((128, 64, 8), (64, 64, 4), (64, 32, 4), (32, 32, 4), (16, 32, 4), (16, 16, 4)),
    256: ((64, 64, 4), (64, 32, 4), (32, 32, 4), (16, 32, 4), (16, 16, 4)),
    512: ((32, 32, 4), (16, 32, 4), (16, 16, 4)),
}
# The backward holds a BLOCK_M x D_PAD fp32 accumulator and the row tile in registers: with
# 4 warps its 64 x 128 tiles spilled 380-640 bytes per thread (ptxas -v, sm_80-sm_90), with 8
# warps none.
_BWD_TILES = {
    128: ((64, 64, 8), (32, 64, 8), (32, 32, 4), (16, 32, 4), (16, 16, 4)),
    256: ((32, 64, 4), (32, 32, 4), (16, 32, 4), (16, 16, 4)),
    512: ((32, 32, 4), (16, 32, 4), (16, 16, 4)),
}


# Tiles tried first on one family of targets, where the general first choice spills
# registers there (ptxas -v of the Triton 3.6 and 3.9 wheels, fp32-TF32 and bf16 at d = 128):
# sm_86/89's 128-row forward spilled 4-96 bytes per thread with Triton 3.9, Hopper's 64 x 64
# backward 52-104 bytes; the tiles below compile without spills with both.
_TARGET_FIRST = {
    ("sm_86/89", 128): {"fwd": ((64, 64, 4),)},
    ("sm_90", 128): {"bwd": ((64, 32, 8),)},
}


def _target_family(capability: tuple[int, int]) -> str:
    if capability >= (9, 0):
        return "sm_90"
    return "sm_86/89" if capability in ((8, 6), (8, 9)) else "other"


def fwd_smem_bytes(block_m: int, block_n: int, d_pad: int, elem: int, stages: int) -> int:
    """Upper estimate of the forward kernel's shared memory: the row tile plus one column
    tile per pipeline stage (measured on sm_80-sm_90 compiles it is never below the real
    figure; the offline compile tests check that)."""
    return (block_m + stages * block_n) * d_pad * elem


def bwd_smem_bytes(block_m: int, block_n: int, d_pad: int, elem: int, stages: int) -> int:
    """Upper estimate for the backward kernel: the column tile is an operand of two products
    (s = u_i u_j^T and w u_j), each with its own staged copy, plus the w tile itself."""
    return (block_m + 2 * stages * block_n) * d_pad * elem + block_m * block_n * elem


def _pick(tiles, smem_fn, d_pad: int, elem: int, budget: int, max_stages: int):
    for m, n, warps in tiles:
        for stages in range(max_stages, 0, -1):
            if smem_fn(m, n, d_pad, elem, stages) <= budget:
                return m, n, warps, stages
    m, n, warps = tiles[-1]
    need = smem_fn(m, n, d_pad, elem, 1) + SMEM_RESERVE
    raise ValueError(
        f"no NT-Xent tile fits {budget + SMEM_RESERVE} bytes of shared memory per block at "
        f"d={d_pad}, {elem}-byte inputs (the smallest needs {need})"
    )


def launch_config(
    d_pad: int,
    dtype: torch.dtype,
    *,
    capability: tuple[int, int],
    smem_per_block: int,
    block: int | None = None,
) -> LaunchConfig:
    """The launch configuration for one GPU, from its properties alone (no device query, so
    every target can be checked without its hardware).

    ``capability`` is the compute capability (major, minor); ``smem_per_block`` the shared
    memory one block may opt into (``cudaDevAttrMaxSharedMemoryPerBlockOptin``: 163 KB on
    sm_80/87, 99 KB on sm_86/89, 227 KB on sm_90). The widest tile that fits is taken, with
    as many pipeline stages (up to 3) as then fit; stages above 1 only pay from sm_80 on,
    where loads into shared memory can be issued asynchronously.
    ``block`` forces square tiles of that size with one stage.
    """
    if d_pad not in (16, 32, 64, 128, 256, 512):
        raise ValueError(f"d_pad must be a power of two in [16, 512], got {d_pad}")
    elem = torch.finfo(dtype).bits // 8
    if block is not None:
        return LaunchConfig(block, block, block, block, 4, 4, 1, 1)
    budget = smem_per_block - SMEM_RESERVE
    max_stages = 3 if capability >= (8, 0) else 1
    width = max(128, d_pad)
    first = _TARGET_FIRST.get((_target_family(capability), width), {})
    fwd_tiles = first.get("fwd", ()) + _FWD_TILES[width]
    bwd_tiles = first.get("bwd", ()) + _BWD_TILES[width]
    fm, fn, fw, fs = _pick(fwd_tiles, fwd_smem_bytes, d_pad, elem, budget, max_stages)
    bm, bn, bw, bs = _pick(bwd_tiles, bwd_smem_bytes, d_pad, elem, budget, max_stages)
    return LaunchConfig(fm, fn, bm, bn, fw, bw, fs, bs)


@functools.cache
def device_properties(index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, opt-in shared memory per block in bytes) of CUDA device ``index``.

    Triton's driver reports the limit its own launch check uses; torch's property is the
    fall-back for drivers whose utils lack it.
    """
    props = torch.cuda.get_device_properties(index)
    smem = None
    try:
        smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except (AttributeError, KeyError, RuntimeError):
        smem = getattr(props, "shared_memory_per_block_optin", None)
    if not smem:
        raise RuntimeError(f"cannot read the shared memory per block of cuda:{index}")
    return (props.major, props.minor), int(smem)
