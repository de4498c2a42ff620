"""``cholesky_solve_<dtype>`` of shaders/linalg.metal through the metal backend on CPU tensors (the
shader executor): both substitutions in one dispatch, judged by LAPACK's solve ratio against
float64 over odd sizes, batch shapes, both triangles and several right-hand-side counts; the
unread triangle may hold NaN; broadcasting, NaN confinement per batch element and gradients.
"""

import pytest
import torch

import metalcore
from metalcore import _metal
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from linalg_matrices import BATCHES, case_id, solve_ratio, spd
from oracle import assert_lapack_ratio

F32 = torch.float32
MAX_N = _metal.constants()["METALCORE_LINALG_MAX_N"]
SIZES = (1, 2, 3, 5, 16, 31, 33, MAX_N)
# k = 9 and 70 give SIMD-groups several columns each (8 SIMD-groups a threadgroup).
CASES = [(BATCHES[i % 4], n, (1, 9, 70)[i % 3], i % 2 == 1) for i, n in enumerate(SIZES)]


@pytest.fixture(autouse=True)
def _metal_backend(executor):
    with metalcore.use_backend("metal"):
        yield


def _solve(B, L, upper):
    assert cholesky_solve_op.backend_for(B, L, upper) == ("reference" if B.numel() == 0 else "metal")
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    assert X.shape == B.shape and X.dtype == F32 and X.is_contiguous()
    return X


@pytest.mark.parametrize("batch,n,k,upper", CASES,
                         ids=[f"{case_id(b, n, k)}-{'upper' if u else 'lower'}" for b, n, k, u in CASES])
def test_cholesky_solve_lapack_ratio(batch, n, k, upper):
    A = spd("random", batch, n, F32)
    L = torch.linalg.cholesky(A, upper=upper)
    B = torch.randn(*batch, n, k)
    X = _solve(B, L, upper)
    assert_lapack_ratio(solve_ratio(A, X, B, F32), f"cholesky_solve {case_id(batch, n, k)}")


@pytest.mark.parametrize("kind", ("ill", "graded"))
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_cholesky_solve_hard_matrices_read_one_triangle(kind, upper):
    A = spd(kind, (3,), 33, F32)
    L = torch.linalg.cholesky(A, upper=upper)
    unread = torch.ones_like(L, dtype=torch.bool)
    unread = unread.tril(-1) if upper else unread.triu(1)
    B = torch.randn(3, 33, 4)
    X = _solve(B, torch.where(unread, float("nan"), L), upper)
    assert_lapack_ratio(solve_ratio(A, X, B, F32), f"cholesky_solve {kind}")


def test_cholesky_solve_broadcasts_and_strides():
    A = spd("random", (2, 1), 6, F32)
    L = torch.linalg.cholesky(A).mT.contiguous().mT   # column-major factor
    B = torch.randn(3, 5, 6).mT                        # (3, 6, 5), strided
    X = metalcore.linalg.cholesky_solve(B, L)
    assert X.shape == (2, 3, 6, 5)
    assert "cholesky_solve_float" in _metal.launched
    torch.testing.assert_close(X.double(), torch.cholesky_solve(B.double(), L.double()), rtol=1e-4, atol=1e-4)


def test_cholesky_solve_nan_stays_in_its_batch_element():
    A = spd("random", (4,), 9, F32)
    L = torch.linalg.cholesky(A)
    L[2, 5, 1] = float("nan")
    B = torch.randn(4, 9, 2)
    X = _solve(B, L, False)
    assert X[2].isnan().any()
    good = [0, 1, 3]
    assert not X[good].isnan().any()
    assert_lapack_ratio(solve_ratio(A[good], X[good], B[good], F32), "cholesky_solve beside a NaN factor")


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_cholesky_solve_gradients_run_the_shader(upper):
    A = spd("random", (2,), 5, F32)
    L = torch.linalg.cholesky(A, upper=upper).requires_grad_()
    B = torch.randn(2, 5, 3, requires_grad=True)
    _metal.launched.clear()
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (B, L), g)
    assert "cholesky_solve_float" in _metal.launched
    theirs = torch.autograd.grad(torch.cholesky_solve(B.double(), L.double(), upper=upper), (B, L), g.double())
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-4)


def test_cholesky_solve_limits_route_to_the_reference():
    assert cholesky_solve_op.backend_for(torch.ones(MAX_N + 1, 2), torch.eye(MAX_N + 1), False) == "reference"
    assert cholesky_solve_op.backend_for(torch.ones(4, 2, dtype=torch.float64), torch.eye(4, dtype=torch.float64),
                                         False) == "reference"
    assert cholesky_solve_op.backend_for(torch.ones(MAX_N, 500), torch.eye(MAX_N), False) == "metal"
