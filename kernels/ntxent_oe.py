"""OECL loss entry point: NT-Xent over two views plus alpha times the mean OE feature norm.

``ntxent_oe`` dispatches between the fused Triton kernels (:mod:`kernels.ntxent_oe_triton`,
imported only when used) and the chunked plain-torch twin (:mod:`kernels.ntxent_oe_twin`).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Literal

import torch

from ._common import (
    DEFAULT_CHUNK,
    MAX_FEATURE_DIM,
    NTXentOEOutput,
    check_inputs,
    compute_dtype,
    empty_oe,
)

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


def resolve_backend(backend: str, z_id: torch.Tensor, z_oe: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: what ``backend`` means for these inputs.

    Pure in the inputs' dtype, shape and device, so the op's fake implementation makes the
    same choice as the real one while torch.compile traces.
    """
    if backend == "torch":
        return "torch"
    reason = _triton_blocker(z_id, z_oe)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' unavailable: {reason}")
        return "triton"
    return "triton" if z_id.device.type == "cuda" and reason is None else "torch"


def _impl(backend: str) -> ModuleType:
    # Both modules offer forward / backward_id / backward_oe with one signature.
    if backend == "triton":
        return _triton_module()
    return importlib.import_module(".ntxent_oe_twin", __package__)


# The loss is one registered op, so torch.compile (fullgraph too) treats it as a single node
# whose output shapes come from the fake implementation, whichever backend runs it; its
# backward is a second op. Outputs: loss, contrastive, id_norm, oe_norm (the four of
# NTXentOEOutput), then u, id_norms, lse, oe_norms, the O(N * d) state the backward needs.
@torch.library.custom_op("oecl::ntxent_oe", mutates_args=())
def _ntxent_oe_op(
    z_id: torch.Tensor,
    z_oe: torch.Tensor,
    temperature: float,
    alpha: float,
    backend: str,
    chunk: int,
    block: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = resolve_backend(backend, z_id, z_oe)
    if chosen == "triton":
        u, id_norms, lse, row_loss, oe_norms = _triton_module().forward(
            z_id.contiguous(), z_oe.contiguous(), temperature, block)
    else:
        u, id_norms, lse, row_loss, oe_norms = _impl("torch").forward(
            z_id, z_oe, temperature, chunk)
    contrastive = row_loss.mean()
    oe_norm = oe_norms.mean() if z_oe.shape[0] else oe_norms.new_zeros(())
    loss = contrastive + alpha * oe_norm
    return loss, contrastive, id_norms.mean(), oe_norm, u, id_norms, lse, oe_norms


@_ntxent_oe_op.register_fake
def _ntxent_oe_fake(z_id, z_oe, temperature, alpha, backend, chunk, block):
    chosen = resolve_backend(backend, z_id, z_oe)
    n, m = z_id.shape[0], z_oe.shape[0]
    cdt, oe_dt = compute_dtype(z_id), compute_dtype(z_oe)
    u_dt = z_id.dtype if chosen == "triton" else cdt
    oe_dt = torch.float32 if chosen == "triton" else oe_dt
    loss_dt = torch.promote_types(cdt, oe_dt)

    def scalar(dt):
        return z_id.new_empty((), dtype=dt)

    return (scalar(loss_dt), scalar(cdt), scalar(cdt), scalar(oe_dt),
            z_id.new_empty(z_id.shape, dtype=u_dt), z_id.new_empty((n,), dtype=cdt),
            z_id.new_empty((n,), dtype=cdt), z_id.new_empty((m,), dtype=oe_dt))


@torch.library.custom_op("oecl::ntxent_oe_backward", mutates_args=())
def _ntxent_oe_backward_op(
    grad: torch.Tensor,
    u: torch.Tensor,
    id_norms: torch.Tensor,
    lse: torch.Tensor,
    z_oe: torch.Tensor,
    oe_norms: torch.Tensor,
    temperature: float,
    alpha: float,
    backend: str,
    chunk: int,
    block: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. z_id (in u's dtype) and z_oe (in its dtype) of grad * loss."""
    if backend == "triton":
        mod = _triton_module()
        # Passed by pointer so the kernels read it on the device: no host sync.
        g = grad.detach().to(torch.float32).reshape(1).contiguous()
        z_oe = z_oe.contiguous()
        return (mod.backward_id(u, id_norms, lse, g, temperature, block),
                mod.backward_oe(z_oe, oe_norms, g, alpha, block))
    mod = _impl("torch")
    return (mod.backward_id(u, id_norms, lse, grad, temperature, chunk),
            mod.backward_oe(z_oe, oe_norms, grad, alpha))


@_ntxent_oe_backward_op.register_fake
def _ntxent_oe_backward_fake(grad, u, id_norms, lse, z_oe, oe_norms, temperature, alpha,
                             backend, chunk, block):
    return u.new_empty(u.shape), z_oe.new_empty(z_oe.shape)


def _setup_context(ctx, inputs, output) -> None:
    z_id, z_oe, temperature, alpha, backend, chunk, block = inputs
    u, id_norms, lse, oe_norms = output[4:]
    ctx.save_for_backward(u, id_norms, lse, z_oe, oe_norms)
    ctx.args = (temperature, alpha, resolve_backend(backend, z_id, z_oe), chunk, block)
    ctx.id_dtype = z_id.dtype


def _backward(ctx, grad_loss, *_unused):
    # Only the loss is differentiable: the wrapper hands out the other outputs detached.
    u, id_norms, lse, z_oe, oe_norms = ctx.saved_tensors
    dz_id, dz_oe = _ntxent_oe_backward_op(grad_loss, u, id_norms, lse, z_oe, oe_norms,
                                          *ctx.args)
    return dz_id.to(ctx.id_dtype), dz_oe, None, None, None, None, None


_ntxent_oe_op.register_autograd(_backward, setup_context=_setup_context)


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
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    loss, contrastive, id_norm, oe_norm, *_ = _ntxent_oe_op(
        z_id, z_oe, float(temperature), float(alpha), backend, int(chunk), block
    )
    return NTXentOEOutput(loss, contrastive.detach(), id_norm.detach(), oe_norm.detach())


def ntxent_oe_torch(
    z_id: torch.Tensor,
    z_oe: torch.Tensor | None,
    temperature: float = 0.5,
    alpha: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
) -> NTXentOEOutput:
    """The chunked plain-torch twin behind the same op and contract as :func:`ntxent_oe`
    (``backend="torch"``)."""
    return ntxent_oe(z_id, z_oe, temperature, alpha, backend="torch", chunk=chunk)
