import itertools

import pytest
import torch

import metalcore
from cases import DTYPES, noncontiguous, shape_id
from oracle import assert_lapack_ratio, assert_within_torch_error, orthogonality_ratio, residual_ratio
from metalcore.linalg.householder import geqr2, larfb, larfb_op, larft, larft_op

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
