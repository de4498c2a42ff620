"""metalcore.linalg.cholesky_solve (the reference path): torch.cholesky_solve's results, shapes,
broadcasting, one-triangle reads, errors and gradients."""

import pytest
import torch

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous, shape_id
from linalg_matrices import solve_ratio
from oracle import assert_lapack_ratio


def spd(batch, n, dtype):
    X = torch.randn(*batch, n, n, dtype=torch.float64)
    return (X @ X.mT / n + torch.eye(n, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("batch,n", [(b, n) for b in BATCHES for n in SIZES], ids=lambda v: str(v))
def test_cholesky_solve_lapack_ratio(batch, n, upper, dtype):
    A = spd(batch, n, dtype)
    L = torch.linalg.cholesky(A, upper=upper)
    B = torch.randn(*batch, n, 3, dtype=dtype)
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    assert X.shape == B.shape and X.dtype == dtype
    assert_lapack_ratio(solve_ratio(A, X, B, dtype), f"cholesky_solve {shape_id(batch, n, n)}")


def test_broadcasting_noncontiguous_and_one_triangle():
    A = spd((2, 1), 7, torch.float64)
    L = torch.linalg.cholesky(A)
    B = torch.randn(4, 7, 2, dtype=torch.float64)
    garbage = L + torch.randn_like(L).triu(1)
    X = metalcore.linalg.cholesky_solve(noncontiguous(B), garbage)
    assert X.shape == (2, 4, 7, 2)
    torch.testing.assert_close(X, torch.cholesky_solve(B, L))


def test_bad_inputs():
    L = torch.linalg.cholesky(spd((2,), 4, torch.float64))
    with pytest.raises(ValueError, match="4 rows"):
        metalcore.linalg.cholesky_solve(torch.randn(2, 5, 1, dtype=torch.float64), L)
    with pytest.raises(ValueError, match="square"):
        metalcore.linalg.cholesky_solve(torch.randn(2, 4, 1, dtype=torch.float64), L[..., :3])
    with pytest.raises(ValueError, match="cannot be broadcast"):
        metalcore.linalg.cholesky_solve(torch.randn(3, 4, 1, dtype=torch.float64), L)
    with pytest.raises((TypeError, ValueError)):
        metalcore.linalg.cholesky_solve(torch.randn(2, 4, 1), L)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_gradients_match_torch(upper):
    L = torch.linalg.cholesky(spd((2,), 5, torch.float64), upper=upper).requires_grad_()
    B = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    # Only one triangle is read; like torch, the gradient is not projected onto it, so gradcheck
    # differentiates through the projection.
    project = torch.triu if upper else torch.tril
    torch.autograd.gradcheck(lambda b, f: metalcore.linalg.cholesky_solve(b, project(f), upper), (B, L))
    g = torch.randn(2, 5, 3, dtype=torch.float64)
    ours = torch.autograd.grad(metalcore.linalg.cholesky_solve(B, L, upper), (B, L), g)
    theirs = torch.autograd.grad(torch.cholesky_solve(B, L, upper=upper), (B, L), g)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)


def test_compiles_without_graph_breaks():
    L = torch.linalg.cholesky(spd((3,), 8, torch.float32))
    B = torch.randn(3, 8, 2)
    compiled = torch.compile(metalcore.linalg.cholesky_solve, fullgraph=True)
    torch.testing.assert_close(compiled(B, L), torch.cholesky_solve(B, L))
