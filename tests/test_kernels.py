"""Tests of the fused OECL loss (kernels/): Triton path, chunked torch twin, dense reference.

Without CUDA the Triton kernels run in triton's CPU interpreter, which has to be chosen
before triton is first imported in the process; hence the environment variable below, set
before anything else is imported. (A conftest.py that sets TRITON_INTERPRET=1 when no CUDA
device is present does the same for the whole test session.)
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from kernels import NTXentOEOutput, ntxent_oe, ntxent_oe_dense  # noqa: E402
from kernels.ntxent_oe import (
    _triton_blocker,  # noqa: E402
    ntxent_oe_torch,  # noqa: E402
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
REPO = Path(__file__).resolve().parents[1]

# (loss atol, loss rtol, gradient error relative to the largest reference entry)
TOL = {
    torch.float32: (2e-5, 2e-5, 1e-4),
    torch.float16: (3e-3, 3e-3, 1.5e-2),
    torch.bfloat16: (2e-2, 2e-2, 5e-2),
}


def _triton_ready() -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    probe = torch.zeros(2, 16, device=DEVICE)
    reason = _triton_blocker(probe, probe[:0])
    if reason is not None:
        pytest.skip(f"Triton path unavailable here: {reason}")


@pytest.fixture
def triton_ready() -> None:
    _triton_ready()


def _features(n: int, m: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Row norms spread over [0.5, 4] so the normalisation backward is exercised.
    z_id = torch.randn(n, d, generator=g) * (0.5 + 3.5 * torch.rand(n, 1, generator=g))
    z_oe = torch.randn(m, d, generator=g) * (0.5 + 3.5 * torch.rand(m, 1, generator=g))
    return z_id.to(dtype), z_oe.to(dtype)


def _run(fn, z_id, z_oe, **kw):
    """Loss output and gradients of fn at detached copies of the inputs."""
    a = z_id.detach().clone().requires_grad_()
    b = z_oe.detach().clone().requires_grad_()
    out = fn(a, b, **kw)
    out.loss.backward()
    return out, a.grad, b.grad


def _reference(z_id, z_oe, temperature, alpha):
    return _run(ntxent_oe_dense, z_id.cpu().double(), z_oe.cpu().double(),
                temperature=temperature, alpha=alpha)


def _grad_err(got: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if ref is None or ref.numel() == 0:  # M == 0: nothing to differentiate
        assert got is None or got.numel() == 0
        return 0.0
    assert got is not None
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _check(out, ref, dtype):
    atol, rtol, gtol = TOL[dtype]
    (o, ga, gb), (r, ra, rb) = out, ref
    assert isinstance(o, NTXentOEOutput)
    assert o.loss.dtype == torch.float32 and o.loss.dim() == 0
    for field in ("contrastive", "id_norm", "oe_norm"):
        t = getattr(o, field)
        assert t.dtype == torch.float32 and t.dim() == 0 and not t.requires_grad
    for field in ("loss", "contrastive", "id_norm", "oe_norm"):
        assert math.isclose(getattr(o, field).item(), getattr(r, field).item(),
                            rel_tol=rtol, abs_tol=atol), field
    assert _grad_err(ga, ra) <= gtol
    assert _grad_err(gb, rb) <= gtol


CASES = [
    # (N, M, d, temperature, alpha)
    (6, 0, 64, 0.5, 1.0),
    (10, 7, 128, 0.2, 0.0),
    (34, 20, 130, 0.2, 0.7),
    (64, 64, 64, 0.5, 1.0),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(case):
    return "N{}-M{}-d{}-t{}-a{}".format(*case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_float64_reference(triton_ready, case, dtype):
    n, m, d, tau, alpha = case
    z_id, z_oe = _features(n, m, d, dtype)
    ref = _reference(z_id, z_oe, tau, alpha)
    out = _run(ntxent_oe, z_id.to(DEVICE), z_oe.to(DEVICE), temperature=tau, alpha=alpha,
               backend="triton")
    assert out[1].dtype == dtype and out[2].dtype == dtype
    _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_twin_matches_float64_reference(case, dtype):
    n, m, d, tau, alpha = case
    z_id, z_oe = _features(n, m, d, dtype, seed=1)
    ref = _reference(z_id, z_oe, tau, alpha)
    out = _run(ntxent_oe, z_id, z_oe, temperature=tau, alpha=alpha, backend="torch", chunk=8)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    _check(out, ref, dtype)


@pytest.mark.parametrize("block", [None, 32])
def test_triton_tile_sizes_agree(triton_ready, block):
    z_id, z_oe = _features(34, 5, 64, torch.float32, seed=2)
    ref = _reference(z_id, z_oe, 0.3, 0.5)
    out = _run(ntxent_oe, z_id.to(DEVICE), z_oe.to(DEVICE), temperature=0.3, alpha=0.5,
               backend="triton", block=block)
    _check(out, ref, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_inputs(backend):
    if backend == "triton":
        _triton_ready()
    g = torch.Generator().manual_seed(3)
    z_id = torch.randn(40, 10, generator=g).T  # (10, 40), column-major
    z_oe = torch.randn(6, 80, generator=g)[:, ::2]  # (6, 40), strided rows
    assert not z_id.is_contiguous() and not z_oe.is_contiguous()
    ref = _reference(z_id, z_oe, 0.5, 1.0)
    out = _run(ntxent_oe, z_id.to(DEVICE), z_oe.to(DEVICE), backend=backend, chunk=4)
    _check(out, ref, torch.float32)


def test_twin_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    z_id = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z_oe = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(a, b):
        return ntxent_oe_torch(a, b, temperature=0.3, alpha=0.8, chunk=4).loss

    assert torch.autograd.gradcheck(loss, (z_id, z_oe))


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_twin_equals_dense(chunk):
    z_id, z_oe = _features(10, 4, 16, torch.float64, seed=5)
    ref = _run(ntxent_oe_dense, z_id, z_oe, temperature=0.4, alpha=0.6)
    out = _run(ntxent_oe_torch, z_id, z_oe, temperature=0.4, alpha=0.6, chunk=chunk)
    torch.testing.assert_close(out[0].loss, ref[0].loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-10, atol=1e-12)


def _plain_ntxent(z: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent written row by row, independently of the code under test."""
    z = z.double()
    n = z.shape[0]
    u = z / z.norm(dim=1, keepdim=True)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        p = (i + n // 2) % n
        logits = torch.stack([u[i] @ u[j] / tau for j in range(n) if j != i])
        total = total + torch.logsumexp(logits, 0) - u[i] @ u[p] / tau
    return total / n


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_alpha_zero_is_plain_ntxent(backend):
    if backend == "triton":
        _triton_ready()
    z_id, z_oe = _features(10, 6, 32, torch.float32, seed=6)
    out, _, g_oe = _run(ntxent_oe, z_id.to(DEVICE), z_oe.to(DEVICE), temperature=0.2,
                        alpha=0.0, backend=backend)
    expected = float(_plain_ntxent(z_id, 0.2))
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-5)
    assert out.loss.item() == float(out.contrastive)
    assert float(out.oe_norm) > 0  # still reported for logging
    assert torch.count_nonzero(g_oe) == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_contrastive_invariant_to_rescaling(backend):
    if backend == "triton":
        _triton_ready()
    z_id, z_oe = _features(12, 3, 24, torch.float32, seed=7)
    scales = torch.tensor([1e-2, 3.0, 100.0]).repeat(4)[:, None]
    base = ntxent_oe(z_id.to(DEVICE), z_oe.to(DEVICE), backend=backend)
    scaled = ntxent_oe((z_id * scales).to(DEVICE), z_oe.to(DEVICE), backend=backend)
    assert math.isclose(float(base.contrastive), float(scaled.contrastive), rel_tol=1e-5)
    assert not math.isclose(float(base.id_norm), float(scaled.id_norm), rel_tol=1e-2)


@pytest.mark.parametrize("backend", ["triton", "torch", "dense"])
def test_hand_computed_value(backend):
    if backend == "triton":
        _triton_ready()
    # Rows 0/2 and 1/3 are positive pairs; u0 = u2 = e1 and u1 = u3 = e2 whatever the
    # scales. With tau = 0.5 every row sees its positive at s = 2 and two negatives at
    # s = 0, so each row loss is log(2 + e^2) - 2. OE norms are 5 and 1, mean 3.
    z_id = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.0], [0.0, 1.0]])
    z_oe = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    contrastive = math.log(2 + math.e**2) - 2  # 0.23954...
    if backend == "dense":
        out, _, g_oe = _run(ntxent_oe_dense, z_id, z_oe, temperature=0.5, alpha=0.5)
    else:
        out, _, g_oe = _run(ntxent_oe, z_id.to(DEVICE), z_oe.to(DEVICE), temperature=0.5,
                            alpha=0.5, backend=backend)
    assert math.isclose(float(out.contrastive), contrastive, rel_tol=1e-6)
    assert math.isclose(out.loss.item(), contrastive + 0.5 * 3.0, rel_tol=1e-6)
    assert math.isclose(float(out.id_norm), (2 + 3 + 0.5 + 1) / 4, rel_tol=1e-6)
    assert math.isclose(float(out.oe_norm), 3.0, rel_tol=1e-6)
    # alpha / M * z / ||z||
    torch.testing.assert_close(g_oe.cpu(), torch.tensor([[0.15, 0.2], [0.0, 0.25]]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_rows(backend):
    if backend == "triton":
        _triton_ready()
    z_id, z_oe = _features(8, 3, 16, torch.float32, seed=8)
    z_id[3] = 0.0  # clamp path of the normalisation: u = 0, dz = du / eps
    z_oe[1] = 0.0  # norm not differentiable at 0: gradient 0, as in torch
    ref = _reference(z_id, z_oe, 0.5, 1.0)
    out = _run(ntxent_oe, z_id.to(DEVICE), z_oe.to(DEVICE), backend=backend)
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[2]).all()
    _check(out, ref, torch.float32)
    assert torch.count_nonzero(out[2][1]) == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_consistent_pair_permutation_is_invariant(backend):
    if backend == "triton":
        _triton_ready()
    # All-gathered batches interleave ranks; only the i <-> i + N/2 pairing matters.
    z_id, z_oe = _features(16, 2, 32, torch.float32, seed=9)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled = torch.cat([z_id[:8][perm], z_id[8:][perm]])
    a = ntxent_oe(z_id.to(DEVICE), z_oe.to(DEVICE), backend=backend)
    b = ntxent_oe(shuffled.to(DEVICE), z_oe.to(DEVICE), backend=backend)
    assert math.isclose(a.loss.item(), b.loss.item(), rel_tol=1e-6)


def test_none_oe_means_empty():
    z_id, _ = _features(6, 0, 8, torch.float32)
    out = ntxent_oe(z_id, None, backend="torch")
    assert float(out.oe_norm) == 0.0 and out.loss.item() == float(out.contrastive)


def test_input_validation():
    z = torch.randn(6, 8)
    with pytest.raises(ValueError, match="even"):
        ntxent_oe(torch.randn(5, 8), None)
    with pytest.raises(ValueError, match="backend"):
        ntxent_oe(z, None, backend="cuda")
    with pytest.raises(ValueError, match="temperature"):
        ntxent_oe(z, None, temperature=0.0)
    with pytest.raises(RuntimeError, match="fp32, bf16 or fp16"):
        ntxent_oe(z.double(), None, backend="triton")
    with pytest.raises(RuntimeError, match="d <= 512"):
        ntxent_oe(torch.randn(4, 513), None, backend="triton")


def test_package_imports_without_triton_and_forced_triton_needs_interpreter():
    code = (
        "import sys, torch\n"
        "import kernels\n"
        "assert 'triton' not in sys.modules, 'kernels imported triton eagerly'\n"
        "try:\n"
        "    kernels.ntxent_oe(torch.randn(4, 8), None, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert "RAISED" in proc.stdout
    if importlib.util.find_spec("triton") is not None:
        assert "TRITON_INTERPRET=1" in proc.stdout
    else:
        assert "not installed" in proc.stdout


# ---------------------------------------------------------------------------------- GPU


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_large_n_parity(triton_ready, dtype):
    n, m, d = 8192, 4096, 128
    z_id, z_oe = _features(n, m, d, dtype, seed=10)
    z_id, z_oe = z_id.cuda(), z_oe.cuda()
    # float64 dense reference on the GPU: 8192 x 8192 doubles is 512 MiB.
    ref = _run(ntxent_oe_dense, z_id.double(), z_oe.double(), temperature=0.2, alpha=0.5)
    out = _run(ntxent_oe, z_id, z_oe, temperature=0.2, alpha=0.5, backend="triton")
    _check(out, ref, dtype)


def _extra_peak_bytes(n: int, d: int = 128) -> int:
    z_id = torch.randn(n, d, device="cuda", requires_grad=True)
    z_oe = torch.randn(n // 2, d, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ntxent_oe(z_id, z_oe, backend="triton").loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@gpu
@needs_cuda
def test_gpu_peak_memory_is_linear_in_n(triton_ready):
    _extra_peak_bytes(1024)  # warm-up: compilation and allocator caches
    small, large = _extra_peak_bytes(8192), _extra_peak_bytes(16384)
    # O(N * d): doubling N at most doubles the extra memory (plus allocator rounding);
    # an N x N fp32 matrix at N = 16384 alone would be 1 GiB.
    assert large <= 2.2 * small + (1 << 20)
    assert large < 64 * (1 << 20)


def test_package_names_are_the_functions():
    """The package exports the entry points, also after the twin's module (`ntxent_oe_twin`)
    has been imported lazily."""
    import importlib

    import kernels

    importlib.import_module("kernels.ntxent_oe_twin")
    assert callable(kernels.ntxent_oe_torch) and callable(kernels.ntxent_oe)
    assert kernels.ntxent_oe_torch is ntxent_oe_torch
