import itertools

import pytest
import torch

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous
from oracle import assert_within_torch_error

FLAGS = list(itertools.product([False, True], [True, False], [False, True]))
FLAG_IDS = [f"{'upper' if u else 'lower'}-{'left' if l else 'right'}{'-unit' if d else ''}" for u, l, d in FLAGS]


def well_conditioned_triangular(batch, n, upper, dtype):
    A = torch.randn(*batch, n, n, dtype=torch.float64) / n ** 0.5
    A = A + torch.diag_embed(torch.sign(torch.randn(*batch, n, dtype=torch.float64)) * 2)
    return (A.triu() if upper else A.tril()).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upper,left,unit", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("batch,n,k", [((), 1, 1), ((7,), 31, 5), ((2, 3), 33, 2), ((0,), 4, 3), ((), 127, 65)],
                         ids=str)
def test_solve_triangular_matches_oracle(batch, n, k, upper, left, unit, dtype):
    A = well_conditioned_triangular(batch, n, upper, dtype)
    B = torch.randn(*batch, *((n, k) if left else (k, n)), dtype=dtype)
    X = metalcore.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    expected = torch.linalg.solve_triangular(A.double(), B.double(), upper=upper, left=left, unitriangular=unit)
    same_dtype = torch.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    assert X.shape == expected.shape and X.dtype == dtype
    assert_within_torch_error(X, same_dtype, expected)


def test_trsm_defaults_to_lower_and_broadcasts():
    L = well_conditioned_triangular((3, 1), 9, False, torch.float64)
    B = torch.randn(4, 9, 2, dtype=torch.float64)
    X = metalcore.trsm(L, noncontiguous(B))
    assert X.shape == (3, 4, 9, 2)
    torch.testing.assert_close(L @ X, B.expand(3, 4, 9, 2))


@pytest.mark.parametrize("upper,left,unit", FLAGS, ids=FLAG_IDS)
def test_solve_triangular_gradcheck(upper, left, unit):
    A = well_conditioned_triangular((2,), 4, upper, torch.float64).requires_grad_()
    B = torch.randn(2, *((4, 3) if left else (3, 4)), dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: metalcore.linalg.solve_triangular(a, b, upper=upper, left=left, unitriangular=unit)
    torch.autograd.gradcheck(fn, (A, B))
    g = torch.randn_like(B)
    ours = torch.autograd.grad(fn(A, B), (A, B), g)
    theirs = torch.autograd.grad(torch.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit),
                                 (A, B), g)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)
