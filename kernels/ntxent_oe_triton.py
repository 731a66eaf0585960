"""Triton kernels for the OECL loss: NT-Xent over unit rows plus the OE norm penalty.

Imported lazily by :mod:`kernels.ntxent_oe`, so the package works without triton.

Memory is O(N * d): forward stores the unit rows u (N x d, input dtype), the row norms and
the per-row log-sum-exp (N each); backward recomputes every similarity tile from them.
Both passes give each program one block of rows and stream over all column blocks, so no
program writes outside its own rows and no atomics are needed. The backward needs only
that one sweep because s is symmetric: the column contribution p_ji of row j to dL/du_i is
exp(s_ij - lse_j), available from the same tile.

Offsets are int32: N * d must stay below 2**31 (65536 x 512 is 2**25). The tiles each GPU
launches with are chosen in :mod:`kernels.tiles`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ._common import NORM_EPS
from .tiles import LaunchConfig, device_properties, launch_config

# Running-max start value: finite so that a tile whose entries are all masked (-inf) gives
# exp(-inf - m) = 0 instead of exp(-inf + inf) = NaN.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _row_tile(z_ptr, n_rows, d, BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
    # This program's block of rows of an (n_rows, d) matrix in fp32, with its row mask,
    # element mask and offsets: the start of both one-pass row kernels.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D_PAD)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < d)
    offs = rows[:, None] * d + cols[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return rows, rmask, mask, offs, z


@triton.jit
def _row_norm_kernel(
    z_ptr,
    u_ptr,
    norm_ptr,
    n_rows,
    d,
    eps,
    WRITE_U: tl.constexpr,
    BLOCK_R: tl.constexpr,
    D_PAD: tl.constexpr,
):
    # One launch per input: WRITE_U for the ID rows (norms and unit rows), norms only for OE.
    rows, rmask, mask, offs, z = _row_tile(z_ptr, n_rows, d, BLOCK_R, D_PAD)
    norm = tl.sqrt(tl.sum(z * z, axis=1))
    tl.store(norm_ptr + rows, norm, mask=rmask)
    if WRITE_U:
        u = z / tl.maximum(norm, eps)[:, None]
        tl.store(u_ptr + offs, u.to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unit_row_block(u_ptr, n, d, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                    D_PAD: tl.constexpr):
    # This program's rows of u, as both NT-Xent kernels start: row indices, feature columns,
    # row mask, tile mask and the tile u_i (fp32 when UPCAST).
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    rmask = rm < n
    dmask = cols < d
    tile_mask = rmask[:, None] & dmask[None, :]
    u_i = tl.load(u_ptr + rm[:, None] * d + cols[None, :], mask=tile_mask, other=0.0)
    if UPCAST:
        u_i = u_i.to(tl.float32)
    return rm, cols, rmask, tile_mask, u_i


@triton.jit
def _column_rows(u_ptr, rn, cols, n, d, UPCAST: tl.constexpr):
    # Rows rn of u, one column block of the sweep (zeros past n and d), fp32 when UPCAST.
    # The product s = u_i u_j^T / tau stays in each sweep: the backward loads lse_j between
    # the two, and moving that load reorders the compiled loop.
    u_j = tl.load(u_ptr + rn[:, None] * d + cols[None, :],
                  mask=(rn[:, None] < n) & (cols[None, :] < d), other=0.0)
    if UPCAST:
        u_j = u_j.to(tl.float32)
    return u_j


@triton.jit
def _positive_rows(u_ptr, rm, cols, n, d, tile_mask):
    # u_pos(i) in fp32, pos(i) = i + N/2 for the first view and i - N/2 for the second: taken
    # from its own row rather than picked out of a tile, one extra row load per row, so that
    # no tile has to know where pos(i) falls.
    half = n // 2
    pos = tl.where(rm < half, rm + half, rm - half)
    return tl.load(u_ptr + pos[:, None] * d + cols[None, :], mask=tile_mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _ntxent_fwd_kernel(
    u_ptr,
    lse_ptr,
    row_loss_ptr,
    n,
    d,
    inv_temp,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
):
    rm, cols, rmask, tile_mask, u_i = _unit_row_block(u_ptr, n, d, UPCAST, BLOCK_M, D_PAD)

    # Online log-sum-exp. The fixed bound 1/tau would also do as the max (|s| <= 1/tau), but
    # with small tau every exp(s - 1/tau) of a row can underflow in fp32 (tau = 0.01 gives
    # exp(-100) for orthogonal rows), so the running max costs one rescale per tile for
    # robustness at any temperature.
    m_i = tl.full((BLOCK_M,), _NEG_BIG, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, n, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        u_j = _column_rows(u_ptr, rn, cols, n, d, UPCAST)
        s = tl.dot(u_i, tl.trans(u_j), input_precision=PRECISION) * inv_temp
        # The sweeps part here (no shared helper): this one folds s into a running
        # log-sum-exp per row, the backward turns it into weights of the rows u_j.
        valid = (rn[None, :] < n) & (rm[:, None] != rn[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)

    u_p = _positive_rows(u_ptr, rm, cols, n, d, tile_mask)
    s_pos = tl.sum(u_i.to(tl.float32) * u_p, axis=1) * inv_temp
    tl.store(lse_ptr + rm, lse, mask=rmask)
    tl.store(row_loss_ptr + rm, lse - s_pos, mask=rmask)


@triton.jit
def _ntxent_bwd_kernel(
    u_ptr,
    norm_ptr,
    lse_ptr,
    grad_ptr,
    dz_ptr,
    n,
    d,
    inv_temp,
    eps,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
):
    rm, cols, rmask, tile_mask, u_i = _unit_row_block(u_ptr, n, d, UPCAST, BLOCK_M, D_PAD)
    lse_i = tl.load(lse_ptr + rm, mask=rmask, other=0.0)

    # acc_i = sum_{j != i} (p_ij + p_ji) u_j, fp32.
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for start in range(0, n, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        cmask = rn < n
        u_j = _column_rows(u_ptr, rn, cols, n, d, UPCAST)
        lse_j = tl.load(lse_ptr + rn, mask=cmask, other=0.0)
        s = tl.dot(u_i, tl.trans(u_j), input_precision=PRECISION) * inv_temp
        w = tl.exp(s - lse_i[:, None]) + tl.exp(s - lse_j[None, :])
        valid = cmask[None, :] & (rm[:, None] != rn[None, :])
        w = tl.where(valid, w, 0.0)
        # w is in [0, 2]; like P in flash attention it goes to the operand dtype so the
        # second product also runs on tensor cores.
        acc += tl.dot(w.to(u_j.dtype), u_j, input_precision=PRECISION)

    u_p = _positive_rows(u_ptr, rm, cols, n, d, tile_mask)
    g = tl.load(grad_ptr)
    du = (acc - 2.0 * u_p) * (g * inv_temp / n)

    # Back through u = z / max(||z||, eps): the tangent projection divided by the norm, or
    # a plain 1/eps scale where the clamp was active (its derivative is zero there).
    u32 = u_i.to(tl.float32)
    norm = tl.load(norm_ptr + rm, mask=rmask, other=1.0)
    radial = tl.sum(u32 * du, axis=1)
    dz = tl.where(
        (norm > eps)[:, None],
        (du - u32 * radial[:, None]) / tl.maximum(norm, eps)[:, None],
        du / eps,
    )
    tl.store(dz_ptr + rm[:, None] * d + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=tile_mask)


@triton.jit
def _oe_grad_kernel(
    z_ptr,
    norm_ptr,
    grad_ptr,
    dz_ptr,
    m_rows,
    d,
    coef,
    BLOCK_R: tl.constexpr,
    D_PAD: tl.constexpr,
):
    # d(coef * sum_k ||z_k||)/dz_k = coef * z_k / ||z_k||, and 0 for an all-zero row (the
    # subgradient torch's vector_norm also picks).
    rows, rmask, mask, offs, z = _row_tile(z_ptr, m_rows, d, BLOCK_R, D_PAD)
    norm = tl.load(norm_ptr + rows, mask=rmask, other=1.0)
    g = tl.load(grad_ptr)
    scale = tl.where(norm > 0.0, (g * coef) / tl.where(norm > 0.0, norm, 1.0), 0.0)
    tl.store(dz_ptr + offs, (z * scale[:, None]).to(dz_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """True when these kernels run in triton's CPU interpreter.

    The interpreter has to be chosen before triton itself is imported (triton's own
    reductions such as tl.sum are jit functions decorated at import), so both the kernels
    here and triton's library have to be in interpreter form.
    """
    import triton.language.standard as tl_standard

    return isinstance(_ntxent_fwd_kernel, InterpretedFunction) and isinstance(
        tl_standard._sum_combine, InterpretedFunction
    )


def interpreter_mismatch() -> bool:
    """True when only one of triton's library and these kernels is in interpreter form."""
    import triton.language.standard as tl_standard

    return isinstance(_ntxent_fwd_kernel, InterpretedFunction) != isinstance(
        tl_standard._sum_combine, InterpretedFunction
    )


def _d_pad(d: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(d))


# The interpreter emulates one program at a time; small tiles keep the masked, multi-tile
# code paths exercised on the small test sizes.
_INTERPRETER_CONFIG = LaunchConfig(16, 16, 16, 16, 4, 4, 1, 1)


def _config_for(z: torch.Tensor, d_pad: int, block: int | None) -> LaunchConfig:
    if block is None and interpreted():
        return _INTERPRETER_CONFIG
    if z.device.type != "cuda":
        return launch_config(d_pad, z.dtype, capability=(8, 0), smem_per_block=163 * 1024,
                             block=block)
    capability, smem = device_properties(z.device.index)
    return launch_config(d_pad, z.dtype, capability=capability, smem_per_block=smem,
                         block=block)


def device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' device, so that
    cuda:1 outside torchrun works."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 follows torch's own matmul setting, so "highest" (torch's default) means exact
    # fp32 products here as in the eager reference, and "high"/"medium" allow TF32.
    # 16-bit operands have a single mode; None leaves triton's default.
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot mishandles bfloat16 operands (numpy has no bf16), so there
    # the tiles are multiplied in fp32; compiled kernels keep bf16 for the tensor cores.
    return dtype == torch.bfloat16 and interpreted()


def forward(
    z_id: torch.Tensor,
    z_oe: torch.Tensor,
    temperature: float,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernels on contiguous inputs.

    Returns ``(u, id_norms, lse, row_loss, oe_norms)``; fp32 except ``u`` (input dtype).
    """
    n, d = z_id.shape
    m = z_oe.shape[0]
    d_pad = _d_pad(d)
    cfg = _config_for(z_id, d_pad, block)
    dev = z_id.device
    u = torch.empty_like(z_id)
    id_norms = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    row_loss = torch.empty(n, dtype=torch.float32, device=dev)
    oe_norms = torch.empty(m, dtype=torch.float32, device=dev)
    block_r = cfg.bwd_m

    with device_guard(dev):
        _row_norm_kernel[(triton.cdiv(n, block_r),)](
            z_id, u, id_norms, n, d, NORM_EPS,
            WRITE_U=True, BLOCK_R=block_r, D_PAD=d_pad, num_warps=4,
        )
        if m:
            oe_pad = _d_pad(z_oe.shape[1])
            _row_norm_kernel[(triton.cdiv(m, block_r),)](
                z_oe, z_oe, oe_norms, m, z_oe.shape[1], NORM_EPS,
                WRITE_U=False, BLOCK_R=block_r, D_PAD=oe_pad, num_warps=4,
            )
        _ntxent_fwd_kernel[(triton.cdiv(n, cfg.fwd_m),)](
            u, lse, row_loss, n, d, 1.0 / temperature,
            UPCAST=_upcast(z_id.dtype), PRECISION=dot_precision(z_id.dtype),
            BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, D_PAD=d_pad,
            num_warps=cfg.warps_fwd, num_stages=cfg.stages_fwd,
        )
    return u, id_norms, lse, row_loss, oe_norms


def backward_id(
    u: torch.Tensor,
    id_norms: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    temperature: float,
    block: int | None = None,
) -> torch.Tensor:
    """Gradient of ``grad * contrastive`` w.r.t. z_id, in u's dtype. ``grad``: fp32 (1,)."""
    n, d = u.shape
    d_pad = _d_pad(d)
    cfg = _config_for(u, d_pad, block)
    dz = torch.empty_like(u)
    with device_guard(u.device):
        _ntxent_bwd_kernel[(triton.cdiv(n, cfg.bwd_m),)](
            u, id_norms, lse, grad, dz, n, d, 1.0 / temperature, NORM_EPS,
            UPCAST=_upcast(u.dtype), PRECISION=dot_precision(u.dtype),
            BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, D_PAD=d_pad,
            num_warps=cfg.warps_bwd, num_stages=cfg.stages_bwd,
        )
    return dz


def backward_oe(
    z_oe: torch.Tensor,
    oe_norms: torch.Tensor,
    grad: torch.Tensor,
    alpha: float,
    block: int | None = None,
) -> torch.Tensor:
    """Gradient of ``grad * alpha * mean_k ||z_oe,k||`` w.r.t. z_oe, in z_oe's dtype."""
    m, d = z_oe.shape
    dz = torch.empty_like(z_oe)
    if m == 0:
        return dz
    d_pad = _d_pad(d)
    block_r = block if block is not None else 32
    with device_guard(z_oe.device):
        _oe_grad_kernel[(triton.cdiv(m, block_r),)](
            z_oe, oe_norms, grad, dz, m, d, alpha / m,
            BLOCK_R=block_r, D_PAD=d_pad, num_warps=4,
        )
    return dz
