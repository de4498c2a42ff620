import pytest
import torch

from cases import BATCHES, DTYPES, noncontiguous, shape_id
from oracle import assert_lapack_ratio, assert_within_torch_error, orthogonality_ratio
from metalcore.linalg.polar import polar

SHAPES = [(1, 1), (3, 2), (2, 3), (31, 16), (16, 33), (65, 65)]
CASES = [(b, m, n) for b in BATCHES for m, n in SHAPES if not (len(b) == 2 and max(m, n) > 33)]


def torch_polar(A):
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n", CASES, ids=[shape_id(b, m, n) for b, m, n in CASES])
def test_polar_factor(batch, m, n, dtype):
    A = torch.randn(*batch, m, n, dtype=torch.float64) + 2 * torch.eye(m, n, dtype=torch.float64)
    O = polar(noncontiguous(A.to(dtype)))
    assert O.shape == A.shape and O.dtype == dtype
    assert_lapack_ratio(orthogonality_ratio(O, dtype, rows=m < n), f"polar {shape_id(batch, m, n)}")
    # For full-rank A the factor is unique, so it is compared outright with the float64 oracle.
    assert_within_torch_error(O, torch_polar(A.to(dtype)), torch_polar(A))
    # The other factor, H = Oᵀ A (A Oᵀ when wide), is symmetric positive semidefinite.
    H = (O.mT @ A.to(dtype) if m >= n else A.to(dtype) @ O.mT).double()
    if H.numel():
        torch.testing.assert_close(H, H.mT, atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=0)
        assert (torch.linalg.eigvalsh(H) > -1e-4).all()


def test_polar_rejects_bad_input():
    with pytest.raises(ValueError, match=r"metalcore.polar: method must be one of 'svd'; got 'newton_schulz'"):
        polar(torch.randn(3, 3, dtype=torch.float64), method="newton_schulz")
    with pytest.raises(TypeError, match=r"metalcore.polar: A must have dtype"):
        polar(torch.ones(3, 3, dtype=torch.int64))


@pytest.mark.parametrize("m,n", [(5, 3), (3, 5), (4, 4)], ids=str)
def test_polar_gradcheck_and_matches_torch(m, n):
    A = torch.randn(2, m, n, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(polar, (A,))
    g = torch.randn(2, m, n, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(polar(A), A, g)[0], torch.autograd.grad(torch_polar(A), A, g)[0])
