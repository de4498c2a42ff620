"""svd_lowrank: the same computation as torch.svd_lowrank (same random draw under one seed), and the
randomized range finder's error within Halko–Martinsson–Tropp's bound on decaying spectra."""

import math

import pytest
import torch

import metalcore
from cases import DTYPES
from oracle import assert_lapack_ratio, orthogonality_ratio
from metalcore.linalg.lowrank import svd_lowrank


def decaying(*shape, decay, dtype=torch.float64):
    """Random singular vectors; singular values ``decay(j)`` for j = 0, 1, ..."""
    *batch, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64))[0]
    S = decay(torch.arange(k, dtype=torch.float64))
    return ((U * S) @ V.mT).to(dtype), S


def hmt_bound(S, k, q, niter):
    """HMT 2011 Corollary 10.10: the expected spectral error of the rank-q range finder (p = q − k)."""
    p, e = q - k, 2 * niter + 1
    tail = S[k:]
    return ((1 + math.sqrt(k / (p - 1))) * tail[0] ** e
            + math.e * math.sqrt(q) / p * (tail ** (2 * e)).sum().sqrt()) ** (1 / e)


@pytest.mark.parametrize("with_mean", [False, True], ids=["M=None", "M"])
@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (3, 50, 30), (2, 2, 30, 50)], ids=str)
def test_svd_lowrank_matches_torch(shape, with_mean):
    A, _ = decaying(*shape, decay=lambda j: 0.5 ** j)
    M = torch.randn(shape[-1], dtype=torch.float64) if with_mean else None
    torch.manual_seed(7)
    U, S, V = metalcore.linalg.svd_lowrank(A, q=8, niter=2, M=M)
    torch.manual_seed(7)
    Ut, St, Vt = torch.svd_lowrank(A, q=8, niter=2, M=M)
    assert (U.shape, S.shape, V.shape) == (Ut.shape, St.shape, Vt.shape)
    torch.testing.assert_close(S, St, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ V.mT, (Ut * St.unsqueeze(-2)) @ Vt.mT, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("niter", [0, 1, 2])
@pytest.mark.parametrize("name,decay", [("geometric", lambda j: 0.7 ** j), ("polynomial", lambda j: (1 + j) ** -2.0)],
                         ids=["geometric", "polynomial"])
@pytest.mark.parametrize("m,n", [(120, 80), (80, 120)], ids=str)
def test_svd_lowrank_accuracy(m, n, name, decay, niter, dtype):
    """Orthonormal factors; the error ‖A − U S Vᵀ‖₂ at least the optimal σ_{q+1} (Eckart–Young) and
    within HMT's expected bound for k = q − 4 (seeded, so one draw is checked against the expectation,
    with a factor 2 for its spread); the leading singular values within the same bound (Weyl:
    |σ_j − s_j| ≤ ‖A − Q Qᵀ A‖₂)."""
    torch.manual_seed(0)
    A, S_exact = decaying(m, n, decay=decay, dtype=dtype)
    q, k = 12, 8
    U, S, V = svd_lowrank(A, q=q, niter=niter)
    assert U.dtype == S.dtype == V.dtype == dtype
    assert_lapack_ratio(orthogonality_ratio(U, dtype), "lowrank U")
    assert_lapack_ratio(orthogonality_ratio(V, dtype), "lowrank V")
    error = torch.linalg.matrix_norm(A.double() - (U.double() * S.double()) @ V.double().mT, ord=2).item()
    assert S_exact[q].item() * (1 - 1e-6) <= error <= 2 * hmt_bound(S_exact, k, q, niter) + 30 * torch.finfo(dtype).eps
    if niter:
        # The bound is loose for these spectra; measured: 1.07–1.6 σ_{q+1} with power steps, 2.5–3 without.
        assert error <= 2.0 * S_exact[q].item()
    # The leading 4 singular values: relative error below the bound relative to σ₄.
    lead = (S[:4].double() - S_exact[:4]).abs().max().item()
    assert lead <= 2 * hmt_bound(S_exact, k, q, niter) + 30 * torch.finfo(dtype).eps


def test_svd_lowrank_exact_for_low_rank():
    """A rank-5 matrix is recovered to rounding with q = 5."""
    A = torch.randn(3, 40, 5, dtype=torch.float64) @ torch.randn(3, 5, 30, dtype=torch.float64)
    U, S, V = svd_lowrank(A, q=5)
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ V.mT, A, atol=1e-12, rtol=0)
    torch.testing.assert_close(S, torch.linalg.svdvals(A)[..., :5], atol=1e-12, rtol=0)


def test_svd_lowrank_rejects_bad_input():
    A = torch.randn(10, 8)
    for q in (-1, 9, 2.0, True):
        with pytest.raises(ValueError, match=r"svd_lowrank: q must be an integer in \[0, min\(m, n\)\]"):
            svd_lowrank(A, q=q)
    with pytest.raises(ValueError, match=r"svd_lowrank: niter must be a non-negative integer; got -1"):
        svd_lowrank(A, niter=-1)
    with pytest.raises(TypeError, match=r"svd_lowrank: expected all tensors to have the same dtype"):
        svd_lowrank(A, M=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"svd_lowrank: A must have dtype"):
        svd_lowrank(torch.ones(4, 4, dtype=torch.int64))
