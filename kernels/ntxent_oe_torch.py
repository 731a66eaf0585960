"""Plain-torch versions of the OECL loss.

``ntxent_oe_torch`` is the chunked twin of the Triton kernel: same algorithm (per-row
log-sum-exp stored in forward, similarity tiles recomputed in backward), memory
O(N * chunk). ``ntxent_oe_dense`` is the textbook formula with the full N x N matrix; it is
the reference for the tests and the eager baseline of the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import NORM_EPS, NTXentOEOutput, check_inputs, compute_dtype, empty_oe

DEFAULT_CHUNK = 1024


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


class _ChunkedNTXent(torch.autograd.Function):
    """NT-Xent on unit rows ``u`` with forward and backward both chunked over rows.

    Why an autograd.Function rather than torch.utils.checkpoint per chunk: the backward is
    written with the same symmetric formula as the Triton kernel,
        dL/du_i = 1/(N tau) [ sum_{j != i} (p_ij + p_ji) u_j - 2 u_pos(i) ],
    with p_ij = exp(s_ij - lse_i) recomputed from the stored per-row log-sum-exp, so this
    twin checks the kernel's derivation on any machine; it also needs one recompute of each
    (chunk x N) tile instead of checkpoint's replay of the whole chunk forward plus its
    autograd graph. Saved state is u (N x d) and lse (N): O(N * d) between the passes,
    O(N * chunk) for the tiles inside each pass.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        n = u.shape[0]
        inv_t = 1.0 / temperature
        lse = torch.empty(n, dtype=u.dtype, device=u.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            sim = (u[start:stop] @ u.T).mul_(inv_t)
            rows = torch.arange(stop - start, device=u.device)
            sim[rows, rows + start] = float("-inf")
            lse[start:stop] = torch.logsumexp(sim, dim=1)
            del sim
        pos_logit = (u * u[positive_index(n, u.device)]).sum(1) * inv_t
        ctx.save_for_backward(u, lse)
        ctx.temperature = temperature
        ctx.chunk = chunk
        return (lse - pos_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        u, lse = ctx.saved_tensors
        n = u.shape[0]
        inv_t = 1.0 / ctx.temperature
        du = torch.empty_like(u)
        for start in range(0, n, ctx.chunk):
            stop = min(start + ctx.chunk, n)
            sim = (u[start:stop] @ u.T).mul_(inv_t)
            w = (sim - lse[start:stop, None]).exp_()  # p_ij, row softmax of row i
            w += sim.sub_(lse[None, :]).exp_()  # p_ji, row softmax of row j (s is symmetric)
            rows = torch.arange(stop - start, device=u.device)
            w[rows, rows + start] = 0.0
            del sim
            du[start:stop] = w @ u
            del w
        du -= 2.0 * u[positive_index(n, u.device)]
        du *= grad * (inv_t / n)
        return du, None, None


def ntxent_oe_torch(
    z_id: torch.Tensor,
    z_oe: torch.Tensor | None,
    temperature: float = 0.5,
    alpha: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
) -> NTXentOEOutput:
    """Chunked plain-torch OECL loss; same contract as :func:`kernels.ntxent_oe`."""
    if z_oe is None:
        z_oe = empty_oe(z_id)
    check_inputs(z_id, z_oe, temperature)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    cdt = compute_dtype(z_id)
    z = z_id.to(cdt)
    u = F.normalize(z, dim=1, eps=NORM_EPS)
    contrastive = _ChunkedNTXent.apply(u, float(temperature), int(chunk))
    id_norm = torch.linalg.vector_norm(z.detach(), dim=1).mean()
    return _outputs(contrastive, id_norm, _oe_mean_norm(z_oe, compute_dtype(z_oe)), alpha)
