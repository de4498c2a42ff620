"""Large-matrix QR on Metal (metalcore/linalg/qr_blocked_metal.py): ``geqr2_panel_<dtype>`` of
shaders/linalg.metal factoring each panel, ``larft``/``larfb`` as matrix products, through the
executor on CPU tensors. The crossover and the panel width are forced small (both sides above 16
take the blocked path, panels 8 columns wide), so that panels taller than the 64-row tile, several
panels and a last narrower one run at test sizes; LAPACK's ratios for every mode on random,
ill-conditioned and rank-deficient input, NaN confinement per batch element.
"""

import pytest
import torch

import metalcore
from metalcore import _metal
from metalcore.linalg import qr_blocked_metal
from metalcore.linalg.qr import qr_op
from linalg_matrices import case_id, general, scale_of
from oracle import assert_lapack_ratio, orthogonality_ratio, residual_ratio


F32 = torch.float32
DEFAULTS = {"SMALL_MAX": qr_blocked_metal.SMALL_MAX, "NB": qr_blocked_metal.NB}
MODES = ("reduced", "complete", "r")
# (batch, m, n): tall with panels of 80..8 rows, wide (the trailing columns beyond k), one panel
# taller than the tile, square with a last panel of 1 column, a batch, an empty batch.
SHAPES = [((), 80, 40), ((), 40, 80), ((), 100, 8), ((), 33, 33), ((2, 3), 24, 18), ((0,), 20, 20)]


@pytest.fixture(autouse=True)
def _blocked_at_small_sizes(executor, monkeypatch):
    monkeypatch.setattr(qr_blocked_metal, "SMALL_MAX", 16)
    monkeypatch.setattr(qr_blocked_metal, "NB", 8)
    with metalcore.use_backend("metal"):
        yield


def _qr(A, mode):
    assert qr_op.backend_for(A, mode) == ("reference" if A.numel() == 0 else "metal")
    _metal.launched.clear()
    Q, R = metalcore.linalg.qr(A, mode=mode)
    if A.numel():
        assert _metal.launched == {"geqr2_panel_float"}, "the blocked path, not the tile shader"
    Q0, R0 = torch.linalg.qr(A, mode=mode)
    assert Q.shape == Q0.shape and R.shape == R0.shape and Q.dtype == R.dtype == F32
    assert not R.tril(-1).any(), "R must be exactly upper triangular"
    return Q, R


def _check(A, mode, what, scale=1.0):
    Q, R = _qr(A, mode)
    if mode == "r":  # the same factorization as 'reduced' gives the same R
        torch.testing.assert_close(R, _qr(A, "reduced")[1], rtol=0, atol=0)
        return
    assert_lapack_ratio(residual_ratio(A.double() / scale, Q.double() @ (R.double() / scale), F32), f"qr {what}")
    assert_lapack_ratio(orthogonality_ratio(Q, F32), f"qr orthogonality {what}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch,m,n", SHAPES, ids=[case_id(*s) for s in SHAPES])
def test_blocked_qr_lapack_ratio(batch, m, n, mode):
    _check(general("random", batch, m, n, F32), mode, case_id(batch, m, n))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ("ill", "rank", "graded", "tiny", "huge"))
def test_blocked_qr_hard_matrices(kind, mode):
    A = general(kind, (2,), 70, 30, F32)
    _check(A, mode, kind, scale_of(kind, F32))


def test_blocked_qr_zero_column_and_nan_stay_in_their_batch_element():
    A = torch.randn(4, 70, 20)
    A[1, :, 11] = 0.0            # a zero column in the second panel: tau = 0
    A[2, 40, 3] = float("nan")
    Q, R = _qr(A, "reduced")
    assert Q[2].isnan().any() or R[2].isnan().any()
    good = [0, 1, 3]
    assert Q[good].isfinite().all() and R[good].isfinite().all()
    assert_lapack_ratio(residual_ratio(A[good].double(), Q[good].double() @ R[good].double(), F32), "qr zero column")
    assert_lapack_ratio(orthogonality_ratio(Q[good], F32), "qr zero column orthogonality")


def test_panel_shader_matches_geqrf_on_a_strided_view():
    """The panel written back into a view of a larger matrix, as the blocked driver passes it."""
    M = torch.randn(3, 90, 30)
    P = M[:, 10:, 5:17]
    want_qr, want_tau = torch.geqrf(P.double())
    tau = qr_blocked_metal.geqr2_panel_launch(P)
    torch.testing.assert_close(tau.double(), want_tau, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(P.double().triu(), want_qr.triu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(P.double().tril(-1), want_qr.tril(-1), rtol=1e-4, atol=1e-4)


def test_routing_at_the_default_constants(monkeypatch):
    for name, value in DEFAULTS.items():
        monkeypatch.setattr(qr_blocked_metal, name, value)
    max_n = _metal.constants()["METALCORE_LINALG_MAX_N"]
    with metalcore.use_backend("metal"):
        for shape, kernel in (((max_n, max_n), "qr_float"), ((max_n + 1, 3), "geqr2_panel_float"),
                              ((3, max_n + 1), "geqr2_panel_float")):
            A = torch.randn(shape)
            assert qr_op.backend_for(A, "reduced") == ("reference" if A.numel() == 0 else "metal")
            _metal.launched.clear()
            metalcore.linalg.qr(A)
            assert _metal.launched == {kernel}, shape
        assert qr_op.backend_for(torch.ones(max_n + 1, 3, dtype=torch.float64), "reduced") == "reference"


@pytest.mark.parametrize("m,n", [(80, 40), (40, 80), (33, 33)])
def test_geqr2_and_householder_product_take_the_blocked_path(m, n):
    """Past the tile, geqr2 gives torch.geqrf's compact form (the same reflectors, so the same
    numbers to rounding) and householder_product forms Q from it by block reflectors."""
    from metalcore.linalg.householder import geqr2_op, householder_product_op
    A = general("random", (2,), m, n, F32)
    _metal.launched.clear()
    QR, tau = geqr2_op(A)
    assert "geqr2_panel_float" in _metal.launched
    QR0, tau0 = torch.geqrf(A.double())
    torch.testing.assert_close(QR.double(), QR0, rtol=0, atol=1e-4)
    torch.testing.assert_close(tau.double(), tau0, rtol=0, atol=1e-5)
    k = min(m, n)
    Q = householder_product_op(QR[..., :k], tau)
    assert_lapack_ratio(orthogonality_ratio(Q, F32), "householder_product orthogonality")
    R = QR[..., :k, :].triu()
    assert_lapack_ratio(residual_ratio(A.double(), Q.double() @ R.double(), F32), "geqr2 + householder_product")
