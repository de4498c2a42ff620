"""shaders/linalg.metal through the metal backend on CPU tensors (the shader executor): batched
small-matrix Cholesky, triangular solve and LU solve in float32, judged by LAPACK's test ratios
(tests/oracle.py) over odd sizes, batch shapes and hard matrix families, with info and NaN
confinement per batch element compared with torch.

Sizes stop at METALCORE_LINALG_MAX_N (64, the largest float32 tile that leaves room in Apple's
32 KiB of threadgroup memory); beyond it, and for float64, the ops stay on the reference.
"""

import itertools
import sys
from pathlib import Path

import pytest
import torch

import metalcore
from metalcore import _metal
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.linalg.triangular import solve_triangular_op
from oracle import assert_lapack_ratio, residual_ratio

sys.path.insert(0, str(Path(__file__).parent.parent / "triton_linalg"))
from linalg_matrices import BATCHES, case_id, general, scale_of, solve_ratio, spd  # noqa: E402

F32 = torch.float32
MAX_N = _metal.constants()["METALCORE_LINALG_MAX_N"]
SIZES = (1, 2, 3, 5, 16, 31, 33, MAX_N)
# Each size meets two batch shapes; each batch shape meets every size's neighbours.
CASES = [(BATCHES[(i + j) % 4], n) for i, n in enumerate(SIZES) for j in (0, 2)]
CASE_IDS = [case_id(b, n) for b, n in CASES]
HARD = ("ill", "cluster", "graded", "tiny", "huge")


@pytest.fixture(autouse=True)
def _metal_backend(executor):
    with metalcore.use_backend("metal"):
        yield


# --- cholesky ---------------------------------------------------------------------------------

def _cholesky(A, upper=False):
    assert cholesky_ex_op.backend_for(A, upper, False) == "metal"
    L, info = metalcore.linalg.cholesky_ex(A, upper=upper)
    assert L.shape == A.shape and L.dtype == F32 and L.is_contiguous()
    assert info.shape == A.shape[:-2] and info.dtype == torch.int32
    return L, info


@pytest.mark.parametrize("batch,n", CASES, ids=CASE_IDS)
def test_cholesky_lapack_ratio(batch, n):
    A = spd("random", batch, n, F32)
    upper = n % 2 == 1
    L, info = _cholesky(A, upper)
    assert not info.any()
    assert torch.equal(L, L.triu() if upper else L.tril()), "the other triangle must be exactly zero"
    recon = L.mH @ L if upper else L @ L.mH
    assert_lapack_ratio(residual_ratio(A, recon, F32), f"cholesky {case_id(batch, n, n)}")


@pytest.mark.parametrize("kind", HARD)
def test_cholesky_hard_matrices(kind):
    A = spd(kind, (3,), 33, F32)
    L, info = _cholesky(A)
    assert not info.any()
    s = scale_of(kind, F32)
    L64 = L.double() / s ** 0.5
    assert_lapack_ratio(residual_ratio(A.double() / s, L64 @ L64.mT, F32), f"cholesky {kind}")


def test_cholesky_reads_one_triangle():
    A = spd("random", (4,), 13, F32)
    for upper in (False, True):
        nan = torch.full_like(A, float("nan"))
        garbage = A.triu() + nan.tril(-1) if upper else A.tril() + nan.triu(1)
        L, _ = _cholesky(garbage, upper)
        torch.testing.assert_close(L, torch.linalg.cholesky(A, upper=upper), rtol=1e-5, atol=1e-5)


def test_cholesky_info_and_nan_stay_in_their_batch_element():
    A = spd("random", (6,), 9, F32)
    A[1, 3, 3] = -100.0        # leading minor of order 4 is indefinite
    A[2, 5, 2] = float("nan")  # read (lower triangle): reaches the pivot of order 6
    A[4] = -A[4]               # order 1
    L, info = _cholesky(A)
    assert torch.equal(info, torch.linalg.cholesky_ex(A).info)
    assert info.tolist() == [0, 4, 6, 0, 1, 0]
    good = [0, 3, 5]
    assert L[good].isfinite().all()
    torch.testing.assert_close(L[good], torch.linalg.cholesky(A[good]), rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*order 4"):
        metalcore.linalg.cholesky(A)


def test_cholesky_gradient_runs_the_shaders():
    A = spd("random", (2,), 6, F32).requires_grad_()
    g = torch.randn(2, 6, 6)
    _metal.launched.clear()
    ours, = torch.autograd.grad(metalcore.linalg.cholesky(A), A, g)
    assert {"cholesky_float", "trsm_float"} <= _metal.launched
    theirs, = torch.autograd.grad(torch.linalg.cholesky(A.double()), A, g.double())
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-4, atol=1e-4)


def test_cholesky_limits_route_to_the_reference():
    assert cholesky_ex_op.backend_for(torch.eye(MAX_N + 1), False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(4, dtype=torch.float64), False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(MAX_N), False, False) == "metal"


# --- solve_triangular -------------------------------------------------------------------------

FLAGS = list(itertools.product([False, True], [True, False], [False, True]))
FLAG_IDS = [f"{'upper' if u else 'lower'}-{'left' if l else 'right'}{'-unit' if d else ''}" for u, l, d in FLAGS]
# Right-hand-side counts: one, a few, and more columns than the threadgroup has SIMD-groups (8).
TRSM_CASES = [(b, n, (1, 3, 70)[i % 3]) for i, (b, n) in enumerate(CASES)]


def triangular(batch, n, upper, dtype=F32):
    A = torch.randn(*batch, n, n, dtype=torch.float64) / n ** 0.5
    A = A + torch.diag_embed(torch.sign(torch.randn(*batch, n, dtype=torch.float64)) * 2)
    return (A.triu() if upper else A.tril()).to(dtype)


def _trsm(A, B, upper, left, unit):
    assert solve_triangular_op.backend_for(A, B, upper, left, unit) == "metal"
    X = metalcore.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    assert X.shape == B.shape and X.dtype == F32 and X.is_contiguous()
    return X


def _trsm_ratio(A, X, B, upper, left, unit):
    M = A.double().triu() if upper else A.double().tril()
    if unit:
        M = M - torch.diag_embed(M.diagonal(dim1=-2, dim2=-1)) + torch.eye(A.shape[-1], dtype=torch.float64)
    return solve_ratio(M, X, B, F32) if left else solve_ratio(M.mT, X.mT, B.mT, F32)


@pytest.mark.parametrize("batch,n,k", TRSM_CASES, ids=[case_id(b, n, k) for b, n, k in TRSM_CASES])
def test_solve_triangular_lapack_ratio(batch, n, k):
    upper, left, unit = FLAGS[(n + k) % len(FLAGS)]
    A = triangular(batch, n, upper)
    B = torch.randn(*batch, *((n, k) if left else (k, n)))
    X = _trsm(A, B, upper, left, unit)
    assert_lapack_ratio(_trsm_ratio(A, X, B, upper, left, unit), f"trsm {case_id(batch, n, k)}")


@pytest.mark.parametrize("upper,left,unit", FLAGS, ids=FLAG_IDS)
def test_solve_triangular_every_flag_reads_one_triangle(upper, left, unit):
    A = triangular((3,), 33, upper)
    # The unread triangle (and the diagonal, when unit) holds NaN: it must never be read.
    junk = torch.full_like(A, float("nan"))
    A = A + (junk.tril(-1) if upper else junk.triu(1))
    if unit:
        A = A + torch.diag_embed(torch.full(A.shape[:-1], float("nan")))
    B = torch.randn(3, *((33, 9) if left else (9, 33)))
    X = _trsm(A, B, upper, left, unit)
    assert_lapack_ratio(_trsm_ratio(torch.nan_to_num(A), X, B, upper, left, unit), "trsm")


@pytest.mark.parametrize("kind", ("graded", "tiny", "huge"))
def test_solve_triangular_scaled(kind):
    # Triangular factors of hard matrices: the Cholesky factor of a graded (or tiny/huge) SPD matrix.
    L = torch.linalg.cholesky(spd(kind, (2,), 31, F32).double()).float()
    B = torch.randn(2, 31, 4) * scale_of(kind, F32)
    X = _trsm(L, B, False, True, False)
    assert X.isfinite().all()
    # The ratio is invariant to the scale of L, X and B; float64 holds the products of 1e±25 values.
    assert_lapack_ratio(_trsm_ratio(L, X, B, False, True, False), f"trsm {kind}")


def test_solve_triangular_nan_stays_in_its_batch_element():
    A = triangular((5,), 8, False)
    B = torch.randn(5, 8, 3)
    A[2, 6, 1] = float("nan")
    X = _trsm(A, B, False, True, False)
    assert X[2].isnan().any()
    good = [0, 1, 3, 4]
    assert X[good].isfinite().all()
    torch.testing.assert_close(X[good], torch.linalg.solve_triangular(A[good], B[good], upper=False))


def test_solve_triangular_broadcast_and_strided():
    L = triangular((3, 1), 9, False)
    B = torch.randn(4, 2, 9).mT  # (4, 9, 2), column-major
    assert solve_triangular_op.backend_for(*torch.broadcast_tensors(L[..., :1], B[..., :1]), False, True, False)
    X = metalcore.trsm(L, B)
    assert X.shape == (3, 4, 9, 2)
    torch.testing.assert_close(L @ X, B.expand(3, 4, 9, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_triangular_gradients(left):
    A = triangular((2,), 5, True).requires_grad_()
    B = torch.randn(2, 5, 3)
    B = (B if left else B.mT.contiguous()).requires_grad_()
    _metal.launched.clear()
    X = metalcore.linalg.solve_triangular(A, B, upper=True, left=left)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (A, B), g)
    assert "trsm_float" in _metal.launched
    theirs = torch.autograd.grad(torch.linalg.solve_triangular(A.double(), B.double(), upper=True, left=left),
                                 (A, B), g.double())
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o.double(), t.double(), rtol=1e-4, atol=1e-4)


def test_solve_triangular_limits_route_to_the_reference():
    big, b = torch.eye(MAX_N + 1), torch.ones(MAX_N + 1, 2)
    assert solve_triangular_op.backend_for(big, b, False, True, False) == "reference"
    assert solve_triangular_op.backend_for(big.double()[:4, :4], b.double()[:4], False, True, False) == "reference"
    assert solve_triangular_op.backend_for(torch.eye(MAX_N), torch.ones(MAX_N, 500), False, True, False) == "metal"
