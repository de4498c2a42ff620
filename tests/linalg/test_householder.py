import itertools

import pytest
import torch

from backends import expected_backend

import metalcore
from cases import DTYPES, noncontiguous, shape_id
from linalg_matrices import BATCHES, case_id, general, scale_of
from linalg_matrices import METAL_MAX_N as MAX_N, METAL_SIZES as SIZES
from metalcore import _metal
from metalcore.linalg.householder import geqr2_op, householder_product_op, larfb_composite, larft_composite
from metalcore.linalg.householder import geqr2, larfb, larfb_op, larft, larft_op
from oracle import assert_lapack_ratio, assert_like_torch, assert_within_torch_error, orthogonality_ratio, residual_ratio


CASES = [((), 1, 1), ((7,), 31, 16), ((2, 3), 33, 33), ((0,), 5, 3), ((), 65, 64), ((3,), 16, 31)]
CASE_IDS = [shape_id(b, m, n) for b, m, n in CASES]


def unit_lower(V):
    m, k = V.shape[-2:]
    return V.tril(-1) + torch.eye(m, k, dtype=V.dtype)


def reflectors(batch, m, k, dtype=torch.float64):
    """A tall matrix's compact QR: realistic reflectors and scalars."""
    return torch.geqrf(torch.randn(*batch, m, k, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n", CASES, ids=CASE_IDS)
def test_geqr2_lapack_ratios(batch, m, n, dtype):
    A = torch.randn(*batch, m, n, dtype=dtype)
    QR, tau = geqr2(A)
    assert QR.shape == A.shape and tau.shape == (*batch, min(m, n)) and QR.dtype == tau.dtype == dtype
    # Judged by what it encodes: Q from the reflectors, R from the upper triangle.
    k = min(m, n)
    Q = torch.linalg.householder_product(QR[..., :k], tau)
    assert_lapack_ratio(residual_ratio(A, Q @ QR[..., :k, :].triu(), dtype), f"geqr2 {shape_id(batch, m, n)}")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), f"geqr2 Q {shape_id(batch, m, n)}")
    assert isinstance(geqr2(A), torch.return_types.geqrf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n", [c for c in CASES if c[1] >= c[2]], ids=[i for c, i in zip(CASES, CASE_IDS)
                                                                               if c[1] >= c[2]])
def test_larft_builds_the_block_reflector(batch, m, n, dtype):
    V, tau = reflectors(batch, m, n, dtype)
    # The diagonal and upper part of V are not read.
    T = larft(V + torch.randn_like(V).triu(), tau)
    assert T.shape == (*batch, n, n) and T.dtype == dtype
    assert torch.equal(T, T.triu()), "T must be upper triangular"
    Vu = unit_lower(V)
    H = torch.eye(m, dtype=dtype) - Vu @ T @ Vu.mH
    # Compare with LAPACK's orgqr: H's first n columns are the product of the reflectors.
    expected = torch.linalg.householder_product(V.double(), tau.double())
    assert_within_torch_error(H[..., :n], torch.linalg.householder_product(V, tau), expected)


def test_larft_zero_tau_gives_zero_row_and_column():
    V, tau = reflectors((2,), 9, 4)
    tau[:, 1] = 0.0
    T = larft(V, tau)
    assert torch.equal(T[:, 1, :], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(T[:, :, 1], torch.zeros(2, 4, dtype=torch.float64))
    Vu = unit_lower(V)
    torch.testing.assert_close((torch.eye(9, dtype=torch.float64) - Vu @ T @ Vu.mT)[..., :4],
                               torch.linalg.householder_product(V, tau))


LARFB_FLAGS = list(itertools.product([True, False], [False, True]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("left,transpose", LARFB_FLAGS, ids=[f"{'left' if l else 'right'}{'-T' if t else ''}"
                                                            for l, t in LARFB_FLAGS])
@pytest.mark.parametrize("batch,m,k,p", [((), 1, 1, 3), ((7,), 33, 16, 5), ((2, 3), 31, 31, 2), ((0,), 4, 2, 3)],
                         ids=str)
def test_larfb_matches_ormqr(batch, m, k, p, left, transpose, dtype):
    V, tau = reflectors(batch, m, k, dtype)
    C = torch.randn(*batch, *((m, p) if left else (p, m)), dtype=dtype)
    T = larft(V, tau)
    # Only T's upper triangle is read.
    out = larfb(V, T + torch.randn_like(T).tril(-1), noncontiguous(C), left, transpose)
    expected = torch.ormqr(V.double(), tau.double(), C.double(), left=left, transpose=transpose)
    assert out.shape == C.shape and out.dtype == dtype
    assert_within_torch_error(out, torch.ormqr(V, tau, C, left=left, transpose=transpose), expected)


def test_larfb_broadcasts_batch_dimensions():
    V, tau = reflectors((), 7, 3)
    C = torch.randn(4, 7, 2, dtype=torch.float64)
    out = larfb(V, larft(V, tau), C)
    torch.testing.assert_close(out, torch.ormqr(V.expand(4, 7, 3), tau.expand(4, 3), C))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n,k", [((), 1, 1, 1), ((7,), 33, 16, 16), ((2, 3), 31, 31, 30), ((0,), 5, 3, 2),
                                         ((), 65, 33, 5)], ids=str)
def test_householder_product_matches_orgqr(batch, m, n, k, dtype):
    QR, tau = reflectors(batch, m, n, dtype)
    Q = metalcore.linalg.householder_product(noncontiguous(QR), tau[..., :k])
    expected = torch.linalg.householder_product(QR.double(), tau[..., :k].double())
    assert Q.shape == (*batch, m, n) and Q.dtype == dtype
    assert_within_torch_error(Q, torch.linalg.householder_product(QR, tau[..., :k]), expected)
    out = torch.empty(0, dtype=dtype)
    assert metalcore.linalg.householder_product(QR, tau[..., :k], out=out) is out
    torch.testing.assert_close(out, Q)


def test_householder_rejects_bad_input():
    V, tau = reflectors((2,), 5, 3)
    with pytest.raises(ValueError, match=r"metalcore.linalg.householder_product: A must have at least as many rows"):
        metalcore.linalg.householder_product(V.mT, tau)
    with pytest.raises(ValueError, match=r"metalcore.linalg.householder_product: tau must have shape"):
        metalcore.linalg.householder_product(V, tau[0])
    with pytest.raises(ValueError, match=r"metalcore.linalg.householder_product: tau must hold at most n = 3"):
        metalcore.linalg.householder_product(V, torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"metalcore.linalg.householder_product: expected all tensors to have"):
        metalcore.linalg.householder_product(V, tau.float())
    with pytest.raises(ValueError, match=r"metalcore.larft: V must be \(\*, m, k\) with m >= k"):
        larft(V, tau[..., :2])
    with pytest.raises(ValueError, match=r"metalcore.larft: the batch dimensions of tau"):
        larft(V, tau[:1])
    with pytest.raises(ValueError, match=r"metalcore.larfb: C must have 5 rows"):
        larfb(V, larft(V, tau), torch.randn(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"metalcore.larfb: the batch dimensions of V"):
        larfb(V, larft(V, tau), torch.randn(3, 5, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"metalcore.geqr2: A must have dtype"):
        geqr2(torch.ones(3, 3, dtype=torch.int32))


def test_geqr2_is_not_differentiable_like_geqrf():
    A = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="derivative"):
        torch.geqrf(A)[0].sum().backward()
    with pytest.raises(NotImplementedError, match=r"derivative for metalcore geqr2 is not implemented"):
        geqr2(A)[0].sum().backward()


def test_householder_gradcheck():
    V, tau = reflectors((2,), 5, 3)
    V, tau = V.requires_grad_(), tau.requires_grad_()
    T = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    # fast_mode checks random projections of the Jacobian: these backwards run torch.func.vjp, whose
    # per-call overhead made the full row-by-row check take ~15 s per larfb case on 2 shared cores.
    torch.autograd.gradcheck(larft, (V, tau), fast_mode=True)
    for left, transpose in LARFB_FLAGS:
        C = torch.randn(2, *((5, 2) if left else (2, 5)), dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda V, T, C: larfb(V, T, C, left, transpose), (V, T, C), fast_mode=True)
    torch.autograd.gradcheck(metalcore.linalg.householder_product, (V, tau[..., :2]), fast_mode=True)


def test_householder_product_gradient_matches_torch():
    V, tau = reflectors((3,), 7, 4)
    V, tau = V.requires_grad_(), tau[..., :3].requires_grad_()
    g = torch.randn(3, 7, 4, dtype=torch.float64)
    ours = torch.autograd.grad(metalcore.linalg.householder_product(V, tau), (V, tau), g)
    theirs = torch.autograd.grad(torch.linalg.householder_product(V, tau), (V, tau), g)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)


@pytest.mark.parametrize("batch,m,n", [((), 4, 3), ((2,), 5, 5), ((0,), 3, 2)], ids=str)
def test_householder_product_with_no_reflectors(batch, m, n, backend):
    """``tau`` of length 0: ``Q`` is the first ``n`` columns of the identity, whatever ``A`` holds, and
    the gradient with respect to ``A`` is zero (torch leaves it unconnected)."""
    A = torch.randn(*batch, m, n, dtype=torch.float64, requires_grad=True)
    tau = torch.zeros(*batch, 0, dtype=torch.float64, requires_grad=True)
    Q = metalcore.linalg.householder_product(A, tau)
    torch.testing.assert_close(Q, torch.linalg.householder_product(A, tau))
    gA, gtau = torch.autograd.grad(Q, (A, tau), torch.randn(Q.shape, dtype=torch.float64),
                                   allow_unused=True, materialize_grads=True)
    assert torch.equal(gA, torch.zeros_like(A)) and gtau.shape == tau.shape
    torch.autograd.gradcheck(metalcore.linalg.householder_product, (A, tau))


def test_householder_product_out_dtype_follows_torch():
    V, tau = reflectors((2,), 5, 3)
    out = torch.empty(0, dtype=torch.float32)  # a safe cast from float64: torch accepts it
    torch.testing.assert_close(metalcore.linalg.householder_product(V, tau, out=out),
                               torch.linalg.householder_product(V, tau).float())
    for ours, theirs in ((metalcore.linalg.householder_product, torch.linalg.householder_product),):
        for fn in (ours, theirs):
            with pytest.raises(RuntimeError):
                fn(V, tau, out=torch.empty(0, dtype=torch.int64))


def test_householder_ops_compile_without_graph_breaks():
    A = torch.randn(3, 9, 5, dtype=torch.float32)
    QR, tau = torch.compile(geqr2, fullgraph=True)(A)
    V = QR.detach().requires_grad_()
    T = torch.compile(larft, fullgraph=True)(V, tau)
    C = torch.randn(3, 9, 2, dtype=torch.float32)
    out = torch.compile(larfb, fullgraph=True)(V, T, C, True, True)
    torch.testing.assert_close(out, torch.ormqr(QR, tau, C, left=True, transpose=True))
    Q = torch.compile(metalcore.linalg.householder_product, fullgraph=True)(V, tau)
    torch.testing.assert_close(Q, torch.linalg.householder_product(QR, tau))
    gV, = torch.autograd.grad((Q.sum() + out.sum()), V)
    assert gV.shape == V.shape and torch.isfinite(gV).all()


# --- the triton backend's GEMM compositions (metalcore/linalg/householder_triton.py) ---------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,k", [((), 1, 1), ((3,), 33, 16), ((2, 2), 31, 31), ((0,), 5, 3), ((), 70, 37)],
                         ids=str)
def test_larft_triton_matches_lapack(triton_backend, batch, m, k, dtype):
    V, tau = reflectors(batch, m, k, dtype)
    tau[..., k // 2] = 0.0     # H = I at one step: a zero row and column of T
    Vj = V + torch.randn_like(V).triu()     # the diagonal and upper part are not read
    assert larft_op.backend_for(Vj, tau) == ("reference" if Vj.numel() == 0 else "triton")
    T = larft(Vj, tau)
    assert T.shape == (*batch, k, k) and T.dtype == dtype and torch.equal(T, T.triu())
    assert not T[..., k // 2, :].any() and not T[..., :, k // 2].any()
    Vu = unit_lower(V)
    H = torch.eye(m, dtype=dtype) - Vu @ T @ Vu.mH
    expected = torch.linalg.householder_product(V.double(), tau.double())
    assert_within_torch_error(H[..., :k], torch.linalg.householder_product(V, tau), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("left,transpose", LARFB_FLAGS, ids=[f"{'left' if l else 'right'}{'-T' if t else ''}"
                                                            for l, t in LARFB_FLAGS])
def test_larfb_triton_matches_ormqr(triton_backend, left, transpose, dtype):
    for batch, m, k, p in (((), 1, 1, 3), ((3,), 33, 16, 5), ((0,), 4, 2, 3)):
        V, tau = reflectors(batch, m, k, dtype)
        C = torch.randn(*batch, *((m, p) if left else (p, m)), dtype=dtype)
        T = larft(V, tau)
        Vj, Tj = V + torch.randn_like(V).triu(), T + torch.randn_like(T).tril(-1)
        assert larfb_op.backend_for(Vj, Tj, C, left, transpose) == ("reference" if Vj.numel() == 0 else "triton")
        out = larfb(Vj, Tj, noncontiguous(C), left, transpose)
        expected = torch.ormqr(V.double(), tau.double(), C.double(), left=left, transpose=transpose)
        assert out.shape == C.shape and out.dtype == dtype
        assert_within_torch_error(out, torch.ormqr(V, tau, C, left=left, transpose=transpose), expected)
    V, tau = reflectors((), 7, 3, dtype)      # broadcast batch dimensions
    C = torch.randn(4, *((7, 2) if left else (2, 7)), dtype=dtype)
    torch.testing.assert_close(larfb(V, larft(V, tau), C, left, transpose),
                               torch.ormqr(V.expand(4, 7, 3), tau.expand(4, 3), C, left=left, transpose=transpose))


# --- Metal shaders (executor in CI): geqr2, larft, larfb, householder_product ---------------------
# The Householder kernels of shaders/linalg.metal through the metal backend on CPU tensors (the shader
# executor): ``geqr2``, ``householder_product``, ``larft`` and ``larfb`` in float32, judged as on the
# other backends: the factorization by LAPACK's test ratios, the unique values (R, Q, T, the applied
# block reflector) by the 2x rule against torch in float32 and float64 (tests/oracle.py), over odd
# sizes, tall and wide shapes, batch shapes and hard matrix families, with what each kernel must not
# read filled with NaN.
#
# Matrix sides stop at METALCORE_LINALG_MAX_N (64, the float32 tile that fits Apple's 32 KiB of
# threadgroup memory); larft's V may be taller (only T is held). Beyond that, and for float64, the ops
# stay on the reference.


F32 = torch.float32


def _shape(i, j):
    """Size ``i`` with the ``j``-th partner: square, or with a partner size as columns or as rows."""
    n, other = SIZES[i], SIZES[(i + 3 * j + 2) % len(SIZES)]
    return ((n, n), (n, other), (other, n))[(i + j) % 3]


# Each size meets two of the four batch shapes, and square, tall and wide shapes come in turn.
CASES_metal = [(BATCHES[(i + j) % 4], *_shape(i, j)) for i in range(len(SIZES)) for j in (0, 2)]
CASE_IDS_metal = [case_id(b, m, n) for b, m, n in CASES_metal]
HARD = ("ill", "rank", "graded", "tiny", "huge")


def reflectors_metal(batch, m, k):
    """``(V, tau)`` of a float32 QR of a random ``m × k`` matrix: the reflectors_metal a blocked QR hands on."""
    QR, tau = torch.geqrf(torch.randn(*batch, m, k, dtype=torch.float64))
    return QR.float(), tau.float()


def nan_above(V):
    """``V`` with NaN on and above its diagonal: entries the reflector kernels must not read."""
    m, k = V.shape[-2:]
    keep = torch.ones(m, k, dtype=torch.bool).tril(-1)
    return torch.where(keep, V, torch.full_like(V, float("nan")))


# --- geqr2 ------------------------------------------------------------------------------------

def _geqr2(A):
    assert geqr2_op.backend_for(A) == expected_backend("metal", A)
    QR, tau = metalcore.geqr2(A)
    k = min(A.shape[-2:])
    assert QR.shape == A.shape and tau.shape == (*A.shape[:-2], k) and QR.is_contiguous() and tau.is_contiguous()
    # dlarfg: tau = 0 (H = I) or 1 <= tau <= 2 (up to rounding).
    assert ((tau == 0) | ((tau >= 1 - 1e-6) & (tau <= 2 + 1e-6))).all()
    return QR, tau


def _check_geqr2(A, QR, tau, what, scale=1.0):
    """Q from our reflectors_metal (in float64), R from our upper triangle: ‖A − QR‖ and ‖QᵀQ − I‖."""
    m, n = A.shape[-2:]
    k = min(m, n)
    Q = torch.linalg.householder_product(QR.double()[..., :k], tau.double())
    R = QR.double()[..., :k, :].triu()
    assert_lapack_ratio(residual_ratio(A.double() / scale, Q @ (R / scale), F32), f"geqr2 {what}")
    assert_lapack_ratio(orthogonality_ratio(Q, F32), f"geqr2 {what} orthogonality")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,m,n", CASES_metal, ids=CASE_IDS_metal)
def test_geqr2_lapack_ratio(batch, m, n):
    A = general("random", batch, m, n, F32)
    QR, tau = _geqr2(A)
    _check_geqr2(A, QR, tau, case_id(batch, m, n))
    # The reflector convention is LAPACK's: R is torch.geqrf's.
    k = min(m, n)
    assert_like_torch(QR[..., :k, :].triu(), lambda A: torch.geqrf(A)[0][..., :k, :].triu(), A)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("kind", HARD)
def test_geqr2_hard_matrices(kind):
    A = general(kind, (2,), 33, 20, F32)
    QR, tau = _geqr2(A)
    assert QR.isfinite().all() and tau.isfinite().all()
    _check_geqr2(A, QR, tau, kind, scale_of(kind, F32))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
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

# (batch, m, n, k): square, tall, fewer reflectors_metal than columns (k < n), none, and the size limit.
HP_CASES = [((), 1, 1, 1), ((7,), 5, 3, 3), ((2, 3), 16, 16, 16), ((), 33, 31, 20), ((3,), 31, 5, 0),
            ((0,), 8, 8, 8), ((2,), MAX_N, MAX_N, MAX_N), ((), MAX_N, 33, 33)]


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,m,n,k", HP_CASES, ids=[f"{case_id(b, m, n)}-k{k}" for b, m, n, k in HP_CASES])
def test_householder_product_lapack_ratio(batch, m, n, k):
    A = general("random", batch, m, n, F32)
    QR, tau = torch.geqrf(A.double())
    QR, tau = nan_above(QR[..., :k].float()), tau[..., :k].float()
    A_in = torch.cat((QR, torch.randn(*batch, m, n - k)), dim=-1)  # columns k.. are not read
    assert householder_product_op.backend_for(A_in, tau) == expected_backend("metal", A_in, tau)
    Q = metalcore.linalg.householder_product(A_in, tau)
    assert Q.shape == (*batch, m, n) and Q.dtype == F32 and Q.is_contiguous()
    assert_lapack_ratio(orthogonality_ratio(Q, F32), f"householder_product {case_id(batch, m, n)} orthogonality")
    assert_like_torch(Q, torch.linalg.householder_product, A_in.nan_to_num(), tau)
    if k == n:  # Q R reproduces A
        R = torch.geqrf(A.double())[0][..., :n, :].triu()
        assert_lapack_ratio(residual_ratio(A, Q.double() @ R, F32), f"householder_product {case_id(batch, m, n)} QR")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_householder_product_zero_tau_is_identity_factor():
    V, tau = reflectors_metal((3,), 9, 4)
    tau[1, 2] = 0.0
    Q = metalcore.linalg.householder_product(V, tau)
    assert_like_torch(Q, torch.linalg.householder_product, V, tau)


# --- larft --------------------------------------------------------------------------------------

# (batch, m, k): one reflector, square, tall, and V taller than the tile (only T is held).
LARFT_CASES = [((), 1, 1), ((7,), 5, 3), ((2, 3), 16, 16), ((), 33, 31), ((2,), 100, 5), ((0,), 8, 4),
               ((3,), 7, 0), ((), MAX_N, MAX_N), ((2,), 150, MAX_N)]


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,m,k", LARFT_CASES, ids=[case_id(b, m, k) for b, m, k in LARFT_CASES])
def test_larft_against_float64(batch, m, k):
    V, tau = reflectors_metal(batch, m, k)
    V = nan_above(V)
    assert larft_op.backend_for(V, tau) == expected_backend("metal", V, tau)
    T = metalcore.larft(V, tau)
    assert T.shape == (*batch, k, k) and T.dtype == F32 and T.is_contiguous()
    assert not T.tril(-1).any() and T.isfinite().all(), "T is upper triangular; NaN above V's diagonal is not read"
    assert_like_torch(T, larft_composite, V.nan_to_num(), tau)
    if k and batch != (0,):  # the block reflector reproduces H_1 ... H_k
        Vu = V.double().nan_to_num().tril(-1) + torch.eye(m, k, dtype=torch.float64)
        H = torch.eye(m, dtype=torch.float64) - Vu @ T.double() @ Vu.mT
        assert_like_torch(H[..., :k].float(), torch.linalg.householder_product, V.nan_to_num(), tau)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_larft_zero_tau_zeroes_its_row_and_column():
    V, tau = reflectors_metal((2,), 12, 6)
    tau[0, 2] = 0.0
    tau[1, 0] = 0.0
    T = metalcore.larft(V, tau)
    assert not T[0, 2].any() and not T[0, :, 2].any() and not T[1, 0].any() and not T[1, :, 0].any()
    assert_like_torch(T, larft_composite, V, tau)


# --- larfb --------------------------------------------------------------------------------------

FLAGS = [(left, transpose) for left in (True, False) for transpose in (False, True)]
FLAG_IDS = [f"{'left' if left else 'right'}{'-T' if transpose else ''}" for left, transpose in FLAGS]
# (batch, m, k, other side of C): a column, more columns than the threadgroup has SIMD-groups (8),
# k < m, and the size limit.
LARFB_CASES = [((), 1, 1, 1), ((7,), 5, 3, 70), ((2, 3), 16, 16, 3), ((), 33, 20, 9), ((2,), MAX_N, MAX_N, 5),
               ((0,), 6, 2, 4)]


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("left,transpose", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("batch,m,k,p", LARFB_CASES, ids=[f"{case_id(b, m, k)}-C{p}" for b, m, k, p in LARFB_CASES])
def test_larfb_matches_ormqr_metal(batch, m, k, p, left, transpose):
    V, tau = reflectors_metal(batch, m, k)
    T = larft_composite(V.double(), tau.double())
    # NaN where the kernel must not read: above V's diagonal and below T's.
    V_in = nan_above(V)
    T_in = torch.where(torch.ones(k, k, dtype=torch.bool).triu(), T, torch.full_like(T, float("nan"))).float()
    C = torch.randn(*batch, m, p) if left else torch.randn(*batch, p, m)
    assert larfb_op.backend_for(V_in, T_in, C, left, transpose) == expected_backend("metal", V_in, T_in, C, left, transpose)
    X = metalcore.larfb(V_in, T_in, C, left, transpose)
    assert X.shape == C.shape and X.dtype == F32 and X.is_contiguous()
    assert_like_torch(X, torch.ormqr, V, tau, C, left, transpose)
    torch.testing.assert_close(torch.ormqr(V.double(), tau.double(), C.double(), left, transpose),
                               larfb_composite(V.double(), T, C.double(), left, transpose))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_larfb_broadcasts_and_strided_c():
    """The public function broadcasts V and T over C's batch; a transposed C needs no special case."""
    V, tau = reflectors_metal((), 10, 4)
    T = metalcore.larft(V, tau)
    C = torch.randn(3, 7, 10).mT  # (3, 10, 7), not contiguous
    X = metalcore.larfb(V, T, C)
    assert_like_torch(X, torch.ormqr, V.expand(3, 10, 4), tau.expand(3, 4), C)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_larfb_no_reflectors_returns_c():
    C = torch.randn(2, 5, 3)
    X = metalcore.larfb(torch.randn(2, 5, 0), torch.randn(2, 0, 0), C)
    assert torch.equal(X, C)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_gradients_run_the_shaders():
    """The forward passes run the shaders; the backward passes recompute through the composites, so
    the gradients match the reference backend's up to the forward's float32 rounding."""
    V, tau = reflectors_metal((2,), 7, 3)
    C, gX, gQ = torch.randn(2, 7, 4), torch.randn(2, 7, 4), torch.randn(2, 7, 3)

    def grad_v(V, tau, C, gX, gQ):
        V = V.clone().requires_grad_()
        X = metalcore.larfb(V, metalcore.larft(V, tau), C)
        Q = metalcore.linalg.householder_product(V, tau)
        return torch.autograd.grad((X, Q), V, (gX, gQ))[0]

    _metal.launched.clear()
    ours = grad_v(V, tau, C, gX, gQ)
    assert {"larft_float", "larfb_float", "householder_product_float"} <= _metal.launched
    with metalcore.use_backend("reference"):
        assert_like_torch(ours, grad_v, V, tau, C, gX, gQ)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_limits_route_to_the_reference():
    """float64 goes to the reference; float32 past the tile goes to the blocked path (still metal:
    tests/linalg/test_qr_blocked.py); larft/larfb past their limits to the reference."""
    big, f64 = torch.ones(MAX_N + 1, 3), torch.ones(5, 3, dtype=torch.float64)
    assert geqr2_op.backend_for(f64) == "reference"
    assert geqr2_op.backend_for(big) == geqr2_op.backend_for(big.mT) == expected_backend("metal", big) == geqr2_op.backend_for(big.mT)
    assert geqr2_op.backend_for(torch.ones(MAX_N, MAX_N)) == expected_backend("metal", torch.ones(MAX_N, MAX_N))
    assert householder_product_op.backend_for(big, torch.ones(3)) == expected_backend("metal", big, torch.ones(3))
    assert householder_product_op.backend_for(f64, torch.ones(3, dtype=torch.float64)) == "reference"
    assert larft_op.backend_for(torch.ones(200, MAX_N + 1), torch.ones(MAX_N + 1)) == "reference"
    assert larft_op.backend_for(torch.ones(200, MAX_N), torch.ones(MAX_N)) == expected_backend("metal", torch.ones(200, MAX_N), torch.ones(MAX_N))
    assert larfb_op.backend_for(big, torch.ones(3, 3), torch.ones(MAX_N + 1, 2), True, False) == "reference"
    assert larfb_op.backend_for(torch.ones(5, 3), torch.ones(3, 3), torch.ones(500, 5), False, False) == expected_backend("metal", torch.ones(5, 3), torch.ones(3, 3), torch.ones(500, 5), False, False)
