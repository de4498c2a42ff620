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
from oracle import (assert_lapack_ratio, assert_like_torch, assert_within_torch_error, orthogonality_ratio,
                    residual_ratio)


PANELS = ("kernel", "geqrf", "recursive", "tsqr")


@pytest.fixture
def blocked(triton_backend, monkeypatch):
    module = importlib.import_module("metalcore.linalg.qr_blocked")
    # Leaves of 4 columns, so that the recursive panel really recurses inside 8- and 16-wide panels;
    # TSQR leaves of 32 rows, so that a panel of 33-45 rows is two leaves and their stacked R's.
    monkeypatch.setattr(module, "RECURSIVE_BASE", 4)
    monkeypatch.setattr(importlib.import_module("metalcore.linalg.qr_tsqr_triton"), "LEAF_ROWS", 32)
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
    for (m, n), panel in zip(((40, 24), (24, 40), (36, 36), (45, 30)), PANELS):
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


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_tsqr_panel_is_geqrf_over_many_levels(blocked, monkeypatch, dtype):
    """TSQR with leaves of 8 rows: a 300 × 4 panel goes through 4 levels of stacked R's (300 → 152 →
    76 → 40 → 20 → 12 → 8 rows), a 29 × 4 one through a zero-padded last leaf. The reconstructed
    reflectors of a full-rank panel are LAPACK's (compact form and tau equal torch.geqrf's); with a
    zero column, another valid factorization (Q's column there is any unit vector orthogonal to the
    others): H [R; 0] = A to LAPACK's ratio. T is larft's of the reflectors either way, and a NaN
    matrix keeps its NaN to itself."""
    from metalcore.linalg import householder_gemm, qr_tsqr_triton
    monkeypatch.setattr(qr_tsqr_triton, "LEAF_ROWS", 8)
    for h in (300, 29):
        A = torch.randn(3, h, 4, dtype=dtype)
        P = A.clone()
        tau, Vu, T = qr_tsqr_triton.tsqr_block(P)
        assert_like_torch((P, tau), torch.geqrf, A)
        torch.testing.assert_close(T, householder_gemm.larft_gemm(Vu, tau))
        A[1, :, 2] = 0.0
        P = A.clone()
        tau, Vu, T = qr_tsqr_triton.tsqr_block(P)
        H = torch.eye(h, dtype=dtype) - Vu @ T @ Vu.mT
        assert_lapack_ratio(residual_ratio(A.double(), H[..., :4].double() @ P[:, :4].triu().double(), dtype),
                            f"tsqr {h}x4 zero column H R")
        assert_lapack_ratio(orthogonality_ratio(H, dtype), f"tsqr {h}x4 zero column H")
        torch.testing.assert_close(T, householder_gemm.larft_gemm(Vu, tau))
    A[2, 5, 1] = float("nan")
    P = A.clone()
    tau, Vu, T = qr_tsqr_triton.tsqr_block(P)
    assert P[2].isnan().any() and not P[:2].isnan().any() and not T[:2].isnan().any()
    with pytest.raises(ValueError, match="at most 4 columns"):
        qr_tsqr_triton.tsqr_block(torch.randn(40, 5, dtype=dtype)[None])
    tau, Vu, T = qr_tsqr_triton.tsqr_block(torch.randn(0, 40, 4, dtype=dtype))
    assert tau.shape == (0, 4) and Vu.shape == (0, 40, 4) and T.shape == (0, 4, 4)


def test_blocked_qr_rejects_bad_parameters(blocked):
    A = torch.randn(10, 6)
    with pytest.raises(ValueError, match="panel must be one of"):
        blocked.qr_blocked(A, "reduced", nb=4, panel="lu")
    with pytest.raises(ValueError, match="panel='kernel' holds panels of at most 128"):
        blocked.qr_blocked(torch.randn(130, 6), "reduced", nb=4, panel="kernel")
    with pytest.raises(ValueError, match="nb must be positive"):
        blocked.qr_blocked(A, "reduced", nb=0)


# --- the tall-panel kernel (interpreter in CI): panels beyond the register tile -------------------
# metalcore/linalg/qr_panel_triton.py streams each panel through [BR, NB] tiles. Tiles of 128
# elements here (16 rows at nb = 8), so that the 40-75-row panels below take 3-5 row blocks a
# reflector: the prefetch of the next block and the rescaling of the running sums both run.


@pytest.fixture
def tall(blocked, monkeypatch):
    from metalcore.linalg import qr_panel_triton

    monkeypatch.setattr(qr_panel_triton, "TILE_ELEMENTS", {torch.float32: 128, torch.float64: 128})
    return qr_panel_triton


def panel_error(P, want, scale=1.0):
    return ((P.double() - want) / scale).abs().max().item()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("h,w", [(70, 8), (45, 13), (6, 8)], ids=str)
def test_tall_panel_is_geqrf(tall, h, w, dtype):
    """The compact form and tau of torch.geqrf, on a strided view of a larger matrix (as the blocked
    driver passes panels), with everything outside the view untouched. fp64 to rounding; fp32 within
    twice the error of torch.geqrf in fp32, both against fp64."""
    M = torch.randn(3, h + 5, w + 7, dtype=dtype)
    before = M.clone()
    P = M[:, 5:, 3:3 + w]
    want_qr, want_tau = torch.geqrf(P.double())
    torch_qr, torch_tau = torch.geqrf(P)
    tau = tall.tall_panel_launch(P)
    assert tau.shape == want_tau.shape and tau.dtype == dtype
    outside = torch.ones_like(M, dtype=torch.bool)
    outside[:, 5:, 3:3 + w] = False
    assert torch.equal(M[outside], before[outside])
    if dtype == torch.float64:
        torch.testing.assert_close(P, want_qr)
        torch.testing.assert_close(tau, want_tau)
    else:
        assert_within_torch_error(P, torch_qr, want_qr)
        assert_within_torch_error(tau, torch_tau, want_tau)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_tall_panel_scales_its_sums(tall, dtype):
    """Rows growing 1e6-fold down the panel (each row block raises the running max, so the sums are
    rescaled block after block), at the dtype's tiny and huge scales whose squares under/overflow."""
    grow = torch.logspace(-3, 3, 70, dtype=torch.float64)[:, None]
    for kind in ("tiny", "huge"):
        s = scale_of(kind, dtype)
        P64 = torch.randn(2, 70, 8, dtype=torch.float64) * grow
        P = (P64 * s).to(dtype)
        want_qr, want_tau = torch.geqrf(P64)
        tau = tall.tall_panel_launch(P)
        assert P.isfinite().all() and tau.isfinite().all(), kind
        # R scales with the panel, the reflectors (|v_i| <= 1) and tau (in [1, 2]) do not.
        bound = 30 * 70 * torch.finfo(dtype).eps
        assert panel_error(P.triu(), want_qr.triu() * s, s * want_qr.abs().amax()) < bound, kind
        assert panel_error(P.tril(-1), want_qr.tril(-1)) < bound, kind
        assert panel_error(tau, want_tau) < bound, kind


def test_tall_panel_zero_column_and_nan(tall):
    """A zero column below the diagonal: tau = 0 and the column left as it is (LAPACK's H = I); a
    NaN stays in its own panel."""
    P = torch.randn(3, 50, 8, dtype=torch.float64)
    P[0, :, 3] = 0.0   # zero after the reflectors before it too
    P[1, 20, 5] = float("nan")
    want_qr, want_tau = torch.geqrf(P[[0, 2]])
    tau = tall.tall_panel_launch(P)
    assert tau[0, 3] == 0.0
    torch.testing.assert_close(P[[0, 2]], want_qr)
    torch.testing.assert_close(tau[[0, 2]], want_tau)
    assert P[1].isnan().any()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_tall_block_reflector_is_larft(tall, dtype):
    """The block variant's Vu is the explicit unit lower trapezoid of the factored panel and T is
    larft's (the reference composite, (I + diag(τ) striu(VᵀV))⁻¹ diag(τ)); a zero τ gives a zero row
    and column of T."""
    from metalcore.linalg.householder import _unit_lower, larft_composite

    P = torch.randn(3, 50, 13, dtype=dtype)
    P[0, :, 3] = 0.0
    tau, Vu, T = tall.tall_block_launch(P)
    assert tau[0, 3] == 0.0 and not T[0, 3].any() and not T[0, :, 3].any()
    assert torch.equal(Vu, _unit_lower(P))
    want = larft_composite(Vu.double(), tau.double())
    if dtype == torch.float64:
        torch.testing.assert_close(T, want)
    else:
        assert_within_torch_error(T, larft_composite(Vu, tau), want)
    with pytest.raises(ValueError, match="at least as many rows as columns"):
        tall.tall_block_launch(torch.randn(2, 5, 8))


TALL_CASES = [((2,), 50, 24, "reduced"), ((2,), 24, 40, "complete"), ((2,), 33, 20, "r")]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("batch,m,n,mode", TALL_CASES, ids=[f"{case_id(b, m, n)}-{mode}" for b, m, n, mode in TALL_CASES])
def test_blocked_qr_tall_panels_lapack_ratios(blocked, tall, batch, m, n, mode, dtype):
    A = general("random", batch, m, n, dtype)
    Q, R = blocked.qr_blocked(A, mode, nb=8, panel="tall")
    check(Q, R, A, mode, f"blocked qr {case_id(batch, m, n)} tall {mode}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_blocked_qr_tall_panels_hard_matrices(blocked, tall, dtype):
    """One matrix of each hard family in one batch, each judged on its own (their scales differ by
    up to 1e50)."""
    kinds = ("ill", "rank", "graded", "tiny", "huge")
    A = torch.cat([general(kind, (1,), 40, 16, dtype) for kind in kinds])
    Q, R = blocked.qr_blocked(A, "reduced", nb=8, panel="tall")
    for i, kind in enumerate(kinds):
        check(Q[i], R[i], A[i], "reduced", f"blocked qr tall {kind}")


def test_blocked_qr_tall_panels_zero_columns_and_nan(blocked, tall):
    A = torch.randn(4, 40, 16)
    A[0, :, 9] = 0.0            # a zero column inside a panel: tau = 0 there
    A[1] = 0.0                  # all zero: Q = I
    A[2, 30, 11] = float("nan")
    A[3, :, 12] = A[3, :, 3]    # a column repeated across panels
    Q, R = blocked.qr_blocked(A, "reduced", nb=8, panel="tall")
    assert Q[2].isnan().any() and R[2].isnan().any()
    good = [0, 1, 3]
    assert Q[good].isfinite().all() and R[good].isfinite().all()
    torch.testing.assert_close(Q[1], torch.eye(40, 16))
    check(Q[good], R[good], A[good], "reduced", "blocked qr tall zero columns")


def test_blocked_qr_tall_panels_are_lapacks_factorization(blocked, tall):
    """Same reflectors as LAPACK's geqrf: the compact form equals torch.geqrf's."""
    A = torch.randn(2, 40, 20, dtype=torch.float64)
    QR, tau, _ = blocked.geqrf_blocked(A, nb=8, panel="tall")
    for got, want in zip((QR, tau), torch.geqrf(A)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("batch,want", [((2,), "_tall_block"), ((), "_geqrf")], ids=str)
def test_auto_panel_takes_tall_for_batches_beyond_the_tile(blocked, tall, launches, monkeypatch, batch, want):
    """'auto': panels beyond the register tile go to the tall kernel (with its block reflector) for a
    batch of at least TALL_MIN_BATCH, to torch.geqrf for a single matrix; panels that fit stay on the
    tile kernel."""
    monkeypatch.setattr(blocked, "PANEL_KERNEL_MAX", 16)
    calls = {name: launches(blocked, name) for name in ("_tall_block", "_tall", "_geqrf", "_geqr2_kernel")}
    A = torch.randn(*batch, 40, 20, dtype=torch.float64)
    QR, tau, _ = blocked.geqrf_blocked(A.reshape(-1, 40, 20), nb=8, panel="auto")
    # Panels of 40, 32 and 24 rows exceed the 16-row tile; none fits it.
    assert len(calls[want]) == 3 and sum(map(len, calls.values())) == 3
    for got, expected in zip((QR, tau), torch.geqrf(A.reshape(-1, 40, 20))):
        torch.testing.assert_close(got, expected)
    monkeypatch.setattr(blocked, "PANEL_KERNEL_MAX", 128)
    blocked.geqrf_blocked(A.reshape(-1, 40, 20), nb=8, panel="auto")
    assert len(calls["_geqr2_kernel"]) == 3


def test_tall_panel_really_runs_the_interpreted_kernel(tall):
    k = tall._tall_panel_kernel
    k.interpreted = None
    tall.tall_panel_launch(torch.randn(2, 20, 4))
    assert k.interpreted is not None and k.compiled is None


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
