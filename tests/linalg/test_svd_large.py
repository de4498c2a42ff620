"""svd_large (QR + QDWH + eigh), the svd op's large-matrix path, run directly at small sizes on the CPU."""

import pytest
import torch

from cases import DTYPES, noncontiguous, shape_id
from linalg_matrices import KINDS, general, scale_of
from oracle import assert_lapack_ratio, assert_within_torch_error, eps, orthogonality_ratio, residual_ratio
from metalcore.linalg import svd_large as svd_large_module
from metalcore.linalg.svd_large import LARGE_MIN_N, large_supported, svd_large

# Square, tall enough for the QR-first path (m > 1.15 n), barely tall (QDWH on the m × n matrix), wide.
SHAPES = [(1, 1), (2, 1), (1, 3), (5, 5), (16, 16), (33, 16), (16, 33), (35, 31), (31, 35), (8, 3)]
BATCHES = ((), (0,), (3,), (2, 2))
CASES = [(b, m, n) for b in BATCHES for m, n in SHAPES if not (len(b) == 2 and max(m, n) > 16)]


def check_svd(A, U, S, Vh, dtype, what, full_matrices=False):
    *batch, m, n = A.shape
    k = min(m, n)
    u, v = (m, n) if full_matrices else (k, k)
    assert (U.shape, S.shape, Vh.shape) == ((*batch, m, u), (*batch, k), (*batch, v, n)), what
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert_lapack_ratio(residual_ratio(A, U[..., :k] @ torch.diag_embed(S) @ Vh[..., :k, :], dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(U, dtype), what + " U")
    assert_lapack_ratio(orthogonality_ratio(Vh, dtype, rows=True), what + " Vh")
    assert bool((S[..., :-1] >= S[..., 1:]).all()) and bool((S >= 0).all()), what + " S descending, >= 0"


@pytest.mark.parametrize("full_matrices", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n", CASES, ids=[shape_id(*c[:1], *c[1:]) for c in CASES])
def test_svd_large_lapack_ratios(batch, m, n, dtype, full_matrices):
    A = torch.randn(*batch, m, n, dtype=dtype)
    U, S, Vh = svd_large(noncontiguous(A), full_matrices, True)
    check_svd(A, U, S, Vh, dtype, f"svd_large {shape_id(batch, m, n)}", full_matrices)
    assert_within_torch_error(S, torch.linalg.svdvals(A), torch.linalg.svdvals(A.double()))
    U0, S0, Vh0 = svd_large(A, full_matrices, False)
    assert U0.shape == Vh0.shape == (0,)
    assert_within_torch_error(S0, torch.linalg.svdvals(A), torch.linalg.svdvals(A.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,n", [(16, 16), (33, 16), (16, 31)], ids=str)
def test_svd_large_hard_families(kind, m, n, dtype):
    """Ill-conditioned (κ up to 1e6 fp32 / 1e12 fp64), rank-deficient (the completion of U's columns
    for zero singular values), clustered, graded, and near the under/overflow scales."""
    A = general(kind, (2,), m, n, dtype)
    for full_matrices in (False, True):
        U, S, Vh = svd_large(A, full_matrices, True)
        # The oracle's Frobenius norm squares entries: judge the tiny/huge families at unit scale.
        s = scale_of(kind, dtype)
        check_svd(A / s, U, S / s, Vh, dtype, f"svd_large {kind} {m}x{n} {dtype}", full_matrices)
        expected = torch.linalg.svdvals(A.double() / s)
        assert (S.double() / s - expected).abs().max() <= 30 * max(m, n) * eps(dtype) * expected.amax()


def test_svd_large_rank_zero_and_empty():
    U, S, Vh = svd_large(torch.zeros(3, 20, 12), False, True)
    assert (S == 0).all()
    check_svd(torch.zeros(3, 20, 12), U, S, Vh, torch.float32, "zero matrix")
    for shape in [(0, 5), (5, 0), (2, 0, 3), (0, 4, 4)]:
        for full_matrices in (False, True):
            for got, want in zip(svd_large(torch.randn(shape), full_matrices, True),
                                 torch.linalg.svd(torch.randn(shape), full_matrices=full_matrices)):
                assert got.shape == want.shape


def test_svd_large_paths_agree(monkeypatch):
    """The QR-first path and QDWH on the tall matrix itself compute the same decomposition."""
    A = torch.randn(4, 40, 20, dtype=torch.float64)
    direct = svd_large(A, True, True)
    monkeypatch.setattr(svd_large_module, "TALL_QR_RATIO", 10.0)
    via_qdwh = svd_large(A, True, True)
    torch.testing.assert_close(via_qdwh[1], direct[1], atol=1e-13, rtol=0)
    k = 20
    torch.testing.assert_close(via_qdwh[0][..., :k] @ torch.diag_embed(via_qdwh[1]) @ via_qdwh[2],
                               direct[0][..., :k] @ torch.diag_embed(direct[1]) @ direct[2], atol=1e-12, rtol=0)
    check_svd(A, *via_qdwh, torch.float64, "direct path, full", True)


def test_large_supported():
    n = LARGE_MIN_N
    assert large_supported(torch.empty(n, n)) and large_supported(torch.empty(2, 3 * n, n, dtype=torch.float64))
    assert not large_supported(torch.empty(n - 1, 4 * n))
    assert not large_supported(torch.empty(n, n, dtype=torch.bfloat16))
