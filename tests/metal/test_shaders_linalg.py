"""shaders/linalg.metal through the metal backend on CPU tensors (the shader executor): batched
small-matrix Cholesky, triangular solve, LU solve and Householder QR in float32, judged by LAPACK's
test ratios (tests/oracle.py) over odd sizes, batch shapes and hard matrix families, with info and
NaN confinement per batch element compared with torch.

Sizes stop at METALCORE_LINALG_MAX_N (64, the largest float32 tile that leaves room in Apple's
32 KiB of threadgroup memory); beyond it, and for float64, the ops stay on the reference.
"""

import itertools

import pytest
import torch

import metalcore
from metalcore import _metal
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.linalg.qr import qr_op
from metalcore.linalg.solve import solve_ex_op
from metalcore.linalg.triangular import solve_triangular_op
from linalg_matrices import BATCHES, case_id, general, scale_of, solve_ratio, spd
from oracle import assert_lapack_ratio, orthogonality_ratio, residual_ratio

F32 = torch.float32
MAX_N = _metal.constants()["METALCORE_LINALG_MAX_N"]
SIZES = (1, 2, 3, 5, 16, 31, 33, MAX_N)
# Each size meets two of the four batch shapes (i and i + 2 mod 4), so each batch shape meets half
# the sizes, and every op's cases include (), (0,), (7,) and (2, 3) and the size limit.
CASES = [(BATCHES[(i + j) % 4], n) for i, n in enumerate(SIZES) for j in (0, 2)]
CASE_IDS = [case_id(b, n) for b, n in CASES]
HARD = ("ill", "cluster", "graded", "tiny", "huge")


@pytest.fixture(autouse=True)
def _metal_backend(executor):
    with metalcore.use_backend("metal"):
        yield


# --- cholesky ---------------------------------------------------------------------------------

def _cholesky(A, upper=False):
    assert cholesky_ex_op.backend_for(A, upper, False) == ("reference" if A.numel() == 0 else "metal")
    L, info = metalcore.linalg.cholesky_ex(A, upper=upper)
    assert L.shape == A.shape and L.dtype == F32 and L.is_contiguous()
    assert info.shape == A.shape[:-2] and info.dtype == torch.int32
    return L, info


@pytest.mark.parametrize("batch,n", CASES, ids=CASE_IDS)
def test_cholesky_lapack_ratio(batch, n):
    A = spd("random", batch, n, F32)
    upper = n % 2 == 1
    L, info = _cholesky(A, upper)
    assert not info.any()
    assert torch.equal(L, L.triu() if upper else L.tril()), "the other triangle must be exactly zero"
    recon = L.mH @ L if upper else L @ L.mH
    assert_lapack_ratio(residual_ratio(A, recon, F32), f"cholesky {case_id(batch, n, n)}")


@pytest.mark.parametrize("kind", HARD)
def test_cholesky_hard_matrices(kind):
    A = spd(kind, (3,), 33, F32)
    L, info = _cholesky(A)
    assert not info.any()
    s = scale_of(kind, F32)
    L64 = L.double() / s ** 0.5
    assert_lapack_ratio(residual_ratio(A.double() / s, L64 @ L64.mT, F32), f"cholesky {kind}")


def test_cholesky_reads_one_triangle():
    A = spd("random", (4,), 13, F32)
    for upper in (False, True):
        nan = torch.full_like(A, float("nan"))
        garbage = A.triu() + nan.tril(-1) if upper else A.tril() + nan.triu(1)
        L, _ = _cholesky(garbage, upper)
        torch.testing.assert_close(L, torch.linalg.cholesky(A, upper=upper), rtol=1e-5, atol=1e-5)


def test_cholesky_info_and_nan_stay_in_their_batch_element():
    A = spd("random", (6,), 9, F32)
    A[1, 3, 3] = -100.0        # leading minor of order 4 is indefinite
    A[2, 5, 2] = float("nan")  # read (lower triangle): reaches the pivot of order 6
    A[4] = -A[4]               # order 1
    L, info = _cholesky(A)
    assert torch.equal(info, torch.linalg.cholesky_ex(A).info)
    assert info.tolist() == [0, 4, 6, 0, 1, 0]
    good = [0, 3, 5]
    assert L[good].isfinite().all()
    torch.testing.assert_close(L[good], torch.linalg.cholesky(A[good]), rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*order 4"):
        metalcore.linalg.cholesky(A)


def test_cholesky_gradient_runs_the_shaders():
    A = spd("random", (2,), 6, F32).requires_grad_()
    g = torch.randn(2, 6, 6)
    _metal.launched.clear()
    ours, = torch.autograd.grad(metalcore.linalg.cholesky(A), A, g)
    assert {"cholesky_float", "trsm_float"} <= _metal.launched
    theirs, = torch.autograd.grad(torch.linalg.cholesky(A.double()), A, g.double())
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-4, atol=1e-4)


def test_cholesky_limits_route_to_the_reference():
    assert cholesky_ex_op.backend_for(torch.eye(MAX_N + 1), False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(4, dtype=torch.float64), False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(MAX_N), False, False) == "metal"


# --- solve_triangular -------------------------------------------------------------------------

FLAGS = list(itertools.product([False, True], [True, False], [False, True]))
FLAG_IDS = [f"{'upper' if u else 'lower'}-{'left' if l else 'right'}{'-unit' if d else ''}" for u, l, d in FLAGS]
# Right-hand-side counts: one, a few, and more columns than the threadgroup has SIMD-groups (8).
TRSM_CASES = [(b, n, (1, 3, 70)[i % 3]) for i, (b, n) in enumerate(CASES)]


def triangular(batch, n, upper, dtype=F32):
    A = torch.randn(*batch, n, n, dtype=torch.float64) / n ** 0.5
    A = A + torch.diag_embed(torch.sign(torch.randn(*batch, n, dtype=torch.float64)) * 2)
    return (A.triu() if upper else A.tril()).to(dtype)


def _trsm(A, B, upper, left, unit):
    assert solve_triangular_op.backend_for(A, B, upper, left, unit) == ("reference" if A.numel() == 0 else "metal")
    X = metalcore.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    assert X.shape == B.shape and X.dtype == F32 and X.is_contiguous()
    return X


def _trsm_ratio(A, X, B, upper, left, unit):
    M = A.double().triu() if upper else A.double().tril()
    if unit:
        M = M - torch.diag_embed(M.diagonal(dim1=-2, dim2=-1)) + torch.eye(A.shape[-1], dtype=torch.float64)
    return solve_ratio(M, X, B, F32) if left else solve_ratio(M.mT, X.mT, B.mT, F32)


@pytest.mark.parametrize("batch,n,k", TRSM_CASES, ids=[case_id(b, n, k) for b, n, k in TRSM_CASES])
def test_solve_triangular_lapack_ratio(batch, n, k):
    upper, left, unit = FLAGS[(n + k) % len(FLAGS)]
    A = triangular(batch, n, upper)
    B = torch.randn(*batch, *((n, k) if left else (k, n)))
    X = _trsm(A, B, upper, left, unit)
    assert_lapack_ratio(_trsm_ratio(A, X, B, upper, left, unit), f"trsm {case_id(batch, n, k)}")


@pytest.mark.parametrize("upper,left,unit", FLAGS, ids=FLAG_IDS)
def test_solve_triangular_every_flag_reads_one_triangle(upper, left, unit):
    A = triangular((3,), 33, upper)
    # The unread triangle (and the diagonal, when unit) holds NaN: it must never be read.
    junk = torch.full_like(A, float("nan"))
    A = A + (junk.tril(-1) if upper else junk.triu(1))
    if unit:
        A = A + torch.diag_embed(torch.full(A.shape[:-1], float("nan")))
    B = torch.randn(3, *((33, 9) if left else (9, 33)))
    X = _trsm(A, B, upper, left, unit)
    assert_lapack_ratio(_trsm_ratio(torch.nan_to_num(A), X, B, upper, left, unit), "trsm")


@pytest.mark.parametrize("kind", ("ill", "graded", "tiny", "huge"))
def test_solve_triangular_hard_factors(kind):
    # Triangular factors of hard matrices: the Cholesky factor of an ill-conditioned (cond 1e6, so
    # 1e3 for the factor), graded or tiny/huge-scaled SPD matrix.
    L = torch.linalg.cholesky(spd(kind, (2,), 31, F32).double()).float()
    B = torch.randn(2, 31, 4) * scale_of(kind, F32)
    X = _trsm(L, B, False, True, False)
    assert X.isfinite().all()
    # The ratio is invariant to the scale of L, X and B; float64 holds the products of 1e±25 values.
    assert_lapack_ratio(_trsm_ratio(L, X, B, False, True, False), f"trsm {kind}")


def test_solve_triangular_nan_stays_in_its_batch_element():
    A = triangular((5,), 8, False)
    B = torch.randn(5, 8, 3)
    A[2, 6, 1] = float("nan")
    X = _trsm(A, B, False, True, False)
    assert X[2].isnan().any()
    good = [0, 1, 3, 4]
    assert X[good].isfinite().all()
    torch.testing.assert_close(X[good], torch.linalg.solve_triangular(A[good], B[good], upper=False))


def test_solve_triangular_broadcast_and_strided():
    L = triangular((3, 1), 9, False)
    B = torch.randn(4, 2, 9).mT  # (4, 9, 2), column-major
    assert solve_triangular_op.backend_for(*torch.broadcast_tensors(L[..., :1], B[..., :1]), False, True, False)
    X = metalcore.trsm(L, B)
    assert X.shape == (3, 4, 9, 2)
    torch.testing.assert_close(L @ X, B.expand(3, 4, 9, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_triangular_gradients(left):
    A = triangular((2,), 5, True).requires_grad_()
    B = torch.randn(2, 5, 3)
    B = (B if left else B.mT.contiguous()).requires_grad_()
    _metal.launched.clear()
    X = metalcore.linalg.solve_triangular(A, B, upper=True, left=left)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (A, B), g)
    assert "trsm_float" in _metal.launched
    theirs = torch.autograd.grad(torch.linalg.solve_triangular(A.double(), B.double(), upper=True, left=left),
                                 (A, B), g.double())
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o.double(), t.double(), rtol=1e-4, atol=1e-4)


def test_solve_triangular_limits_route_to_the_reference():
    big, b = torch.eye(MAX_N + 1), torch.ones(MAX_N + 1, 2)
    assert solve_triangular_op.backend_for(big, b, False, True, False) == "reference"
    assert solve_triangular_op.backend_for(big.double()[:4, :4], b.double()[:4], False, True, False) == "reference"
    assert solve_triangular_op.backend_for(torch.eye(MAX_N), torch.ones(MAX_N, 500), False, True, False) == "metal"


# --- solve (LU with partial pivoting) ---------------------------------------------------------

SOLVE_CASES = [(b, n, (1, 4, 70)[i % 3], i % 2 == 1) for i, (b, n) in enumerate(CASES)]


def _solve(A, B, left=True):
    assert solve_ex_op.backend_for(A, B, left, False) == ("reference" if A.numel() == 0 else "metal")
    X, info = metalcore.linalg.solve_ex(A, B, left=left)
    assert X.dtype == F32 and X.is_contiguous()
    assert info.shape == A.shape[:-2] and info.dtype == torch.int32
    return X, info


def _solve_ratio(A, X, B, left):
    return solve_ratio(A, X, B, F32) if left else solve_ratio(A.mT, X.mT, B.mT, F32)


@pytest.mark.parametrize("batch,n,k,left", SOLVE_CASES,
                         ids=[f"{case_id(b, n, k)}-{'left' if l else 'right'}" for b, n, k, l in SOLVE_CASES])
def test_solve_lapack_ratio(batch, n, k, left):
    A = general("random", batch, n, n, F32)
    B = torch.randn(*batch, *((n, k) if left else (k, n)))
    X, info = _solve(A, B, left)
    assert X.shape == B.shape and not info.any()
    assert_lapack_ratio(_solve_ratio(A, X, B, left), f"solve {case_id(batch, n, k)}")


@pytest.mark.parametrize("kind", HARD + ("rank",))
def test_solve_hard_matrices(kind):
    A = general(kind, (3,), 33, 33, F32)
    B = torch.randn(3, 33, 2) * scale_of(kind, F32)
    X, info = _solve(A, B)
    if kind == "rank":
        # Numerically singular: rounding leaves tiny nonzero pivots, so info is torch's (0 here too).
        assert torch.equal(info, torch.linalg.solve_ex(A, B).info)
        return
    assert not info.any()
    # The ratio is invariant to the scale of A, X and B; float64 holds the products of 1e±25 values.
    assert_lapack_ratio(_solve_ratio(A, X, B, True), f"solve {kind}")


def test_solve_broadcasts_vectors_and_no_right_hand_sides():
    A = torch.randn(3, 1, 6, 6)
    B = torch.randn(4, 6, 2)
    X, info = _solve(A, B)
    assert X.shape == (3, 4, 6, 2) and info.shape == (3, 1)
    torch.testing.assert_close(X, torch.linalg.solve(A, B), rtol=1e-4, atol=1e-4)
    b = torch.randn(3, 1, 6)
    torch.testing.assert_close(metalcore.linalg.solve(A, b), torch.linalg.solve(A, b), rtol=1e-4, atol=1e-4)
    S = torch.randn(2, 5, 5)
    S[1, :, 2] = 0.0
    X, info = _solve(S, torch.randn(2, 5, 0))
    assert X.shape == (2, 5, 0) and torch.equal(info, torch.linalg.solve_ex(S, torch.randn(2, 5, 0)).info)


def test_solve_singular_info_and_nan_stay_in_their_batch_element():
    A = torch.randn(5, 7, 7)
    A[1] = 0.0                   # U[0, 0] = 0
    A[2, :, 4] = 0.0             # a zero column: U[4, 4] = 0 exactly
    A[3, 2, 5] = float("nan")
    B = torch.randn(5, 7, 3)
    X, info = _solve(A, B)
    assert info.tolist() == [0, 1, 5, 0, 0]
    assert torch.equal(info, torch.linalg.solve_ex(A, B).info)
    assert X[3].isnan().any()
    good = [0, 4]
    assert X[good].isfinite().all()
    torch.testing.assert_close(X[good], torch.linalg.solve(A[good], B[good]), rtol=1e-4, atol=1e-4)
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*singular"):
        metalcore.linalg.solve(A, B)


def test_solve_pivots_like_lapack():
    """A zero leading entry needs the row swap; ties go to the first row of largest |a|."""
    A = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [3.0, 0.0, 1.0]])
    X, _ = _solve(A, torch.eye(3))
    torch.testing.assert_close(X, torch.linalg.inv(A))
    T = torch.tensor([[1.0, 1.0], [-1.0, 2.0]])  # |a| ties in column 0: row 0 stays, exactly as LAPACK
    X, _ = _solve(T, torch.eye(2))
    torch.testing.assert_close(X, torch.linalg.inv(T), rtol=0, atol=0)


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_gradients_run_the_shader(left):
    A = torch.randn(2, 5, 5, requires_grad=True)
    B = torch.randn(2, *((5, 3) if left else (3, 5)), requires_grad=True)
    _metal.launched.clear()
    X = metalcore.linalg.solve(A, B, left=left)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (A, B), g)
    assert "lu_solve_float" in _metal.launched
    theirs = torch.autograd.grad(torch.linalg.solve(A.double(), B.double(), left=left), (A, B), g.double())
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o.double(), t.double(), rtol=1e-3, atol=1e-3)


def test_solve_limits_route_to_the_reference():
    assert solve_ex_op.backend_for(torch.eye(MAX_N + 1), torch.ones(MAX_N + 1, 1), True, False) == "reference"
    assert solve_ex_op.backend_for(torch.eye(3).double(), torch.ones(3, 1).double(), True, False) == "reference"
    assert solve_ex_op.backend_for(torch.eye(MAX_N), torch.ones(MAX_N, 300), True, False) == "metal"


# --- qr (Householder) -------------------------------------------------------------------------

MODES = ("reduced", "complete", "r")
# Square, tall and wide shapes: each case's second side is a neighbour size (or the limit).
QR_CASES = [(b, n, SIZES[(i // 2 + 3) % len(SIZES)] if i % 2 else n, MODES[i % 3]) for i, (b, n) in enumerate(CASES)]


def _qr(A, mode):
    assert qr_op.backend_for(A, mode) == ("reference" if A.numel() == 0 else "metal")
    Q, R = metalcore.linalg.qr(A, mode=mode)
    Q0, R0 = torch.linalg.qr(A, mode=mode)
    assert Q.shape == Q0.shape and R.shape == R0.shape and Q.is_contiguous() and R.is_contiguous()
    assert not R.tril(-1).any(), "R must be exactly upper triangular"
    return Q, R


def _check_qr(A, Q, R, mode, what, scale=1.0):
    if mode == "r":  # R is Q's R up to the signs of its rows
        _, R_full = _qr(A, "reduced")
        torch.testing.assert_close(R, R_full, rtol=0, atol=0)
        return
    assert_lapack_ratio(residual_ratio(A.double() / scale, Q.double() @ (R.double() / scale), F32), f"qr {what}")
    assert_lapack_ratio(orthogonality_ratio(Q, F32), f"qr {what} orthogonality")


@pytest.mark.parametrize("batch,m,n,mode", QR_CASES, ids=[f"{case_id(b, m, n)}-{mo}" for b, m, n, mo in QR_CASES])
def test_qr_lapack_ratio(batch, m, n, mode):
    A = general("random", batch, m, n, F32)
    Q, R = _qr(A, mode)
    _check_qr(A, Q, R, mode, case_id(batch, m, n))


@pytest.mark.parametrize("kind", HARD + ("rank",))
def test_qr_hard_matrices(kind):
    A = general(kind, (2,), 33, 20, F32)
    s = scale_of(kind, F32)
    for mode in ("reduced", "complete"):
        Q, R = _qr(A, mode)
        assert R.isfinite().all()
        _check_qr(A, Q, R, mode, kind, s)


def test_qr_zero_column_and_nan_stay_in_their_batch_element():
    A = torch.randn(4, 9, 6)
    A[1, :, 2] = 0.0            # a zero column: tau = 0, Q stays orthonormal
    A[2, 4, 3] = float("nan")
    Q, R = _qr(A, "reduced")
    assert Q[2].isnan().any() or R[2].isnan().any()
    good = [0, 1, 3]
    assert Q[good].isfinite().all() and R[good].isfinite().all()
    _check_qr(A[good], Q[good], R[good], "reduced", "zero column")


def test_qr_gradient_runs_the_shader():
    A = torch.randn(2, 7, 5, requires_grad=True)
    _metal.launched.clear()
    Q, R = metalcore.linalg.qr(A)
    gQ, gR = torch.randn_like(Q), torch.randn_like(R)
    ours, = torch.autograd.grad((Q, R), A, (gQ, gR))
    assert "qr_float" in _metal.launched
    Q0, R0 = torch.linalg.qr(A.double())
    theirs, = torch.autograd.grad((Q0, R0), A, (gQ.double(), gR.double()))
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-3, atol=1e-3)


def test_qr_limits_route_to_the_reference():
    # Beyond the tile, float32 goes to the blocked QR (tests/metal/test_shaders_qr_blocked.py).
    assert qr_op.backend_for(torch.ones(3, 3, dtype=torch.float64), "reduced") == "reference"
    assert qr_op.backend_for(torch.ones(MAX_N, MAX_N), "complete") == "metal"


@pytest.mark.parametrize("name,call", [
    ("qr", lambda: metalcore.linalg.qr(torch.randn(2, 3, 0))),
    ("qr-r", lambda: metalcore.linalg.qr(torch.randn(2, 0, 3), mode="r")[1]),
    ("cholesky", lambda: metalcore.linalg.cholesky(torch.randn(2, 0, 0))),
    ("solve", lambda: metalcore.linalg.solve(torch.randn(2, 0, 0), torch.randn(2, 0, 3))),
    ("trsm", lambda: metalcore.linalg.solve_triangular(torch.randn(2, 0, 0), torch.randn(2, 0, 3), upper=False)),
])
def test_zero_size_matrices_in_a_batch(name, call):
    """A batch of empty matrices: the shaders' hosts used to fail in reshape(-1, m, n)."""
    with metalcore.use_backend("reference"):
        expected = call()
    with metalcore.use_backend("metal"):
        ours = call()
    expected, ours = (x if isinstance(x, torch.Tensor) else x[0] for x in (expected, ours))
    assert ours.shape == expected.shape and torch.equal(ours, expected)
