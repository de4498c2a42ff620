"""Cholesky and triangular solve kernels (metalcore/linalg/cholesky_triton.py, triangular_triton.py)
against LAPACK's test ratios and torch: every size, batch shape and hard-matrix family; info and
NaN isolation per batch element; gradients through the kernels."""

import importlib
import itertools

import pytest
import torch

import metalcore
from linalg_matrices import BATCHES, DTYPES, SIZES, case_id, scale_of, solve_ratio, spd
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.linalg.triangular import solve_triangular_op
from oracle import assert_lapack_ratio, residual_ratio


def chol_module():
    return importlib.import_module("metalcore.linalg.cholesky_triton")


def trsm_module():
    return importlib.import_module("metalcore.linalg.triangular_triton")


# --- cholesky ---------------------------------------------------------------------------------

# Every size with every batch shape would be 32 interpreted launches per dtype; each size meets two
# batch shapes instead, and each batch shape meets every size across the two dtypes.
CHOL_CASES = [(b, n) for i, n in enumerate(SIZES) for b in (BATCHES[i % 4], BATCHES[(i + 1) % 4])]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n", CHOL_CASES, ids=[case_id(b, n) for b, n in CHOL_CASES])
def test_cholesky_lapack_ratio(batch, n, dtype, device):
    A = spd("random", batch, n, dtype).to(device)
    upper = n % 2 == 1
    assert cholesky_ex_op.backend_for(A, upper, False) == ("reference" if A.numel() == 0 else "triton")
    L, info = metalcore.linalg.cholesky_ex(A, upper=upper)
    assert L.shape == A.shape and L.dtype == dtype and L.is_contiguous()
    assert info.shape == batch and info.dtype == torch.int32 and not info.any()
    assert torch.equal(L, L.triu() if upper else L.tril()), "the other triangle must be exactly zero"
    recon = L.mH @ L if upper else L @ L.mH
    assert_lapack_ratio(residual_ratio(A, recon, dtype), f"cholesky {case_id(batch, n, n)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ill", "cluster", "graded", "tiny", "huge"])
def test_cholesky_hard_matrices(kind, dtype, device):
    A = spd(kind, (3,), 16, dtype).to(device)
    L, info = metalcore.linalg.cholesky_ex(A)
    assert not info.any()
    s = scale_of(kind, dtype)
    assert_lapack_ratio(residual_ratio(A / s, (L / s ** 0.5) @ (L / s ** 0.5).mT, dtype), f"cholesky {kind}")


def test_cholesky_reads_one_triangle(device):
    A = spd("random", (4,), 13, torch.float64).to(device)
    for upper in (False, True):
        garbage = A.triu() if upper else A.tril()
        garbage = garbage + (torch.full_like(A, float("nan")).tril(-1) if upper else
                             torch.full_like(A, float("nan")).triu(1))
        torch.testing.assert_close(metalcore.linalg.cholesky(garbage, upper=upper),
                                   torch.linalg.cholesky(A, upper=upper))
        transposed = A.mT.contiguous().mT  # the same values with column-major strides
        torch.testing.assert_close(metalcore.linalg.cholesky(transposed, upper=upper),
                                   torch.linalg.cholesky(A, upper=upper))


def test_cholesky_info_and_nan_stay_in_their_batch_element(device):
    A = spd("random", (6,), 9, torch.float32).to(device)
    A[1, 3, 3] = -100.0       # leading minor of order 4 is indefinite
    A[2, 5, 2] = float("nan")  # read (lower triangle): reaches the pivot of order 6
    A[4] = -A[4]              # order 1
    L, info = metalcore.linalg.cholesky_ex(A)
    assert torch.equal(info.cpu(), torch.linalg.cholesky_ex(A.cpu()).info)
    assert info.tolist() == [0, 4, 6, 0, 1, 0]
    good = [0, 3, 5]
    torch.testing.assert_close(L[good], torch.linalg.cholesky(A[good]))
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*order 4"):
        metalcore.linalg.cholesky(A)


def test_cholesky_gradient_runs_the_kernels(device, launches):
    A = spd("random", (2,), 6, torch.float64).to(device).requires_grad_()
    trsm = launches(trsm_module(), "solve_triangular_launch")
    chol = launches(chol_module(), "cholesky_launch")
    g = torch.randn(2, 6, 6, dtype=torch.float64, device=device)
    for upper in (False, True):
        ours, = torch.autograd.grad(metalcore.linalg.cholesky(A, upper=upper), A, g)
        theirs, = torch.autograd.grad(torch.linalg.cholesky(A, upper=upper), A, g)
        torch.testing.assert_close(ours, theirs)
    assert len(chol) == 2 and len(trsm) == 4


def test_cpu_tensors_really_run_the_interpreted_kernel():
    k = chol_module()._cholesky_kernel
    k.interpreted = None
    metalcore.linalg.cholesky(spd("random", (2,), 4, torch.float32))
    assert k.interpreted is not None and k.compiled is None


def test_cholesky_beyond_the_register_limit_goes_to_the_reference():
    A = torch.eye(129)
    assert cholesky_ex_op.backend_for(A, False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(128), False, False) == "triton"


# --- solve_triangular -------------------------------------------------------------------------

FLAGS = list(itertools.product([False, True], [True, False], [False, True]))
FLAG_IDS = [f"{'upper' if u else 'lower'}-{'left' if l else 'right'}{'-unit' if d else ''}" for u, l, d in FLAGS]


def triangular(batch, n, upper, dtype, device):
    A = torch.randn(*batch, n, n, dtype=torch.float64) / n ** 0.5
    A = A + torch.diag_embed(torch.sign(torch.randn(*batch, n, dtype=torch.float64)) * 2)
    return (A.triu() if upper else A.tril()).to(dtype).to(device)


def check_trsm(A, B, upper, left, unit, dtype, what):
    X = metalcore.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    assert X.shape == B.shape and X.dtype == dtype and X.is_contiguous()
    M = A.triu() if upper else A.tril()
    if unit:
        M = M - torch.diag_embed(M.diagonal(dim1=-2, dim2=-1)) + torch.eye(A.shape[-1], dtype=dtype, device=A.device)
    if left:
        ratio = solve_ratio(M, X, B, dtype)
    else:
        ratio = solve_ratio(M.mT, X.mT, B.mT, dtype)
    assert_lapack_ratio(ratio, what)
    return X


# Sizes × batch shapes × right-hand-side counts (1, a few, more than one 64-column block).
TRSM_CASES = [(b, n, k) for i, n in enumerate(SIZES)
              for b, k in ((BATCHES[i % 4], (1, 3, 70)[i % 3]), (BATCHES[(i + 2) % 4], (2, 5)[i % 2]))]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n,k", TRSM_CASES, ids=[case_id(b, n, k) for b, n, k in TRSM_CASES])
def test_solve_triangular_lapack_ratio(batch, n, k, dtype, device):
    upper, left, unit = FLAGS[(n + k) % len(FLAGS)]
    A = triangular(batch, n, upper, dtype, device)
    B = torch.randn(*batch, *((n, k) if left else (k, n)), dtype=dtype, device=device)
    assert solve_triangular_op.backend_for(A, B, upper, left, unit) == ("reference" if A.numel() == 0 else "triton")
    check_trsm(A, B, upper, left, unit, dtype, f"trsm {case_id(batch, n, k)}")


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("upper,left,unit", FLAGS, ids=FLAG_IDS)
def test_solve_triangular_every_flag(upper, left, unit, device):
    for dtype in DTYPES:
        A = triangular((3,), 17, upper, dtype, device)
        # The unread triangle (and the diagonal, when unit) holds NaN: it must never be read.
        junk = torch.full_like(A, float("nan"))
        A = A + (junk.tril(-1) if upper else junk.triu(1))
        if unit:
            A = A + torch.diag_embed(torch.full(A.shape[:-1], float("nan"), dtype=dtype, device=device))
        B = torch.randn(3, *((17, 4) if left else (4, 17)), dtype=dtype, device=device)
        X = metalcore.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
        A64 = torch.nan_to_num(A.double())
        expected = torch.linalg.solve_triangular(A64, B.double(), upper=upper, left=left, unitriangular=unit)
        torch.testing.assert_close(X.double(), expected, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                                   atol=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("upper,left,unit", FLAGS, ids=FLAG_IDS)
def test_solve_triangular_launch_keywords(upper, left, unit, device):
    """Launch shapes other than the default: several RHS blocks and matrices per program (the last
    program half empty); the unread triangle (and a unit diagonal) hold NaN."""
    A = triangular((5,), 13, upper, torch.float64, device)
    junk = torch.full_like(A, float("nan"))
    A = A + (junk.tril(-1) if upper else junk.triu(1))
    if unit:
        A = A + torch.diag_embed(torch.full(A.shape[:-1], float("nan"), dtype=A.dtype, device=device))
    B = torch.randn(5, *((13, 7) if left else (7, 13)), dtype=torch.float64, device=device)
    X = trsm_module().solve_triangular_launch(A, B, upper, left, unit, block_k=2, group_size=2)
    expected = torch.linalg.solve_triangular(torch.nan_to_num(A), B, upper=upper, left=left, unitriangular=unit)
    torch.testing.assert_close(X, expected)


def test_solve_triangular_broadcast_and_strided(device):
    L = triangular((3, 1), 9, False, torch.float64, device)
    B = torch.randn(4, 2, 9, dtype=torch.float64, device=device).mT  # (4, 9, 2), column-major
    X = metalcore.trsm(L, B)
    assert X.shape == (3, 4, 9, 2)
    torch.testing.assert_close(L @ X, B.expand(3, 4, 9, 2))


def test_solve_triangular_nan_stays_in_its_batch_element(device):
    A = triangular((5,), 8, False, torch.float32, device)
    B = torch.randn(5, 8, 3, device=device)
    A[2, 6, 1] = float("nan")
    X = metalcore.linalg.solve_triangular(A, B, upper=False)
    assert X[2].isnan().any()
    good = [0, 1, 3, 4]
    assert X[good].isfinite().all()
    torch.testing.assert_close(X[good], torch.linalg.solve_triangular(A[good], B[good], upper=False))


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_triangular_gradients(left, device, launches):
    A = triangular((2,), 5, True, torch.float64, device).requires_grad_()
    B = torch.randn(2, 5, 3, dtype=torch.float64, device=device)
    B = (B if left else B.mT.contiguous()).requires_grad_()
    calls = launches(trsm_module(), "solve_triangular_launch")
    X = metalcore.linalg.solve_triangular(A, B, upper=True, left=left)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (A, B), g)
    theirs = torch.autograd.grad(torch.linalg.solve_triangular(A, B, upper=True, left=left), (A, B), g)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)
    assert len(calls) == 2, "the backward's solve must run the kernel too"


# --- automatic selection -------------------------------------------------------------------------

@pytest.mark.parametrize("n,chosen", [(1, "triton"), (33, "triton"), (64, "triton"), (65, "reference"),
                                      (128, "reference")], ids=str)
def test_cholesky_and_trsm_are_automatic_up_to_n_64(n, chosen, monkeypatch):
    """Where the H100 measured them faster than torch (n ≤ 64) the kernels serve CUDA inputs without
    a request; beyond, cuSOLVER/cuBLAS do. CPU tensors stand in for CUDA ones: the automatic backend
    is patched to triton (the interpreter makes the kernel runnable on them)."""
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    A = torch.eye(n).expand(2, n, n)
    with metalcore.use_backend("auto"):
        assert cholesky_ex_op.backend_for(A, False, False) == chosen
        assert solve_triangular_op.backend_for(A, torch.ones(2, n, 3), False, True, False) == chosen


# --- GPU, full size ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n", [((1000,), 32), ((64,), 128), ((10000,), 3), ((100,), 64)], ids=str)
def test_gpu_cholesky_and_trsm_full_size(batch, n, dtype, device):
    for kind in ("random", "ill", "tiny", "huge"):
        A = spd(kind, batch, n, dtype).to(device)
        L, info = metalcore.linalg.cholesky_ex(A)
        assert not info.any()
        s = scale_of(kind, dtype)
        assert_lapack_ratio(residual_ratio(A / s, (L / s ** 0.5) @ (L / s ** 0.5).mT, dtype), f"cholesky {kind}")
    for upper, left, unit in FLAGS:
        A = triangular(batch, n, upper, dtype, device)
        B = torch.randn(*batch, *((n, 17) if left else (17, n)), dtype=dtype, device=device)
        check_trsm(A, B, upper, left, unit, dtype, f"trsm {upper} {left} {unit}")
