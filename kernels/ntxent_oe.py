"""OECL loss entry point: NT-Xent over two views plus alpha times the mean OE feature norm.

``ntxent_oe`` dispatches between the fused Triton kernels (:mod:`kernels.ntxent_oe_triton`,
imported only when used) and the chunked plain-torch twin (:mod:`kernels.ntxent_oe_torch`).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Literal

import torch

from ._common import (
    MAX_FEATURE_DIM,
    NTXentOEOutput,
    check_inputs,
    empty_oe,
)
from .ntxent_oe_torch import DEFAULT_CHUNK, ntxent_oe_torch

Backend = Literal["auto", "triton", "torch"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    try:
        return importlib.import_module(".ntxent_oe_triton", __package__)
    except ImportError:
        return None


def _triton_blocker(z_id: torch.Tensor, z_oe: torch.Tensor) -> str | None:
    """Why the Triton path cannot take these inputs, or None when it can."""
    if z_id.dtype not in _TRITON_DTYPES or z_oe.dtype not in _TRITON_DTYPES:
        return (f"the Triton kernel takes fp32, bf16 or fp16, got {z_id.dtype} / "
                f"{z_oe.dtype} (use backend='torch')")
    d = max(z_id.shape[1], z_oe.shape[1])
    if d > MAX_FEATURE_DIM:
        return f"the Triton kernel supports d <= {MAX_FEATURE_DIM}, got d={d}"
    if z_id.numel() >= 2**31 or z_oe.numel() >= 2**31:
        return "the Triton kernel uses 32-bit offsets: N * d and M * d must be < 2**31"
    mod = _triton_module()
    if mod is None:
        return "triton is not installed (pip install triton, Linux only)"
    if mod.interpreter_mismatch():
        return ("TRITON_INTERPRET changed between importing triton and importing the "
                "kernels; set it before anything imports triton")
    if z_id.device.type == "cuda" or mod.interpreted():
        return None
    return (f"the Triton kernel needs CUDA tensors (got {z_id.device}); on CPU it runs only "
            "in triton's interpreter, which must be selected with TRITON_INTERPRET=1 before "
            "triton is first imported")


class _NTXentOETriton(torch.autograd.Function):
    """Autograd wrapper around the fused kernels; saves O(N * d) for backward."""

    @staticmethod
    def forward(
        ctx,
        z_id: torch.Tensor,
        z_oe: torch.Tensor,
        temperature: float,
        alpha: float,
        block: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mod = _triton_module()
        z_id_c = z_id.contiguous()
        z_oe_c = z_oe.contiguous()
        u, id_norms, lse, row_loss, oe_norms = mod.forward(z_id_c, z_oe_c, temperature, block)
        contrastive = row_loss.mean()
        oe_norm = oe_norms.mean() if z_oe.shape[0] else oe_norms.new_zeros(())
        loss = contrastive + alpha * oe_norm
        ctx.save_for_backward(u, id_norms, lse, z_oe_c, oe_norms)
        ctx.temperature = temperature
        ctx.alpha = alpha
        ctx.block = block
        id_norm = id_norms.mean()
        ctx.mark_non_differentiable(contrastive, id_norm, oe_norm)
        return loss, contrastive, id_norm, oe_norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx,
        grad_loss: torch.Tensor | None,
        *_unused: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        if grad_loss is None:
            return None, None, None, None, None
        mod = _triton_module()
        u, id_norms, lse, z_oe, oe_norms = ctx.saved_tensors
        # Passed by pointer so the kernels read it on the device: no host sync.
        g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
        dz_id = dz_oe = None
        if ctx.needs_input_grad[0]:
            dz_id = mod.backward_id(u, id_norms, lse, g, ctx.temperature, ctx.block)
        if ctx.needs_input_grad[1]:
            dz_oe = mod.backward_oe(z_oe, oe_norms, g, ctx.alpha, ctx.block)
        return dz_id, dz_oe, None, None, None


def ntxent_oe(
    z_id: torch.Tensor,
    z_oe: torch.Tensor | None,
    temperature: float = 0.5,
    alpha: float = 1.0,
    backend: Backend = "auto",
    chunk: int = DEFAULT_CHUNK,
    *,
    block: int | None = None,
) -> NTXentOEOutput:
    """OECL loss: NT-Xent over the ID views plus ``alpha`` times the mean OE feature norm.

    loss = mean_i [ -s(i, pos(i)) + log sum_{j != i} exp s(i, j) ] + alpha * mean_k ||z_oe,k||

    with s(i, j) = <u_i, u_j> / temperature and u = z / max(||z||, 1e-12) (F.normalize's
    clamp, so an all-zero row maps to u = 0 instead of NaN).

    Args:
        z_id: (N, d) raw projection features, N even. Rows i and i + N/2 are the two views
            of one image. Under data parallelism pass the all-gathered features in the
            layout ``cat([view1_all_ranks, view2_all_ranks])``, i.e. the first views of
            every rank, then the second views in the same order; nothing else is assumed.
        z_oe: (M, d) raw features of the outlier-exposure views; M may be 0 (or ``None``)
            and need not equal N. Their norms are penalised, not normalised.
        temperature: tau > 0.
        alpha: weight of the OE norm penalty; 0 gives plain NT-Xent and a zero OE gradient.
        backend: ``"triton"`` forces the fused kernels (CUDA tensors, or CPU tensors in
            triton's interpreter when TRITON_INTERPRET=1 was set before triton was first
            imported; RuntimeError otherwise). ``"torch"`` uses the chunked twin.
            ``"auto"`` takes Triton for CUDA tensors it supports when triton imports, and
            the twin otherwise.
        chunk: rows per tile of the torch twin (its memory is O(N * chunk)).
        block: Triton tile size override (a power of two >= 16); None picks by d.

    Returns:
        ``NTXentOEOutput(loss, contrastive, id_norm, oe_norm)``. ``loss`` is a
        differentiable 0-d fp32 tensor (float64 for float64 inputs, which only the torch
        backend takes); the other three are detached: the NT-Xent term, the mean ID row
        norm and the mean OE row norm (0 when M == 0). Gradients come back in the input
        dtypes.
    """
    if z_oe is None:
        z_oe = empty_oe(z_id)
    check_inputs(z_id, z_oe, temperature)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block}")

    use_triton = False
    if backend == "triton":
        reason = _triton_blocker(z_id, z_oe)
        if reason is not None:
            raise RuntimeError(f"backend='triton' unavailable: {reason}")
        use_triton = True
    elif backend == "auto" and z_id.device.type == "cuda":
        use_triton = _triton_blocker(z_id, z_oe) is None

    if not use_triton:
        return ntxent_oe_torch(z_id, z_oe, temperature, alpha, chunk)
    loss, contrastive, id_norm, oe_norm = _NTXentOETriton.apply(
        z_id, z_oe, float(temperature), float(alpha), block
    )
    return NTXentOEOutput(loss, contrastive, id_norm, oe_norm)
