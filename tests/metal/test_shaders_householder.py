"""The Householder kernels of shaders/linalg.metal through the metal backend on CPU tensors (the shader
executor): ``geqr2``, ``householder_product``, ``larft`` and ``larfb`` in float32, judged by LAPACK's
test ratios against float64 (tests/oracle.py) over odd sizes, tall and wide shapes, batch shapes and
hard matrix families, with what each kernel must not read filled with NaN.

Matrix sides stop at METALCORE_LINALG_MAX_N (64, the float32 tile that fits Apple's 32 KiB of
threadgroup memory); larft's V may be taller (only T is held). Beyond that, and for float64, the ops
stay on the reference.
"""

import pytest
import torch

import metalcore
from metalcore import _metal
from metalcore.linalg.householder import (geqr2_op, householder_product_op, larfb_composite, larfb_op,
                                          larft_composite, larft_op)
from linalg_matrices import BATCHES, case_id, general, scale_of
from oracle import assert_lapack_ratio, eps, orthogonality_ratio, residual_ratio

F32 = torch.float32
MAX_N = _metal.constants()["METALCORE_LINALG_MAX_N"]
SIZES = (1, 2, 3, 5, 16, 31, 33, MAX_N)


def _shape(i, j):
    """Size ``i`` with the ``j``-th partner: square, or with a partner size as columns or as rows."""
    n, other = SIZES[i], SIZES[(i + 3 * j + 2) % len(SIZES)]
    return ((n, n), (n, other), (other, n))[(i + j) % 3]


# Each size meets two of the four batch shapes, and square, tall and wide shapes come in turn.
CASES = [(BATCHES[(i + j) % 4], *_shape(i, j)) for i in range(len(SIZES)) for j in (0, 2)]
CASE_IDS = [case_id(b, m, n) for b, m, n in CASES]
HARD = ("ill", "rank", "graded", "tiny", "huge")


@pytest.fixture(autouse=True)
def _metal_backend(executor):
    with metalcore.use_backend("metal"):
        yield


def diff_ratio(X, X64, n):
    """‖X − X64‖_F / (max(‖X64‖_F, 1)·n·ε), worst over the batch: a backward-stable float32 result of
    a well-conditioned product of reflectors stays O(1)."""
    if X.numel() == 0:
        return 0.0
    num = torch.linalg.matrix_norm(X.double() - X64, ord="fro")
    den = torch.linalg.matrix_norm(X64, ord="fro").clamp_min(1.0) * max(n, 1) * eps(F32)
    return (num / den).max().item()


def reflectors(batch, m, k):
    """``(V, tau)`` of a float32 QR of a random ``m × k`` matrix: the reflectors a blocked QR hands on."""
    QR, tau = torch.geqrf(torch.randn(*batch, m, k, dtype=torch.float64))
    return QR.float(), tau.float()


def nan_above(V):
    """``V`` with NaN on and above its diagonal: entries the reflector kernels must not read."""
    m, k = V.shape[-2:]
    keep = torch.ones(m, k, dtype=torch.bool).tril(-1)
    return torch.where(keep, V, torch.full_like(V, float("nan")))


# --- geqr2 ------------------------------------------------------------------------------------

def _geqr2(A):
    assert geqr2_op.backend_for(A) == ("reference" if A.numel() == 0 else "metal")
    QR, tau = metalcore.geqr2(A)
    k = min(A.shape[-2:])
    assert QR.shape == A.shape and tau.shape == (*A.shape[:-2], k) and QR.is_contiguous() and tau.is_contiguous()
    # dlarfg: tau = 0 (H = I) or 1 <= tau <= 2 (up to rounding).
    assert ((tau == 0) | ((tau >= 1 - 1e-6) & (tau <= 2 + 1e-6))).all()
    return QR, tau


def _check_geqr2(A, QR, tau, what, scale=1.0):
    """Q from our reflectors (in float64), R from our upper triangle: ‖A − QR‖ and ‖QᵀQ − I‖."""
    m, n = A.shape[-2:]
    k = min(m, n)
    Q = torch.linalg.householder_product(QR.double()[..., :k], tau.double())
    R = QR.double()[..., :k, :].triu()
    assert_lapack_ratio(residual_ratio(A.double() / scale, Q @ (R / scale), F32), f"geqr2 {what}")
    assert_lapack_ratio(orthogonality_ratio(Q, F32), f"geqr2 {what} orthogonality")


@pytest.mark.parametrize("batch,m,n", CASES, ids=CASE_IDS)
def test_geqr2_lapack_ratio(batch, m, n):
    A = general("random", batch, m, n, F32)
    QR, tau = _geqr2(A)
    _check_geqr2(A, QR, tau, case_id(batch, m, n))
    # The reflector convention is LAPACK's: R matches torch.geqrf's to float32 rounding.
    R0 = torch.geqrf(A.double())[0][..., :min(m, n), :].triu()
    assert_lapack_ratio(diff_ratio(QR[..., :min(m, n), :].triu(), R0, max(m, n)), f"geqr2 {case_id(batch, m, n)} R")


@pytest.mark.parametrize("kind", HARD)
def test_geqr2_hard_matrices(kind):
    A = general(kind, (2,), 33, 20, F32)
    QR, tau = _geqr2(A)
    assert QR.isfinite().all() and tau.isfinite().all()
    _check_geqr2(A, QR, tau, kind, scale_of(kind, F32))


def test_geqr2_zero_column_and_nan_stay_in_their_batch_element():
    A = torch.randn(4, 9, 6)
    A[1, :, 2] = 0.0            # a zero column: tau = 0 (H = I)
    A[2, 4, 3] = float("nan")
    QR, tau = _geqr2(A)
    assert tau[1, 2] == 0
    assert QR[2].isnan().any()
    good = [0, 1, 3]
    assert QR[good].isfinite().all() and tau[good].isfinite().all()
    _check_geqr2(A[good], QR[good], tau[good], "zero column")


# --- householder_product ------------------------------------------------------------------------

# (batch, m, n, k): square, tall, fewer reflectors than columns (k < n), none, and the size limit.
HP_CASES = [((), 1, 1, 1), ((7,), 5, 3, 3), ((2, 3), 16, 16, 16), ((), 33, 31, 20), ((3,), 31, 5, 0),
            ((0,), 8, 8, 8), ((2,), MAX_N, MAX_N, MAX_N), ((), MAX_N, 33, 33)]


@pytest.mark.parametrize("batch,m,n,k", HP_CASES, ids=[f"{case_id(b, m, n)}-k{k}" for b, m, n, k in HP_CASES])
def test_householder_product_lapack_ratio(batch, m, n, k):
    A = general("random", batch, m, n, F32)
    QR, tau = torch.geqrf(A.double())
    QR, tau = nan_above(QR[..., :k].float()), tau[..., :k].float()
    A_in = torch.cat((QR, torch.randn(*batch, m, n - k)), dim=-1)  # columns k.. are not read
    assert householder_product_op.backend_for(A_in, tau) == ("reference" if A_in.numel() * tau.numel() == 0 else "metal")
    Q = metalcore.linalg.householder_product(A_in, tau)
    assert Q.shape == (*batch, m, n) and Q.dtype == F32 and Q.is_contiguous()
    assert_lapack_ratio(orthogonality_ratio(Q, F32), f"householder_product {case_id(batch, m, n)} orthogonality")
    Q64 = torch.linalg.householder_product(A_in.double().nan_to_num(), tau.double())
    assert_lapack_ratio(diff_ratio(Q, Q64, m), f"householder_product {case_id(batch, m, n)}")
    if k == n:  # Q R reproduces A
        R = torch.geqrf(A.double())[0][..., :n, :].triu()
        assert_lapack_ratio(residual_ratio(A, Q.double() @ R, F32), f"householder_product {case_id(batch, m, n)} QR")


def test_householder_product_zero_tau_is_identity_factor():
    V, tau = reflectors((3,), 9, 4)
    tau[1, 2] = 0.0
    Q = metalcore.linalg.householder_product(V, tau)
    Q64 = torch.linalg.householder_product(V.double(), tau.double())
    assert_lapack_ratio(diff_ratio(Q, Q64, 9), "householder_product zero tau")


# --- larft --------------------------------------------------------------------------------------

# (batch, m, k): one reflector, square, tall, and V taller than the tile (only T is held).
LARFT_CASES = [((), 1, 1), ((7,), 5, 3), ((2, 3), 16, 16), ((), 33, 31), ((2,), 100, 5), ((0,), 8, 4),
               ((3,), 7, 0), ((), MAX_N, MAX_N), ((2,), 150, MAX_N)]


@pytest.mark.parametrize("batch,m,k", LARFT_CASES, ids=[case_id(b, m, k) for b, m, k in LARFT_CASES])
def test_larft_against_float64(batch, m, k):
    V, tau = reflectors(batch, m, k)
    V = nan_above(V)
    assert larft_op.backend_for(V, tau) == ("reference" if V.numel() == 0 else "metal")
    T = metalcore.larft(V, tau)
    assert T.shape == (*batch, k, k) and T.dtype == F32 and T.is_contiguous()
    assert not T.tril(-1).any() and T.isfinite().all(), "T is upper triangular; NaN above V's diagonal is not read"
    T64 = larft_composite(V.double().nan_to_num(), tau.double())
    assert_lapack_ratio(diff_ratio(T, T64, m), f"larft {case_id(batch, m, k)}")
    if k and batch != (0,):  # the block reflector reproduces H_1 ... H_k
        Vu = V.double().nan_to_num().tril(-1) + torch.eye(m, k, dtype=torch.float64)
        H = torch.eye(m, dtype=torch.float64) - Vu @ T.double() @ Vu.mT
        Q64 = torch.linalg.householder_product(V.double().nan_to_num(), tau.double())
        assert_lapack_ratio(diff_ratio(H[..., :k], Q64, m), f"larft {case_id(batch, m, k)} block reflector")


def test_larft_zero_tau_zeroes_its_row_and_column():
    V, tau = reflectors((2,), 12, 6)
    tau[0, 2] = 0.0
    tau[1, 0] = 0.0
    T = metalcore.larft(V, tau)
    assert not T[0, 2].any() and not T[0, :, 2].any() and not T[1, 0].any() and not T[1, :, 0].any()
    assert_lapack_ratio(diff_ratio(T, larft_composite(V.double(), tau.double()), 12), "larft zero tau")


# --- larfb --------------------------------------------------------------------------------------

FLAGS = [(left, transpose) for left in (True, False) for transpose in (False, True)]
FLAG_IDS = [f"{'left' if left else 'right'}{'-T' if transpose else ''}" for left, transpose in FLAGS]
# (batch, m, k, other side of C): a column, more columns than the threadgroup has SIMD-groups (8),
# k < m, and the size limit.
LARFB_CASES = [((), 1, 1, 1), ((7,), 5, 3, 70), ((2, 3), 16, 16, 3), ((), 33, 20, 9), ((2,), MAX_N, MAX_N, 5),
               ((0,), 6, 2, 4)]


@pytest.mark.parametrize("left,transpose", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("batch,m,k,p", LARFB_CASES, ids=[f"{case_id(b, m, k)}-C{p}" for b, m, k, p in LARFB_CASES])
def test_larfb_matches_ormqr(batch, m, k, p, left, transpose):
    V, tau = reflectors(batch, m, k)
    T = larft_composite(V.double(), tau.double())
    # NaN where the kernel must not read: above V's diagonal and below T's.
    V_in = nan_above(V)
    T_in = torch.where(torch.ones(k, k, dtype=torch.bool).triu(), T, torch.full_like(T, float("nan"))).float()
    C = torch.randn(*batch, m, p) if left else torch.randn(*batch, p, m)
    assert larfb_op.backend_for(V_in, T_in, C, left, transpose) == ("reference" if C.numel() == 0 else "metal")
    X = metalcore.larfb(V_in, T_in, C, left, transpose)
    assert X.shape == C.shape and X.dtype == F32 and X.is_contiguous()
    X64 = torch.ormqr(V.double(), tau.double(), C.double(), left, transpose)
    what = f"larfb {case_id(batch, m, k)} {'left' if left else 'right'}{' T' if transpose else ''}"
    assert_lapack_ratio(diff_ratio(X, X64, m), what)
    torch.testing.assert_close(X64, larfb_composite(V.double(), T, C.double(), left, transpose))


def test_larfb_broadcasts_and_strided_c():
    """The public function broadcasts V and T over C's batch; a transposed C needs no special case."""
    V, tau = reflectors((), 10, 4)
    T = metalcore.larft(V, tau)
    C = torch.randn(3, 7, 10).mT  # (3, 10, 7), not contiguous
    X = metalcore.larfb(V, T, C)
    X64 = torch.ormqr(V.double().expand(3, 10, 4), tau.double().expand(3, 4), C.double())
    assert_lapack_ratio(diff_ratio(X, X64, 10), "larfb broadcast")


def test_larfb_no_reflectors_returns_c():
    C = torch.randn(2, 5, 3)
    X = metalcore.larfb(torch.randn(2, 5, 0), torch.randn(2, 0, 0), C)
    assert torch.equal(X, C)


def test_gradients_run_the_shaders():
    """The forward passes run the shaders; the backward passes recompute through the composites, so
    the gradients match the reference backend's up to the forward's float32 rounding."""
    V, tau = reflectors((2,), 7, 3)
    C, gX, gQ = torch.randn(2, 7, 4), torch.randn(2, 7, 4), torch.randn(2, 7, 3)

    def grad_v():
        Vg = V.clone().requires_grad_()
        X = metalcore.larfb(Vg, metalcore.larft(Vg, tau), C)
        Q = metalcore.linalg.householder_product(Vg, tau)
        return torch.autograd.grad((X, Q), Vg, (gX, gQ))[0]

    _metal.launched.clear()
    ours = grad_v()
    assert {"larft_float", "larfb_float", "householder_product_float"} <= _metal.launched
    with metalcore.use_backend("reference"):
        theirs = grad_v()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_limits_route_to_the_reference():
    """float64 goes to the reference; float32 past the tile goes to the blocked path (still metal:
    tests/metal/test_shaders_qr_blocked.py); larft/larfb past their limits to the reference."""
    big, f64 = torch.ones(MAX_N + 1, 3), torch.ones(5, 3, dtype=torch.float64)
    assert geqr2_op.backend_for(f64) == "reference"
    assert geqr2_op.backend_for(big) == geqr2_op.backend_for(big.mT) == "metal"
    assert geqr2_op.backend_for(torch.ones(MAX_N, MAX_N)) == "metal"
    assert householder_product_op.backend_for(big, torch.ones(3)) == "metal"
    assert householder_product_op.backend_for(f64, torch.ones(3, dtype=torch.float64)) == "reference"
    assert larft_op.backend_for(torch.ones(200, MAX_N + 1), torch.ones(MAX_N + 1)) == "reference"
    assert larft_op.backend_for(torch.ones(200, MAX_N), torch.ones(MAX_N)) == "metal"
    assert larfb_op.backend_for(big, torch.ones(3, 3), torch.ones(MAX_N + 1, 2), True, False) == "reference"
    assert larfb_op.backend_for(torch.ones(5, 3), torch.ones(3, 3), torch.ones(500, 5), False, False) == "metal"
