"""Plain-torch versions of the OECL loss.

``forward`` / ``backward_id`` / ``backward_oe`` are the chunked twin of the Triton kernels,
with the same signatures: same algorithm (per-row log-sum-exp stored in forward, similarity
tiles recomputed in backward), memory O(N * chunk); the registered op ``oecl::ntxent_oe``
runs them where Triton does not. ``ntxent_oe_dense`` is the textbook formula with the full
N x N matrix; it is the reference for the tests and the eager baseline of the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    DEFAULT_CHUNK,
    NORM_EPS,
    NTXentOEOutput,
    check_inputs,
    compute_dtype,
    empty_oe,
)


def positive_index(n: int, device: torch.device) -> torch.Tensor:
    """pos(i) = i + N/2 for the first view, i - N/2 for the second (an involution)."""
    return (torch.arange(n, device=device) + n // 2) % n


def _oe_mean_norm(z_oe: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if z_oe.shape[0] == 0:
        # Still tied to z_oe so that an empty batch gets an empty gradient, as on the
        # Triton path, instead of None.
        return z_oe.to(dtype).sum() * 0.0
    # vector_norm's backward is z/||z|| with 0 for an all-zero row, the same as the kernel.
    return torch.linalg.vector_norm(z_oe.to(dtype), dim=1).mean()


def _outputs(
    contrastive: torch.Tensor,
    id_norm: torch.Tensor,
    oe_norm: torch.Tensor,
    alpha: float,
) -> NTXentOEOutput:
    loss = contrastive + alpha * oe_norm
    log_dtype = torch.float64 if loss.dtype == torch.float64 else torch.float32
    return NTXentOEOutput(
        loss,
        contrastive.detach().to(log_dtype),
        id_norm.detach().to(log_dtype),
        oe_norm.detach().to(log_dtype),
    )


def ntxent_oe_dense(
    z_id: torch.Tensor,
    z_oe: torch.Tensor | None,
    temperature: float = 0.5,
    alpha: float = 1.0,
    *,
    upcast: bool = True,
) -> NTXentOEOutput:
    """The OECL loss written directly with the N x N similarity matrix.

    ``upcast=True`` (the default, used as the test reference) normalises and multiplies in
    fp32 (float64 inputs stay float64). ``upcast=False`` keeps the normalisation and the
    similarity matmul in the input dtype and upcasts only for the log-sum-exp, which is what
    an eager SimCLR loss under autocast does; the benchmark uses it as the eager baseline so
    that low-precision timings are not flattered by an fp32 matmul in the baseline.
    """
    if z_oe is None:
        z_oe = empty_oe(z_id)
    check_inputs(z_id, z_oe, temperature)
    cdt = compute_dtype(z_id)
    n = z_id.shape[0]
    z = z_id.to(cdt) if upcast else z_id
    u = F.normalize(z, dim=1, eps=NORM_EPS)
    sim = (u @ u.T).to(cdt) / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z_id.device)
    sim = sim.masked_fill(eye, float("-inf"))
    # Cross-entropy over j != i with the positive as the target is exactly
    # -s(i, pos(i)) + log sum_{j != i} exp s(i, j).
    contrastive = F.cross_entropy(sim, positive_index(n, z_id.device))
    id_norm = torch.linalg.vector_norm(z_id.detach().to(cdt), dim=1).mean()
    return _outputs(contrastive, id_norm, _oe_mean_norm(z_oe, compute_dtype(z_oe)), alpha)


def forward(
    z_id: torch.Tensor,
    z_oe: torch.Tensor,
    temperature: float,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin of the Triton forward: ``(u, id_norms, lse, row_loss, oe_norms)``.

    Everything is in the compute dtype (fp32, float64 for float64 inputs). The similarity
    matrix is built ``chunk`` rows at a time, so memory is O(N * chunk) inside the pass and
    O(N * d) between the passes (u and lse).
    """
    cdt = compute_dtype(z_id)
    z = z_id.to(cdt)
    id_norms = torch.linalg.vector_norm(z, dim=1)
    # F.normalize's formula, with the norms kept for the backward.
    u = z / id_norms.clamp_min(NORM_EPS)[:, None]
    n = u.shape[0]
    inv_t = 1.0 / temperature
    lse = torch.empty(n, dtype=cdt, device=u.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sim = (u[start:stop] @ u.T).mul_(inv_t)
        rows = torch.arange(stop - start, device=u.device)
        sim[rows, rows + start] = float("-inf")
        lse[start:stop] = torch.logsumexp(sim, dim=1)
        del sim
    pos_logit = (u * u[positive_index(n, u.device)]).sum(1) * inv_t
    oe_norms = torch.linalg.vector_norm(z_oe.to(compute_dtype(z_oe)), dim=1)
    return u, id_norms, lse, lse - pos_logit, oe_norms


def backward_id(
    u: torch.Tensor,
    id_norms: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    temperature: float,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Gradient of ``grad * contrastive`` w.r.t. z_id, in u's dtype.

    The same symmetric formula as the Triton kernel,
        dL/du_i = 1/(N tau) [ sum_{j != i} (p_ij + p_ji) u_j - 2 u_pos(i) ],
    with p_ij = exp(s_ij - lse_i) recomputed tile by tile from the stored log-sum-exp, so the
    twin checks the kernel's derivation on any machine. Then back through u = z / max(||z||,
    eps): the tangent projection divided by the norm, or 1/eps where the clamp was active.
    """
    n = u.shape[0]
    inv_t = 1.0 / temperature
    du = torch.empty_like(u)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sim = (u[start:stop] @ u.T).mul_(inv_t)
        w = (sim - lse[start:stop, None]).exp_()  # p_ij, row softmax of row i
        w += sim.sub_(lse[None, :]).exp_()  # p_ji, row softmax of row j (s is symmetric)
        rows = torch.arange(stop - start, device=u.device)
        w[rows, rows + start] = 0.0
        del sim
        du[start:stop] = w @ u
        del w
    du -= 2.0 * u[positive_index(n, u.device)]
    du *= grad.to(u.dtype) * (inv_t / n)
    norm = id_norms[:, None]
    radial = (u * du).sum(1, keepdim=True)
    return torch.where(norm > NORM_EPS, (du - u * radial) / norm.clamp_min(NORM_EPS),
                       du / NORM_EPS)


def backward_oe(
    z_oe: torch.Tensor,
    oe_norms: torch.Tensor,
    grad: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Gradient of ``grad * alpha * mean_k ||z_oe,k||`` w.r.t. z_oe, in z_oe's dtype: z / ||z||
    scaled, and 0 for an all-zero row (the subgradient torch's vector_norm picks)."""
    m = z_oe.shape[0]
    if m == 0:
        return torch.zeros(z_oe.shape, dtype=z_oe.dtype, device=z_oe.device)
    cdt = oe_norms.dtype
    safe = torch.where(oe_norms > 0, oe_norms, torch.ones_like(oe_norms))
    scale = torch.where(oe_norms > 0, grad.to(cdt) * (alpha / m) / safe,
                        torch.zeros_like(oe_norms))
    return (z_oe.to(cdt) * scale[:, None]).to(z_oe.dtype).contiguous()
