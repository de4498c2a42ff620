"""The one-sided/two-sided Jacobi kernels behind eigh and svd, on every backend that has them: the
Triton kernels (metalcore/linalg/eigh_triton.py, svd_triton.py; interpreter in CI) and the Metal
shaders (shaders/jacobi.metal; executor in CI), judged by LAPACK ratios and against torch. The ops' own
contracts are in test_eigh.py and test_svd.py."""

import functools
import importlib

import pytest
import torch

from backends import expected_backend

import metalcore
from linalg_matrices import BATCHES, orthogonal
from linalg_matrices import DTYPES, KINDS, case_id, general, scale_of, symmetric
from linalg_matrices import METAL_MAX_N as MAX_N
from metalcore import _metal
from metalcore.linalg import eigh_metal, svd_metal
from metalcore.linalg.eigh import eigh_op
from metalcore.linalg.svd import svd_op
from oracle import assert_lapack_ratio, assert_like_torch, orthogonality_ratio, residual_ratio, values_ratio


def torch_eigh_gradient(A, gL, gQ, Q):
    """torch's gradient of ``eigh`` for the cotangents ``(gL, gQ)``, its eigenvectors' signs aligned with
    ``Q`` (eigenvectors are defined up to sign)."""
    A = A.detach().requires_grad_()
    Lt, Qt = torch.linalg.eigh(A)
    sign = torch.sign((Qt.detach() * Q.detach().to(Qt.dtype)).sum(-2, keepdim=True))
    return torch.autograd.grad((Lt, Qt * sign), A, (gL, gQ))[0]


def svd_gradient(svd, A):
    """The gradient of a gauge-invariant loss (signs of singular vectors are free): S and U diag(S) Vh."""
    A = A.detach().requires_grad_()
    U, S, Vh = svd(A, full_matrices=False)
    return torch.autograd.grad(S.sum() + (U * S.unsqueeze(-2) @ Vh).square().sum(), A)[0]


EIGH_CASES = [((), 1), ((0,), 2), ((7,), 3), ((2, 3), 5), ((3,), 8), ((2,), 16), ((), 31), ((), 33)]
SVD_CASES = [((), 1, 1), ((0,), 2, 2), ((7,), 3, 3), ((2, 3), 5, 3), ((3,), 3, 5), ((2,), 8, 8), ((2,), 16, 16),
             ((), 31, 31), ((), 33, 20)]


def check_eigh(A, uplo, what, scale=1.0):
    dtype = A.dtype
    L, Q = metalcore.linalg.eigh(A, UPLO=uplo)
    assert L.shape == A.shape[:-1] and Q.shape == A.shape and Q.is_contiguous()
    assert (L[..., 1:] >= L[..., :-1]).all(), f"{what}: eigenvalues must ascend"
    sym = A.tril() + A.tril(-1).mT if uplo == "L" else A.triu() + A.triu(1).mT
    assert_lapack_ratio(residual_ratio(sym / scale, (Q * (L / scale).unsqueeze(-2)) @ Q.mT, dtype), f"{what} A−QΛQᵀ")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), f"{what} QᵀQ")
    assert_lapack_ratio(values_ratio(L.double() / scale, torch.linalg.eigvalsh(sym.double() / scale), dtype),
                        f"{what} eigenvalues")


def check_svd(A, full, what, scale=1.0):
    dtype = A.dtype
    m, n = A.shape[-2:]
    k = min(m, n)
    U, S, Vh = metalcore.linalg.svd(A, full_matrices=full)
    assert U.shape == (*A.shape[:-2], m, m if full else k) and Vh.shape == (*A.shape[:-2], n if full else k, n)
    assert (S[..., 1:] <= S[..., :-1]).all() and (S >= 0).all(), f"{what}: S must descend, non-negative"
    assert_lapack_ratio(residual_ratio(A / scale, (U[..., :k] * (S / scale).unsqueeze(-2)) @ Vh[..., :k, :], dtype),
                        f"{what} A−USVᴴ")
    assert_lapack_ratio(orthogonality_ratio(U, dtype), f"{what} UᵀU")
    assert_lapack_ratio(orthogonality_ratio(Vh, dtype, rows=True), f"{what} VVᵀ")
    assert_lapack_ratio(values_ratio(S.double() / scale, torch.linalg.svdvals(A.double() / scale), dtype),
                        f"{what} singular values")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("batch,n", EIGH_CASES, ids=[case_id(b, n) for b, n in EIGH_CASES])
def test_eigh_sizes_and_batches(batch, n, device):
    dtype = DTYPES[n % 2]
    A = symmetric("random", batch, n, dtype).to(device)
    uplo = "LU"[n % 2]
    assert eigh_op.backend_for(A, uplo, True) == expected_backend("triton", A, uplo, True)
    check_eigh(A, uplo, f"eigh {case_id(batch, n)}")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_eigh_hard_matrices(kind, dtype, device):
    A = symmetric(kind, (2,), 10, dtype).to(device)
    check_eigh(A, "L", f"eigh {kind}", scale_of(kind, dtype))


@pytest.mark.usefixtures("triton_backend")
def test_eigh_repeated_eigenvalues_and_special_matrices(device):
    A = torch.zeros(4, 6, 6, dtype=torch.float64, device=device)
    A[0] = torch.eye(6)                           # one eigenvalue of multiplicity 6
    A[1] = torch.ones(6, 6)                       # rank one: 6 and five zeros
    A[2] = torch.diag(torch.tensor([3.0, -1, 2, -1, 3, 0]))  # already diagonal, repeated, unsorted
    A[3] = torch.randn(6, 6).double()
    A[3] = A[3] + A[3].mT
    check_eigh(A, "L", "eigh special")


@pytest.mark.usefixtures("triton_backend")
def test_eigvalsh_only(device):
    A = symmetric("random", (3,), 9, torch.float64).to(device)
    assert_like_torch(metalcore.linalg.eigvalsh(A), torch.linalg.eigvalsh, A)


@pytest.mark.usefixtures("triton_backend")
def test_eigh_nan_stays_in_its_batch_element(device):
    A = symmetric("random", (4,), 6, torch.float32).to(device)
    A[2, 3, 1] = float("nan")
    L, Q = metalcore.linalg.eigh(A)
    assert L[2].isnan().all() and Q[2].isnan().all()
    good = [0, 1, 3]
    assert L[good].isfinite().all() and Q[good].isfinite().all()
    assert_like_torch(L[good], torch.linalg.eigvalsh, A[good])


@pytest.mark.usefixtures("triton_backend")
def test_eigh_non_convergence_is_nan_in_that_element(device, monkeypatch):
    """With the sweep bound at 1, matrices that need more sweeps report NaN; a diagonal one converges
    in its first sweep and is untouched."""
    monkeypatch.setattr(importlib.import_module("metalcore.linalg.eigh_triton"), "MAX_SWEEPS", 1)
    A = symmetric("random", (2,), 8, torch.float64).to(device)
    A[1] = torch.diag(torch.arange(8.0, dtype=torch.float64))
    L, Q = metalcore.linalg.eigh(A)
    assert L[0].isnan().all() and Q[0].isnan().all()
    torch.testing.assert_close(L[1], torch.arange(8.0, dtype=torch.float64, device=device))


@pytest.mark.usefixtures("triton_backend")
def test_eigh_gradient_runs_the_kernel(device, launches):
    A = symmetric("random", (2,), 5, torch.float64).to(device).requires_grad_()
    calls = launches(importlib.import_module("metalcore.linalg.eigh_triton"), "eigh_launch")
    L, Q = metalcore.linalg.eigh(A)
    gL, gQ = torch.randn_like(L), torch.randn_like(Q)
    ours, = torch.autograd.grad((L, Q), A, (gL, gQ))
    assert_like_torch(ours, torch_eigh_gradient, A, gL, gQ, Q)
    assert calls


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("batch,m,n", SVD_CASES, ids=[case_id(b, m, n) for b, m, n in SVD_CASES])
def test_svd_sizes_and_batches(batch, m, n, device):
    dtype = DTYPES[(m + n) % 2]
    A = general("random", batch, m, n, dtype).to(device)
    full = m % 2 == 1
    assert svd_op.backend_for(A, full, True) == expected_backend("triton", A, full, True)
    check_svd(A, full, f"svd {case_id(batch, m, n)}")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_svd_hard_matrices(kind, dtype, device):
    A = general(kind, (2,), 10, 7, dtype).to(device)
    check_svd(A, True, f"svd {kind}", scale_of(kind, dtype))


@pytest.mark.usefixtures("triton_backend")
def test_svd_rank_deficient_vectors_are_orthonormal(device):
    A = torch.zeros(3, 7, 5, dtype=torch.float64, device=device)
    A[1, :, 0] = 1.0                                           # rank one
    A[2] = torch.randn(7, 2, dtype=torch.float64) @ torch.randn(2, 5, dtype=torch.float64)
    check_svd(A, True, "svd rank-deficient")
    check_svd(A.mT, False, "svd rank-deficient wide")


@pytest.mark.usefixtures("triton_backend")
def test_svdvals_and_nan_isolation(device):
    A = torch.randn(4, 6, 5, device=device)
    assert_like_torch(metalcore.linalg.svdvals(A), torch.linalg.svdvals, A)
    A[1, 2, 2] = float("inf")
    U, S, Vh = metalcore.linalg.svd(A, full_matrices=False)
    assert S[1].isnan().all() and U[1].isnan().all() and Vh[1].isnan().all()
    good = [0, 2, 3]
    assert U[good].isfinite().all()
    assert_like_torch(S[good], torch.linalg.svdvals, A[good])


@pytest.mark.usefixtures("triton_backend")
def test_svd_gradient_runs_the_kernels(device, launches):
    A = torch.randn(2, 6, 4, dtype=torch.float64, device=device, requires_grad=True)
    calls = launches(importlib.import_module("metalcore.linalg.svd_triton"), "svd_launch")
    ours = svd_gradient(metalcore.linalg.svd, A)
    assert_like_torch(ours, functools.partial(svd_gradient, torch.linalg.svd), A)
    assert calls


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("n", [5, 6])
def test_round_robin_meets_every_pair_each_sweep(n, device):
    """One matrix per pair (p, q) whose only coupling is that pair: the first sweep must rotate it
    away and the second find nothing, so every matrix reports exactly 2 sweeps and no NaN. A pair the
    schedule skipped (or met twice with a stale value) would leave the coupling and show up as more
    sweeps or, with the bound, NaN. Odd n also covers the padding index."""
    pairs = [(p, q) for p in range(n) for q in range(p + 1, n)]
    sym = torch.eye(n, dtype=torch.float64).repeat(len(pairs), 1, 1) * torch.arange(1.0, n + 1, dtype=torch.float64)
    gen = torch.eye(n, dtype=torch.float64).repeat(len(pairs), 1, 1)
    for i, (p, q) in enumerate(pairs):
        sym[i, p, q] = sym[i, q, p] = 0.5
        gen[i, p, q] = 0.5                                      # columns p and q not orthogonal
    sym, gen = sym.to(device), gen.to(device)
    eigh_triton = importlib.import_module("metalcore.linalg.eigh_triton")
    svd_triton = importlib.import_module("metalcore.linalg.svd_triton")
    sweeps = torch.zeros(len(pairs), dtype=torch.int32, device=device)
    L, Q = eigh_triton.eigh_launch(sym, False, True, num_warps=2, sweeps=sweeps)
    assert sweeps.tolist() == [2] * len(pairs)
    assert_like_torch(L, torch.linalg.eigvalsh, sym)
    assert_lapack_ratio(residual_ratio(sym, (Q * L.unsqueeze(-2)) @ Q.mT, sym.dtype), "eigh A−QΛQᵀ")
    # Jacobi on A itself, and on Rᵀ of A = QR (R = A here: gen is upper triangular, so Rᵀ couples
    # rows p and q, the same pair).
    for precondition in (False, True):
        sweeps.zero_()
        U, S, Vh = svd_triton.svd_launch(gen, True, True, num_warps=2, sweeps=sweeps, precondition=precondition)
        assert sweeps.tolist() == [2] * len(pairs)
        assert_like_torch(S, torch.linalg.svdvals, gen)
        assert_lapack_ratio(residual_ratio(gen, (U * S.unsqueeze(-2)) @ Vh, gen.dtype), "svd A−USVᴴ")
        assert_lapack_ratio(orthogonality_ratio(U, gen.dtype), "svd UᵀU")
        assert_lapack_ratio(orthogonality_ratio(Vh, gen.dtype, rows=True), "svd VVᵀ")


@pytest.mark.usefixtures("triton_backend")
def test_jacobi_kernels_really_run_interpreted():
    for name, kernel, call in (("eigh_triton", "_jacobi_eigh_kernel", lambda: metalcore.linalg.eigvalsh(torch.eye(3))),
                               ("svd_triton", "_jacobi_svd_kernel", lambda: metalcore.linalg.svdvals(torch.eye(3)))):
        k = getattr(importlib.import_module(f"metalcore.linalg.{name}"), kernel)
        k.interpreted = None
        call()
        assert k.interpreted is not None and k.compiled is None


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n", [((500,), 16), ((1000,), 32), ((100,), 64), ((4096,), 8), ((64,), 128),
                                     ((10000,), 3)], ids=str)
def test_gpu_eigh_svd_full_size(batch, n, dtype, device, request):
    if n == 128 and dtype == torch.float64:
        # fp64 at n = 128 is served by cuSOLVER in automatic selection (not timed for the kernels),
        # and cuSOLVER misses the bar there on the ill-conditioned family (svd VVᵀ ratio 41.3 on the
        # H100). The fp32 case runs the Jacobi kernels and passes.
        request.node.add_marker(pytest.mark.xfail(reason="cuSOLVER at n=128 fp64: svd VVᵀ 41.3", strict=False))
    for kind in KINDS:
        s = scale_of(kind, dtype)
        check_eigh(symmetric(kind, batch, n, dtype).to(device), "L", f"eigh {kind}", s)
        check_svd(general(kind, batch, n, n, dtype).to(device), False, f"svd {kind}", s)
    check_svd(general("random", batch, n, max(n // 2, 1), dtype).to(device), True, "svd tall full")


# --- Metal shaders (executor in CI) ---------------------------------------------------------------
# shaders/jacobi.metal through the metal backend on CPU tensors (the shader executor): batched
# small-matrix eigh (two-sided Jacobi) and SVD (one-sided Jacobi, U from the QR shader) in float32,
# judged by LAPACK's test ratios (tests/oracle.py) and by eigenvalues/singular values against float64
# torch, over sizes 1 to METALCORE_LINALG_MAX_N, batch shapes, the hard matrix families of
# tests/linalg_matrices.py, repeated spectra and rank-deficient inputs; NaN/Inf and non-convergence
# stay NaN in their own batch element.
#
# Beyond METALCORE_LINALG_MAX_N (64), and for float64, the ops stay on the reference.


F32 = torch.float32
EPS = torch.finfo(F32).eps
SIZES = (1, 2, 3, 5, 8, 16, 31, 33, MAX_N)
# Each size meets two of the four batch shapes, so each batch shape meets half the sizes.
EIGH_CASES_metal = [(BATCHES[(i + j) % 4], n) for i, n in enumerate(SIZES) for j in (0, 2)]
# Tall and wide: each size meets another as its second side, once each way; then squares.
OTHER = dict(zip(SIZES, SIZES[3:] + SIZES[:3]))
SVD_CASES_metal = ([(BATCHES[i % 4], n, OTHER[n]) for i, n in enumerate(SIZES)]
             + [(BATCHES[(i + 2) % 4], OTHER[n], n) for i, n in enumerate(SIZES)]
             + [(BATCHES[i % 4], n, n) for i, n in enumerate((1, 2, 5, 33, MAX_N))])


# --- eigh -------------------------------------------------------------------------------------------

def _eigh(A, uplo="L"):
    assert eigh_op.backend_for(A, uplo, True) == expected_backend("metal", A, uplo, True)
    L, Q = metalcore.linalg.eigh(A, UPLO=uplo)
    assert L.shape == A.shape[:-1] and Q.shape == A.shape and L.dtype == Q.dtype == F32
    assert L.is_contiguous() and Q.is_contiguous()
    return L, Q


def _check_eigh(A, uplo, what, scale=1.0):
    """Ascending eigenvalues, the residual and orthogonality ratios, eigenvalues against float64.
    ``scale`` divides A and L in float64 (the ratios are scale-invariant; 1e±25 squares are not)."""
    L, Q = _eigh(A, uplo)
    assert (L[..., 1:] >= L[..., :-1]).all(), f"{what}: eigenvalues must ascend"
    sym = (A.tril() + A.tril(-1).mT if uplo == "L" else A.triu() + A.triu(1).mT).double() / scale
    L64 = L.double() / scale
    assert_lapack_ratio(residual_ratio(sym, (Q.double() * L64.unsqueeze(-2)) @ Q.double().mT, F32), f"{what} A-QLQ^T")
    assert_lapack_ratio(orthogonality_ratio(Q, F32), f"{what} Q^TQ")
    assert_lapack_ratio(values_ratio(L64, torch.linalg.eigvalsh(sym), F32), f"{what} eigenvalues")
    return L, Q


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,n", EIGH_CASES_metal, ids=[case_id(b, n) for b, n in EIGH_CASES_metal])
def test_eigh_lapack_ratio(batch, n):
    _check_eigh(symmetric("random", batch, n, F32), "LU"[n % 2], f"eigh {case_id(batch, n)}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("n", (5, 33, MAX_N))
@pytest.mark.parametrize("kind", KINDS)
def test_eigh_hard_matrices_metal(kind, n):
    A = symmetric(kind, (2,), n, F32)
    L, _ = _check_eigh(A, "L", f"eigh {kind} n={n}", scale_of(kind, F32))
    assert L.isfinite().all()


def _relative_ratio(got, expected):
    """Worst |error| / (|value| n ε) over every eigen/singular value: relative, not against the largest."""
    return ((got.double() - expected).abs() / (expected.abs() * expected.shape[-1] * EPS)).max().item()


def graded(batch, m, n):
    """``B D`` in float64: ``B`` with singular values from 1 to 10 times column scales from 1 to 1e-5.
    Relative accuracy holds up to a factor cond(B) = 10 (Demmel & Veselic 1992)."""
    s = torch.logspace(0, 1, n, dtype=torch.float64)
    B = orthogonal(batch, m)[..., :n] @ (s.unsqueeze(-1) * orthogonal(batch, n))
    return B * torch.logspace(0, -5, n, dtype=torch.float64)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_eigh_graded_spectrum_to_high_relative_accuracy():
    """The scale-invariant threshold |a_pq| <= tol sqrt(|a_pp| |a_qq|) gives every eigenvalue of a graded
    positive-definite D B D to high relative accuracy, the smallest (1e-10) included; a threshold
    against max|a| alone would leave them with errors of order eps / 1e-10."""
    G = graded((3,), 33, 33)
    A = (G.mT @ G).float()
    L, _ = _check_eigh(A, "L", "eigh graded")
    assert_lapack_ratio(_relative_ratio(L, torch.linalg.eigvalsh(A.double())), "eigh graded, relative")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_eigh_repeated_eigenvalues_and_special_matrices_metal():
    A = torch.zeros(5, 7, 7)
    A[0] = torch.eye(7)                                          # one eigenvalue of multiplicity 7
    A[1] = torch.ones(7, 7)                                      # rank one: 7 and six zeros
    A[2] = torch.diag(torch.tensor([3.0, -1, 2, -1, 3, 0, 2]))   # already diagonal, repeated, unsorted
    A[3] = torch.diag(torch.tensor([1.0, -1] * 3 + [1.0]))       # diagonal +-1: indefinite, nothing to rotate
    # A[4] = 0: every eigenvalue 0, Q = I
    L, Q = _check_eigh(A, "L", "eigh special")
    torch.testing.assert_close(L[2], torch.tensor([-1.0, -1, 0, 2, 2, 3, 3]), rtol=0, atol=0)
    assert torch.equal(L[4], torch.zeros(7)) and torch.equal(Q[4], torch.eye(7))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_eigvalsh_is_eigh_without_vectors():
    """Without eigenvectors the kernel rotates A exactly as with them: the same eigenvalues, bit for bit."""
    A = symmetric("random", (3,), 33, F32)
    assert eigh_op.backend_for(A, "U", False) == expected_backend("metal", A, "U", False)
    _metal.launched.clear()
    w = metalcore.linalg.eigvalsh(A, UPLO="U")
    assert "jacobi_eigh_float" in _metal.launched
    assert torch.equal(w, _eigh(A, "U")[0])


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_eigh_reads_one_triangle():
    A = symmetric("random", (3,), 13, F32)
    nan = torch.full_like(A, float("nan"))
    for uplo, garbage in (("L", A.tril() + nan.triu(1)), ("U", A.triu() + nan.tril(-1))):
        L, _ = _eigh(garbage, uplo)
        torch.testing.assert_close(L, _eigh(A, uplo)[0], rtol=0, atol=0)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_eigh_broadcast_and_strided_inputs():
    S = symmetric("random", (2,), 9, F32)
    A = S.unsqueeze(0).expand(3, 2, 9, 9)                        # stride 0 over the first dimension
    L, Q = _check_eigh(A, "L", "eigh broadcast")
    assert torch.equal(L[0], L[2]) and L.shape == (3, 2, 9)
    _check_eigh(symmetric("random", (2,), 18, F32)[..., ::2, ::2], "U", "eigh strided")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_eigh_nan_and_inf_stay_in_their_batch_element():
    A = symmetric("random", (5,), 6, F32)
    A[1, 3, 1] = float("nan")   # read (lower triangle)
    A[3, 4, 4] = float("inf")
    A[4, 1, 3] = float("nan")   # in the unread (upper) triangle: harmless
    L, Q = _eigh(A)
    assert L[[1, 3]].isnan().all() and Q[[1, 3]].isnan().all()
    good = [0, 2, 4]
    assert L[good].isfinite().all() and Q[good].isfinite().all()
    assert_like_torch(L[good], torch.linalg.eigvalsh, A[good])


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_eigh_non_convergence_is_nan_in_that_element_metal(monkeypatch):
    """With the sweep bound at 1, a matrix that needs more sweeps reports NaN; a diagonal one converges
    in its first sweep (no rotation) and is exact."""
    monkeypatch.setattr(eigh_metal, "MAX_SWEEPS", 1)
    A = symmetric("random", (2,), 8, F32)
    A[1] = torch.diag(torch.arange(8.0).flip(0))
    L, Q = _eigh(A)
    assert L[0].isnan().all() and Q[0].isnan().all()
    assert torch.equal(L[1], torch.arange(8.0)) and torch.equal(Q[1], torch.eye(8).flip(1))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_eigh_gradient_runs_the_shader():
    A = symmetric("random", (2,), 5, F32).requires_grad_()
    _metal.launched.clear()
    L, Q = metalcore.linalg.eigh(A)
    assert "jacobi_eigh_float" in _metal.launched
    gL, gQ = torch.randn_like(L), torch.randn_like(Q)
    ours, = torch.autograd.grad((L, Q), A, (gL, gQ))
    assert_like_torch(ours, torch_eigh_gradient, A, gL, gQ, Q)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_eigh_limits_route_to_the_reference():
    assert eigh_op.backend_for(torch.eye(MAX_N + 1), "L", True) == "reference"
    assert eigh_op.backend_for(torch.eye(4, dtype=torch.float64), "L", True) == "reference"
    assert eigh_op.backend_for(torch.eye(MAX_N), "L", False) == expected_backend("metal", torch.eye(MAX_N), "L", False)


# --- svd --------------------------------------------------------------------------------------------

def _svd(A, full):
    assert svd_op.backend_for(A, full, True) == expected_backend("metal", A, full, True)
    U, S, Vh = metalcore.linalg.svd(A, full_matrices=full)
    *batch, m, n = A.shape
    k = min(m, n)
    assert U.shape == (*batch, m, m if full else k) and S.shape == (*batch, k)
    assert Vh.shape == (*batch, n if full else k, n)
    assert U.is_contiguous() and S.is_contiguous() and Vh.is_contiguous()
    return U, S, Vh


def _check_svd(A, full, what, scale=1.0):
    """Descending non-negative S, the residual and both orthogonality ratios (all columns of U and
    rows of Vh, also beyond k with full_matrices), singular values against float64."""
    U, S, Vh = _svd(A, full)
    k = S.shape[-1]
    assert (S[..., 1:] <= S[..., :-1]).all() and (S >= 0).all(), f"{what}: S must descend, non-negative"
    S64 = S.double() / scale
    recon = (U[..., :k].double() * S64.unsqueeze(-2)) @ Vh[..., :k, :].double()
    assert_lapack_ratio(residual_ratio(A.double() / scale, recon, F32), f"{what} A-USVh")
    assert_lapack_ratio(orthogonality_ratio(U, F32), f"{what} U^TU")
    assert_lapack_ratio(orthogonality_ratio(Vh, F32, rows=True), f"{what} VhVh^T")
    assert_lapack_ratio(values_ratio(S64, torch.linalg.svdvals(A.double() / scale), F32), f"{what} singular values")
    return U, S, Vh


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,m,n", SVD_CASES_metal, ids=[case_id(b, m, n) for b, m, n in SVD_CASES_metal])
def test_svd_lapack_ratio(batch, m, n):
    _check_svd(general("random", batch, m, n, F32), (m + n) % 2 == 1, f"svd {case_id(batch, m, n)}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("m,n", ((33, 20), (20, 33), (MAX_N, MAX_N)), ids=lambda d: str(d))
@pytest.mark.parametrize("kind", KINDS)
def test_svd_hard_matrices_metal(kind, m, n):
    _, S, _ = _check_svd(general(kind, (2,), m, n, F32), m != n, f"svd {kind} {m}x{n}", scale_of(kind, F32))
    assert S.isfinite().all()


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_svd_graded_columns_to_high_relative_accuracy():
    """As for eigh: with the relative threshold |a_p . a_q| <= tol ||a_p|| ||a_q|| the singular values of
    B D, down to 1e-5 of the largest, are accurate relative to themselves."""
    for A in (graded((3,), 40, 33).float(), graded((3,), 33, 33).float().mT):
        _, S, _ = _check_svd(A, False, "svd graded")
        assert_lapack_ratio(_relative_ratio(S, torch.linalg.svdvals(A.double())), "svd graded, relative")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_svd_rank_deficient_vectors_are_orthonormal_metal():
    A = torch.zeros(4, 9, 6)                                     # A[0] = 0
    A[1, :, 0] = 1.0                                             # rank one
    A[2] = torch.randn(9, 2) @ torch.randn(2, 6)                 # rank two
    A[3] = torch.randn(9, 6)
    A[3, :, 4] = 0.0                                             # a zero column
    for full in (True, False):
        U, S, _ = _check_svd(A, full, f"svd rank-deficient full={full}")
        assert torch.equal(S[0], torch.zeros(6)) and (S[1, 1:] == 0).all()
        _check_svd(A.mT, full, f"svd rank-deficient wide full={full}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_svd_repeated_singular_values():
    Q1, Q2 = torch.linalg.qr(torch.randn(2, 12, 12, dtype=torch.float64)).Q
    # I; rank 8 with S = 3 (x8) and 0 (x4); 2 x a permutation (orthogonal columns: no rotation at all)
    A = torch.stack([torch.eye(12), ((Q1[:, :8] * 3.0) @ Q2[:, :8].mT).float(), torch.eye(12).roll(1, 0) * 2.0])
    _, S, _ = _check_svd(A, True, "svd repeated")
    assert torch.equal(S[0], torch.ones(12)) and torch.equal(S[2], torch.full((12,), 2.0))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_svdvals_is_svd_without_vectors():
    """Without U and V the kernel rotates A exactly as with them: the same S, bit for bit."""
    for shape in ((3, 20, 33), (3, 33, 20)):
        A = general("random", shape[:1], *shape[1:], F32)
        assert svd_op.backend_for(A, False, False) == expected_backend("metal", A, False, False)
        _metal.launched.clear()
        s = metalcore.linalg.svdvals(A)
        assert "jacobi_svd_float" in _metal.launched
        assert torch.equal(s, _svd(A, False)[1])


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_seed_svd_returns_v():
    A = general("random", (3,), 7, 4, F32)
    U, S, V = metalcore.svd(A)
    assert U.shape == (3, 7, 4) and V.shape == (3, 4, 4)
    assert_lapack_ratio(residual_ratio(A, (U.double() * S.double().unsqueeze(-2)) @ V.double().mT, F32), "seed svd")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_svd_nan_and_inf_stay_in_their_batch_element():
    for A in (torch.randn(4, 6, 5), torch.randn(4, 5, 6)):
        A[1, 2, 2] = float("inf")
        A[2, 0, 4] = float("nan")
        U, S, Vh = _svd(A, True)
        bad, good = [1, 2], [0, 3]
        assert S[bad].isnan().all() and U[bad].isnan().all() and Vh[bad].isnan().all()
        assert U[good].isfinite().all() and S[good].isfinite().all() and Vh[good].isfinite().all()
        assert_like_torch(S[good], torch.linalg.svdvals, A[good])
        assert metalcore.linalg.svdvals(A)[bad].isnan().all()


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_svd_non_convergence_is_nan_in_that_element(monkeypatch):
    """With the sweep bound at 1, a matrix that needs more sweeps reports NaN; one with orthogonal
    columns converges in its first sweep (no rotation)."""
    monkeypatch.setattr(svd_metal, "MAX_SWEEPS", 1)
    A = general("random", (2,), 8, 6, F32)
    A[1] = torch.eye(8, 6) * torch.arange(1.0, 7.0)
    U, S, Vh = _svd(A, False)
    assert S[0].isnan().all() and U[0].isnan().all() and Vh[0].isnan().all()
    assert torch.equal(S[1], torch.arange(6.0, 0.0, -1.0))
    assert_lapack_ratio(residual_ratio(A[1], (U[1] * S[1]) @ Vh[1], F32), "svd diagonal")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_svd_gradient_runs_the_shaders():
    A = torch.randn(2, 6, 4, requires_grad=True)
    _metal.launched.clear()
    ours = svd_gradient(metalcore.linalg.svd, A)
    assert {"jacobi_svd_float", "qr_float"} <= _metal.launched
    assert_like_torch(ours, functools.partial(svd_gradient, torch.linalg.svd), A)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("shape", ((2, 3, 0), (2, 0, 3), (2, 0, 0)), ids=lambda s: "x".join(map(str, s)))
def test_empty_matrices_match_torch(shape):
    A = torch.randn(shape)
    for full in (True, False):
        for ours, theirs in zip(_svd(A, full), torch.linalg.svd(A, full_matrices=full)):
            assert torch.equal(ours, theirs)
    if shape[-1] == shape[-2]:
        for ours, theirs in zip(_eigh(A), torch.linalg.eigh(A)):
            assert torch.equal(ours, theirs)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_svd_limits_route_to_the_reference():
    assert svd_op.backend_for(torch.ones(MAX_N + 1, 3), True, True) == "reference"
    assert svd_op.backend_for(torch.ones(3, MAX_N + 1), False, False) == "reference"
    assert svd_op.backend_for(torch.ones(3, 3, dtype=torch.float64), True, True) == "reference"
    assert svd_op.backend_for(torch.ones(MAX_N, MAX_N), True, True) == expected_backend("metal", torch.ones(MAX_N, MAX_N), True, True)
