"""Blocked Householder QR (metalcore/linalg/qr_blocked.py) forced at small sizes by a small panel
width: every panel variant, mode and shape family against LAPACK's test ratios, and against LAPACK's
own factors (same reflectors, so the same Q and R). The panels' Householder kernel runs under the
Triton interpreter."""

import importlib

import pytest
import torch

from linalg_matrices import case_id, general
from oracle import assert_lapack_ratio, orthogonality_ratio, residual_ratio

PANELS = ("kernel", "geqrf", "recursive")


@pytest.fixture
def blocked(triton_backend, monkeypatch):
    module = importlib.import_module("metalcore.linalg.qr_blocked")
    # Leaves of 4 columns, so that the recursive panel really recurses inside 8- and 16-wide panels.
    monkeypatch.setattr(module, "RECURSIVE_BASE", 4)
    return module


def check(Q, R, A, mode, what):
    dtype = A.dtype
    m, n = A.shape[-2:]
    k = min(m, n)
    Qt, Rt = torch.linalg.qr(A, mode=mode)
    assert Q.shape == Qt.shape and R.shape == Rt.shape and R.is_contiguous(), what
    assert torch.equal(R, R.triu()), f"{what}: R must be upper triangular"
    if mode == "r":
        assert Q.numel() == 0
        return
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), f"{what} QᵀQ")
    Qk = Q[..., :k] if mode == "complete" else Q
    # Scaled by max|A| first: the oracle's norms square the entries, and 1e200² overflows even float64.
    s = A.abs().amax().double().clamp_min(torch.finfo(torch.float64).tiny) if A.numel() else 1.0
    assert_lapack_ratio(residual_ratio(A.double() / s, Qk.double() @ (R[..., :k, :].double() / s), dtype),
                        f"{what} A−QR")


CASES = [((), 40, 24, 8), ((3,), 24, 40, 8), ((2, 2), 33, 33, 16), ((), 17, 5, 2), ((0,), 9, 6, 4), ((2,), 0, 3, 2)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("mode", ("reduced", "complete", "r"))
@pytest.mark.parametrize("panel", PANELS)
@pytest.mark.parametrize("batch,m,n,nb", CASES, ids=[f"{case_id(b, m, n)}-nb{nb}" for b, m, n, nb in CASES])
def test_blocked_qr_lapack_ratios(blocked, batch, m, n, nb, panel, mode, dtype):
    A = general("random", batch, m, n, dtype)
    Q, R = blocked.qr_blocked(A, mode, nb=nb, panel=panel)
    check(Q, R, A, mode, f"blocked qr {case_id(batch, m, n)} nb={nb} {panel} {mode}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("kind", ("ill", "rank", "graded", "tiny", "huge"))
def test_blocked_qr_hard_matrices(blocked, kind, dtype):
    for (m, n), panel in zip(((40, 24), (24, 40), (36, 36)), PANELS):
        A = general(kind, (2,), m, n, dtype)
        Q, R = blocked.qr_blocked(A, "reduced", nb=8, panel=panel)
        check(Q, R, A, "reduced", f"blocked qr {kind} {m}x{n} {panel}")


@pytest.mark.parametrize("panel", PANELS)
def test_blocked_qr_is_lapacks_factorization(blocked, panel):
    """Same reflectors as LAPACK's geqrf (only their grouping into panels differs): Q and R equal
    torch's, not just up to signs; and the compact form equals torch.geqrf's."""
    A = torch.randn(2, 45, 30, dtype=torch.float64)
    for got, want in zip(blocked.qr_blocked(A, "complete", nb=8, panel=panel), torch.linalg.qr(A, mode="complete")):
        torch.testing.assert_close(got, want)
    QR, tau, _ = blocked.geqrf_blocked(A, nb=8, panel=panel)
    for got, want in zip((QR, tau), torch.geqrf(A)):
        torch.testing.assert_close(got, want)


def test_blocked_householder_product_matches_orgqr(blocked):
    QR, tau = torch.geqrf(torch.randn(3, 37, 21, dtype=torch.float64))
    for k in (21, 13):
        torch.testing.assert_close(blocked.householder_product_blocked(QR, tau[..., :k], nb=8),
                                   torch.linalg.householder_product(QR, tau[..., :k]))


def test_blocked_qr_rank_deficient_columns(blocked):
    A = torch.randn(3, 30, 20, dtype=torch.float64)
    A[0, :, 9] = 0.0           # a zero column inside a panel: τ = 0 there
    A[1] = 0.0                 # all zero: Q = I
    A[2, :, 12] = A[2, :, 3]   # a column repeated across panels
    Q, R = blocked.qr_blocked(A, "complete", nb=8, panel="kernel")
    assert orthogonality_ratio(Q, torch.float64) < 30
    torch.testing.assert_close(Q[1], torch.eye(30, dtype=torch.float64))
    torch.testing.assert_close(Q[..., :20] @ R[..., :20, :], A)


def test_blocked_qr_nan_stays_in_its_batch_element(blocked):
    A = torch.randn(4, 26, 18)
    A[2, 20, 11] = float("nan")
    Q, R = blocked.qr_blocked(A, "reduced", nb=8)
    assert Q[2].isnan().any() and R[2].isnan().any()
    good = [0, 1, 3]
    for got, want in zip((Q[good], R[good]), torch.linalg.qr(A[good])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_blocked_qr_rejects_bad_parameters(blocked):
    A = torch.randn(10, 6)
    with pytest.raises(ValueError, match="panel must be one of"):
        blocked.qr_blocked(A, "reduced", nb=4, panel="tsqr")
    with pytest.raises(ValueError, match="panel='kernel' holds panels of at most 128"):
        blocked.qr_blocked(torch.randn(130, 6), "reduced", nb=4, panel="kernel")
    with pytest.raises(ValueError, match="nb must be positive"):
        blocked.qr_blocked(A, "reduced", nb=0)
