"""Blocked Householder QR (metalcore/linalg/qr_blocked.py) forced at small sizes by a small panel
width: every panel variant, mode and shape family against LAPACK's test ratios, and against LAPACK's
own factors (same reflectors, so the same Q and R). The panels' Householder kernel runs under the
Triton interpreter."""

import importlib

import pytest
import torch

from backends import expected_backend

import metalcore
from linalg_matrices import case_id, general
from linalg_matrices import scale_of
from metalcore import _metal
from metalcore.linalg import qr_blocked_metal
from metalcore.linalg.qr import qr_op
from oracle import assert_lapack_ratio, assert_like_torch, orthogonality_ratio, residual_ratio


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
    assert_like_torch(blocked.qr_blocked(A, "complete", nb=8, panel=panel), torch.linalg.qr, A, mode="complete")
    QR, tau, _ = blocked.geqrf_blocked(A, nb=8, panel=panel)
    assert_like_torch((QR, tau), torch.geqrf, A)


def test_blocked_householder_product_matches_orgqr(blocked):
    QR, tau = torch.geqrf(torch.randn(3, 37, 21, dtype=torch.float64))
    for k in (21, 13):
        assert_like_torch(blocked.householder_product_blocked(QR, tau[..., :k], nb=8),
                          torch.linalg.householder_product, QR, tau[..., :k])


def test_blocked_qr_rank_deficient_columns(blocked):
    A = torch.randn(3, 30, 20, dtype=torch.float64)
    A[0, :, 9] = 0.0           # a zero column inside a panel: τ = 0 there
    A[1] = 0.0                 # all zero: Q = I
    A[2, :, 12] = A[2, :, 3]   # a column repeated across panels
    Q, R = blocked.qr_blocked(A, "complete", nb=8, panel="kernel")
    assert orthogonality_ratio(Q, torch.float64) < 30
    torch.testing.assert_close(Q[1], torch.eye(30, dtype=torch.float64))
    assert_lapack_ratio(residual_ratio(A, Q[..., :20] @ R[..., :20, :], torch.float64), "rank-deficient A−QR")


def test_blocked_qr_nan_stays_in_its_batch_element(blocked):
    A = torch.randn(4, 26, 18)
    A[2, 20, 11] = float("nan")
    Q, R = blocked.qr_blocked(A, "reduced", nb=8)
    assert Q[2].isnan().any() and R[2].isnan().any()
    good = [0, 1, 3]
    assert_like_torch((Q[good], R[good]), torch.linalg.qr, A[good])


def test_blocked_qr_rejects_bad_parameters(blocked):
    A = torch.randn(10, 6)
    with pytest.raises(ValueError, match="panel must be one of"):
        blocked.qr_blocked(A, "reduced", nb=4, panel="tsqr")
    with pytest.raises(ValueError, match="panel='kernel' holds panels of at most 128"):
        blocked.qr_blocked(torch.randn(130, 6), "reduced", nb=4, panel="kernel")
    with pytest.raises(ValueError, match="nb must be positive"):
        blocked.qr_blocked(A, "reduced", nb=0)


# --- Metal shaders (executor in CI): the blocked QR's panel ---------------------------------------
# Large-matrix QR on Metal (metalcore/linalg/qr_blocked_metal.py): ``geqr2_panel_<dtype>`` of
# shaders/linalg.metal factoring each panel, ``larft``/``larfb`` as matrix products, through the
# executor on CPU tensors. The crossover and the panel width are forced small (both sides above 16
# take the blocked path, panels 8 columns wide), so that panels taller than the 64-row tile, several
# panels and a last narrower one run at test sizes; LAPACK's ratios for every mode on random,
# ill-conditioned and rank-deficient input, NaN confinement per batch element.


F32 = torch.float32
DEFAULTS = {"SMALL_MAX": qr_blocked_metal.SMALL_MAX, "NB": qr_blocked_metal.NB}
MODES = ("reduced", "complete", "r")
# (batch, m, n): tall with panels of 80..8 rows, wide (the trailing columns beyond k), one panel
# taller than the tile, square with a last panel of 1 column, a batch, an empty batch.
SHAPES = [((), 80, 40), ((), 40, 80), ((), 100, 8), ((), 33, 33), ((2, 3), 24, 18), ((0,), 20, 20)]


@pytest.fixture
def _blocked_at_small_sizes(executor, monkeypatch):
    monkeypatch.setattr(qr_blocked_metal, "SMALL_MAX", 16)
    monkeypatch.setattr(qr_blocked_metal, "NB", 8)
    with metalcore.use_backend("metal"):
        yield


def _qr(A, mode):
    assert qr_op.backend_for(A, mode) == expected_backend("metal", A, mode)
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


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_blocked_at_small_sizes")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch,m,n", SHAPES, ids=[case_id(*s) for s in SHAPES])
def test_blocked_qr_lapack_ratio(batch, m, n, mode):
    _check(general("random", batch, m, n, F32), mode, case_id(batch, m, n))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_blocked_at_small_sizes")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ("ill", "rank", "graded", "tiny", "huge"))
def test_blocked_qr_hard_matrices_metal(kind, mode):
    A = general(kind, (2,), 70, 30, F32)
    _check(A, mode, kind, scale_of(kind, F32))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_blocked_at_small_sizes")
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


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_blocked_at_small_sizes")
def test_panel_shader_matches_geqrf_on_a_strided_view():
    """The panel written back into a view of a larger matrix, as the blocked driver passes it."""
    M = torch.randn(3, 90, 30)
    P = M[:, 10:, 5:17]
    P0 = P.clone()
    tau = qr_blocked_metal.geqr2_panel_launch(P)
    assert_like_torch((P, tau), torch.geqrf, P0)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_blocked_at_small_sizes")
def test_routing_at_the_default_constants(monkeypatch):
    for name, value in DEFAULTS.items():
        monkeypatch.setattr(qr_blocked_metal, name, value)
    max_n = _metal.constants()["METALCORE_LINALG_MAX_N"]
    with metalcore.use_backend("metal"):
        for shape, kernel in (((max_n, max_n), "qr_float"), ((max_n + 1, 3), "geqr2_panel_float"),
                              ((3, max_n + 1), "geqr2_panel_float")):
            A = torch.randn(shape)
            assert qr_op.backend_for(A, "reduced") == expected_backend("metal", A, "reduced")
            _metal.launched.clear()
            metalcore.linalg.qr(A)
            assert _metal.launched == {kernel}, shape
        assert qr_op.backend_for(torch.ones(max_n + 1, 3, dtype=torch.float64), "reduced") == "reference"


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_blocked_at_small_sizes")
@pytest.mark.parametrize("m,n", [(80, 40), (40, 80), (33, 33)])
def test_geqr2_and_householder_product_take_the_blocked_path(m, n):
    """Past the tile, geqr2 gives torch.geqrf's compact form (the same reflectors, so the same
    numbers to rounding) and householder_product forms Q from it by block reflectors."""
    from metalcore.linalg.householder import geqr2_op, householder_product_op
    A = general("random", (2,), m, n, F32)
    _metal.launched.clear()
    QR, tau = geqr2_op(A)
    assert "geqr2_panel_float" in _metal.launched
    assert_like_torch((QR, tau), torch.geqrf, A)
    k = min(m, n)
    Q = householder_product_op(QR[..., :k], tau)
    assert_lapack_ratio(orthogonality_ratio(Q, F32), "householder_product orthogonality")
    R = QR[..., :k, :].triu()
    assert_lapack_ratio(residual_ratio(A.double(), Q.double() @ R.double(), F32), "geqr2 + householder_product")
