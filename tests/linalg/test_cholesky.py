import pytest
import torch

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous, shape_id
from oracle import assert_lapack_ratio, residual_ratio


def spd(batch, n, dtype, cond_scale=1.0):
    X = torch.randn(*batch, n, n, dtype=torch.float64)
    return (X @ X.mT / n + cond_scale * torch.eye(n, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("batch,n", [(b, n) for b in BATCHES for n in SIZES if not (len(b) == 2 and n > 33)],
                         ids=lambda v: str(v))
def test_cholesky_lapack_ratio(batch, n, upper, dtype):
    A = spd(batch, n, dtype)
    L = metalcore.linalg.cholesky(A, upper=upper)
    assert L.shape == A.shape and L.dtype == dtype
    tri = L.triu() if upper else L.tril()
    assert torch.equal(L, tri), "the other triangle must be exactly zero"
    recon = L.mH @ L if upper else L @ L.mH
    assert_lapack_ratio(residual_ratio(A, recon, dtype), f"cholesky {shape_id(batch, n, n)}")


def test_cholesky_reads_one_triangle_and_noncontiguous():
    A = spd((4,), 17, torch.float64)
    garbage = A.tril() + torch.randn(4, 17, 17, dtype=torch.float64).triu(1)
    torch.testing.assert_close(metalcore.cholesky(garbage), torch.linalg.cholesky(A))
    torch.testing.assert_close(metalcore.cholesky(noncontiguous(A)), torch.linalg.cholesky(A))


def test_cholesky_ex_info_matches_torch():
    A = spd((5,), 6, torch.float64)
    A[1, 3, 3] = -100.0
    A[4] = -A[4]
    L, info = metalcore.linalg.cholesky_ex(A)
    assert torch.equal(info, torch.linalg.cholesky_ex(A).info)
    assert info.dtype == torch.int32
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*order 4"):
        metalcore.linalg.cholesky(A)
    with pytest.raises(torch.linalg.LinAlgError, match="batch element 1"):
        metalcore.linalg.cholesky_ex(A, check_errors=True)


@pytest.mark.parametrize("upper", [False, True])
def test_cholesky_gradient_matches_torch(upper):
    A = spd((2,), 5, torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda X: metalcore.linalg.cholesky(X @ X.mT, upper=upper), (A,))
    g = torch.randn(2, 5, 5, dtype=torch.float64)
    ours, = torch.autograd.grad(metalcore.linalg.cholesky(A, upper=upper), A, g)
    theirs, = torch.autograd.grad(torch.linalg.cholesky(A, upper=upper), A, g)
    torch.testing.assert_close(ours, theirs)


def test_cholesky_compiles_without_graph_breaks():
    A = spd((3,), 8, torch.float32)
    compiled = torch.compile(metalcore.linalg.cholesky, fullgraph=True)
    torch.testing.assert_close(compiled(A), metalcore.linalg.cholesky(A))
    with pytest.raises(torch.linalg.LinAlgError):
        compiled(-A)
