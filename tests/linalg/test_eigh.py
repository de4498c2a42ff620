import pytest
import torch

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous, shape_id
from oracle import assert_lapack_ratio, assert_within_torch_error, orthogonality_ratio, residual_ratio


def symmetric(batch, n, dtype=torch.float64):
    X = torch.randn(*batch, n, n, dtype=torch.float64)
    return (X + X.mT).to(dtype)


def with_garbage(A, UPLO):
    """``A`` with its unread triangle replaced by noise."""
    noise = torch.randn_like(A)
    return A.tril() + noise.triu(1) if UPLO == "L" else A.triu() + noise.tril(-1)


# Batches of 2x3 skip the largest sizes: the small sizes already cover the batch logic.
CASES = [(b, n) for b in BATCHES for n in SIZES if not (len(b) == 2 and n > 33)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("UPLO", ["L", "U"])
@pytest.mark.parametrize("batch,n", CASES, ids=[shape_id(b, n, n) for b, n in CASES])
def test_eigh_lapack_ratios(batch, n, UPLO, dtype):
    A = symmetric(batch, n, dtype)
    L, Q = metalcore.linalg.eigh(with_garbage(A, UPLO), UPLO=UPLO)
    assert L.shape == (*batch, n) and Q.shape == (*batch, n, n) and L.dtype == Q.dtype == dtype
    what = f"eigh {shape_id(batch, n, n)}"
    assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mH, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), what + " Q")
    assert bool((L[..., :-1] <= L[..., 1:]).all()), "eigenvalues must be ascending"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eigenvalues_within_torch_error(dtype):
    A = symmetric((7,), 65)
    expected = torch.linalg.eigvalsh(A)
    A_low = A.to(dtype)
    assert_within_torch_error(metalcore.linalg.eigh(A_low).eigenvalues, torch.linalg.eigvalsh(A_low), expected)
    assert_within_torch_error(metalcore.linalg.eigvalsh(A_low), torch.linalg.eigvalsh(A_low), expected)


def test_eigh_repeated_eigenvalues_keep_orthonormal_vectors():
    Q0, _ = torch.linalg.qr(torch.randn(4, 33, 33, dtype=torch.float64))
    L0 = torch.tensor([1.0] * 20 + [2.0] * 10 + [5.0] * 3, dtype=torch.float64)
    A = Q0 @ torch.diag_embed(L0) @ Q0.mT
    L, Q = metalcore.linalg.eigh(A)
    assert_lapack_ratio(orthogonality_ratio(Q, torch.float64), "repeated eigenvalues Q")
    assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float64), "repeated eigenvalues")


def test_eigh_noncontiguous_lowercase_uplo_out_and_return_types():
    A = symmetric((3,), 7)
    result = metalcore.linalg.eigh(noncontiguous(with_garbage(A, "U")), UPLO="u")
    assert isinstance(result, torch.return_types.linalg_eigh)
    assert_lapack_ratio(residual_ratio(A, result.eigenvectors @ torch.diag_embed(result.eigenvalues)
                                       @ result.eigenvectors.mT, torch.float64), "noncontiguous")
    out = (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
    result = metalcore.linalg.eigh(A, out=out)
    assert isinstance(result, torch.return_types.linalg_eigh) and result.eigenvalues is out[0]
    w = torch.empty(0, dtype=torch.float64)
    assert metalcore.linalg.eigvalsh(A, UPLO="l", out=w) is w
    torch.testing.assert_close(w, out[0])


def test_eigh_rejects_bad_input():
    with pytest.raises(ValueError, match=r"metalcore.linalg.eigh: UPLO must be one of 'L', 'U'; got 'X'"):
        metalcore.linalg.eigh(symmetric((), 3), UPLO="X")
    with pytest.raises(ValueError, match=r"metalcore.linalg.eigvalsh: A must be a square matrix"):
        metalcore.linalg.eigvalsh(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"metalcore.linalg.eigh: A must have dtype"):
        metalcore.linalg.eigh(torch.ones(3, 3, dtype=torch.float16))


def eigh_invariants(L, Q):
    """Functions of the eigendecomposition that do not depend on the eigenvectors' signs."""
    w = torch.linspace(1.0, 2.0, L.shape[-1], dtype=torch.float64)
    return L, (Q * w) @ Q.mT


@pytest.mark.parametrize("UPLO", ["L", "U"])
def test_eigh_gradcheck(UPLO):
    X = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs every entry, so the input is symmetrized first (torch's gradient is the one
    # with respect to a symmetric A, not restricted to the triangle that is read).
    torch.autograd.gradcheck(lambda X: eigh_invariants(*metalcore.linalg.eigh(X + X.mT, UPLO=UPLO)), (X,))
    torch.autograd.gradcheck(lambda X: metalcore.linalg.eigvalsh(X + X.mT, UPLO=UPLO), (X,))


@pytest.mark.parametrize("UPLO", ["L", "U"])
def test_eigh_gradient_matches_torch(UPLO):
    A = torch.randn(3, 6, 6, dtype=torch.float64, requires_grad=True)
    theirs = torch.linalg.eigh(A, UPLO=UPLO)
    grads = [torch.randn_like(t) for t in theirs]
    g_theirs, = torch.autograd.grad(theirs, A, grads)
    g_ours, = torch.autograd.grad(metalcore.linalg.eigh(A, UPLO=UPLO), A, grads)
    torch.testing.assert_close(g_ours, g_theirs)
    g_ours, = torch.autograd.grad(metalcore.linalg.eigh(A, UPLO=UPLO).eigenvectors, A, grads[1])
    g_theirs, = torch.autograd.grad(torch.linalg.eigh(A, UPLO=UPLO).eigenvectors, A, grads[1])
    torch.testing.assert_close(g_ours, g_theirs)
    g_ours, = torch.autograd.grad(metalcore.linalg.eigvalsh(A, UPLO=UPLO), A, grads[0])
    g_theirs, = torch.autograd.grad(torch.linalg.eigvalsh(A, UPLO=UPLO), A, grads[0])
    torch.testing.assert_close(g_ours, g_theirs)


def test_eigvalsh_gradient_is_finite_for_repeated_eigenvalues():
    A = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1).requires_grad_()
    g = torch.randn(2, 4, dtype=torch.float64)
    ours, = torch.autograd.grad(metalcore.linalg.eigvalsh(A), A, g)
    theirs, = torch.autograd.grad(torch.linalg.eigvalsh(A), A, g)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs)


def test_eigh_compiles_without_graph_breaks():
    A = symmetric((3,), 8, torch.float32)
    compiled = torch.compile(metalcore.linalg.eigh, fullgraph=True)
    L, Q = compiled(A)
    assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float32), "compiled eigh")
    torch.testing.assert_close(L, torch.linalg.eigvalsh(A))
