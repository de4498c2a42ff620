"""The metal svd implementation's large-matrix route (metalcore/linalg/svd_metal.py → svd_large:
QR + QDWH polar + eigh), with its QRs on the blocked Metal QR (geqr2_panel shader) through the
executor on CPU tensors. Thresholds are forced small (Jacobi shader up to side 16, svd_large from
both sides 20, blocked QR beyond 16, panels of 8), so the route runs at test sizes; LAPACK's ratios
against float64.
"""

import pytest
import torch

import metalcore
from metalcore import _metal
from metalcore.linalg import qr_blocked_metal, svd_large, svd_metal
from metalcore.linalg.svd import svd_op
from linalg_matrices import case_id, general, scale_of
from oracle import assert_lapack_ratio, eps, orthogonality_ratio, residual_ratio


F32 = torch.float32
# Tall enough for svd_large's first QR (m > 1.15 n), near-square, wide, and a batch.
SHAPES = [((), 80, 24), ((), 30, 28), ((), 24, 60), ((2,), 40, 22)]


@pytest.fixture(autouse=True)
def _large_at_small_sizes(executor, monkeypatch):
    monkeypatch.setattr(svd_metal, "JACOBI_MAX", 16)
    monkeypatch.setattr(svd_large, "LARGE_MIN_N", 20)
    monkeypatch.setattr(qr_blocked_metal, "SMALL_MAX", 16)
    monkeypatch.setattr(qr_blocked_metal, "NB", 8)
    with metalcore.use_backend("metal"):
        yield


def _values_ratio(S, A, scale):
    """max |σ − σ₆₄| / (σ₁ max(m, n) ε): singular values to ε‖A‖ absolutely, as gesdd gives them."""
    S64 = torch.linalg.svdvals(A.double() / scale)
    err = (S.double() / scale - S64).abs().amax(-1) / (S64[..., :1].squeeze(-1) * max(A.shape[-2:]) * eps(F32))
    return err.max().item()


def _svd(A, full_matrices, compute_uv):
    assert svd_op.backend_for(A, full_matrices, compute_uv) == "metal"
    _metal.launched.clear()
    U, S, Vh = svd_op(A, full_matrices, compute_uv)
    assert "geqr2_panel_float" in _metal.launched, "svd_large's QRs run on the blocked Metal QR"
    assert "jacobi_svd_float" not in _metal.launched
    return U, S, Vh


@pytest.mark.parametrize("full_matrices", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("batch,m,n", SHAPES, ids=[case_id(*s) for s in SHAPES])
def test_large_svd_lapack_ratio(batch, m, n, full_matrices):
    A = general("random", batch, m, n, F32)
    U, S, Vh = _svd(A, full_matrices, True)
    k = min(m, n)
    assert U.shape == (*batch, m, m if full_matrices else k) and Vh.shape == (*batch, n if full_matrices else k, n)
    recon = (U[..., :k].double() * S.double().unsqueeze(-2)) @ Vh[..., :k, :].double()
    what = case_id(batch, m, n)
    assert_lapack_ratio(residual_ratio(A.double(), recon, F32), f"svd {what}")
    assert_lapack_ratio(orthogonality_ratio(U, F32), f"svd U {what}")
    assert_lapack_ratio(orthogonality_ratio(Vh, F32, rows=True), f"svd Vh {what}")
    assert_lapack_ratio(_values_ratio(S, A, 1.0), f"svd values {what}")


@pytest.mark.parametrize("kind", ("ill", "rank"))
def test_large_svd_hard_matrices(kind):
    A = general(kind, (), 70, 24, F32)
    s = scale_of(kind, F32)
    U, S, Vh = _svd(A, False, True)
    recon = (U.double() * (S.double() / s).unsqueeze(-2)) @ Vh.double()
    assert_lapack_ratio(residual_ratio(A.double() / s, recon, F32), f"svd {kind}")
    assert_lapack_ratio(orthogonality_ratio(U, F32), f"svd U {kind}")
    assert_lapack_ratio(orthogonality_ratio(Vh, F32, rows=True), f"svd Vh {kind}")
    assert_lapack_ratio(_values_ratio(S, A, s), f"svd values {kind}")


def test_large_svd_values_only():
    A = general("random", (), 60, 24, F32)
    U, S, Vh = _svd(A, False, False)
    assert U.numel() == 0 and Vh.numel() == 0
    assert_lapack_ratio(_values_ratio(S, A, 1.0), "svdvals")


def test_large_route_thresholds(monkeypatch):
    """At the default thresholds (JACOBI_MAX is the tile side)."""
    max_n = _metal.constants()["METALCORE_LINALG_MAX_N"]
    monkeypatch.setattr(svd_metal, "JACOBI_MAX", max_n)
    monkeypatch.setattr(svd_large, "LARGE_MIN_N", 1024)
    assert svd_op.backend_for(torch.ones(max_n, max_n), False, True) == "metal"  # the Jacobi shader
    assert svd_op.backend_for(torch.ones(max_n + 1, max_n + 1), False, True) == "reference"
    assert svd_op.backend_for(torch.ones(1023, 2000), False, True) == "reference"
    assert svd_op.backend_for(torch.ones(1024, 1024), False, True) == "metal"
    assert svd_op.backend_for(torch.ones(1024, 1023), False, True) == "reference"
    assert svd_op.backend_for(torch.ones(1024, 1024, dtype=torch.float64), False, True) == "reference"
