import pytest
import torch

import metalcore
from cases import DTYPES, noncontiguous, shape_id
from oracle import assert_within_torch_error, eps

CASES = [((), 1, 1), ((7,), 33, 16), ((2, 3), 16, 31), ((0,), 5, 3), ((), 65, 65), ((3,), 127, 31)]


def well_conditioned(batch, m, n):
    A = torch.randn(*batch, m, n, dtype=torch.float64) / max(m, n) ** 0.5
    return A + 2 * torch.eye(m, n, dtype=torch.float64)


def symmetric(batch, n):
    X = torch.randn(*batch, n, n, dtype=torch.float64)
    return X + X.mT


# hermitian=True only where the matrices are square.
PINV_CASES = [(b, m, n, h) for b, m, n in CASES for h in (False, True) if m == n or not h]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n,hermitian", PINV_CASES,
                         ids=[shape_id(b, m, n) + ("-hermitian" if h else "") for b, m, n, h in PINV_CASES])
def test_pinv_within_torch_error(batch, m, n, hermitian, dtype):
    if hermitian:
        A = symmetric(batch, n) + 4 * n ** 0.5 * torch.eye(n, dtype=torch.float64)
    else:
        A = well_conditioned(batch, m, n)
    expected = torch.linalg.pinv(A, hermitian=hermitian)
    ours = metalcore.linalg.pinv(noncontiguous(A.to(dtype)), hermitian=hermitian)
    assert ours.shape == (*batch, n, m) and ours.dtype == dtype
    assert_within_torch_error(ours, torch.linalg.pinv(A.to(dtype), hermitian=hermitian), expected)


@pytest.mark.parametrize("m,n,r,hermitian", [(9, 6, 4, False), (6, 9, 2, False), (7, 7, 6, False), (5, 5, 0, False),
                                              (7, 7, 4, True), (5, 5, 0, True)], ids=str)
def test_pinv_rank_deficient_satisfies_penrose_conditions(m, n, r, hermitian):
    X = torch.randn(3, m, r, dtype=torch.float64)
    if hermitian:
        A = X @ torch.diag(torch.linspace(-2.0, 3.0, r, dtype=torch.float64)) @ X.mT
    else:
        A = X @ torch.randn(3, r, n, dtype=torch.float64)
    P = metalcore.linalg.pinv(A, hermitian=hermitian)
    scale = max(m, n) * eps(torch.float64) * 30
    norm = torch.linalg.matrix_norm
    assert (norm(A @ P @ A - A) <= scale * norm(A).clamp_min(1)).all()
    assert (norm(P @ A @ P - P) <= scale * norm(P).clamp_min(1)).all()
    assert (norm((A @ P).mT - A @ P) <= scale * max(m, n)).all()
    assert (norm((P @ A).mT - P @ A) <= scale * max(m, n)).all()
    torch.testing.assert_close(P, torch.linalg.pinv(A, hermitian=hermitian))


@pytest.mark.parametrize("kwargs", [dict(atol=0.5), dict(rtol=0.3), dict(atol=0.5, rtol=0.1), dict(atol=0.0),
                                    dict(atol=torch.tensor([0.1, 2.0, 0.3], dtype=torch.float64)),
                                    dict(rtol=torch.tensor([[0.5], [0.01]], dtype=torch.float64))],
                         ids=["atol", "rtol", "atol-rtol", "atol0", "atol-batch", "rtol-broadcast"])
@pytest.mark.parametrize("hermitian", [False, True], ids=["general", "hermitian"])
def test_pinv_tolerances_follow_torch(kwargs, hermitian):
    A = symmetric((3,), 6) if hermitian else torch.randn(3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(metalcore.linalg.pinv(A, hermitian=hermitian, **kwargs),
                               torch.linalg.pinv(A, hermitian=hermitian, **kwargs))


def test_pinv_empty_and_out():
    for shape in ((0, 4, 3), (4, 0), (2, 0, 3)):
        A = torch.randn(*shape, dtype=torch.float64)
        assert metalcore.linalg.pinv(A).shape == torch.linalg.pinv(A).shape
    A = well_conditioned((2,), 5, 3)
    out = torch.empty(0, dtype=torch.float64)
    assert metalcore.linalg.pinv(A, out=out) is out
    torch.testing.assert_close(out, torch.linalg.pinv(A))


def test_pinv_rejects_bad_input():
    with pytest.raises(ValueError, match=r"metalcore.linalg.pinv: A must be square when hermitian=True"):
        metalcore.linalg.pinv(torch.randn(4, 3, dtype=torch.float64), hermitian=True)
    with pytest.raises(TypeError, match=r"metalcore.linalg.pinv: atol must be a float, a real tensor or None"):
        metalcore.linalg.pinv(torch.randn(4, 3, dtype=torch.float64), atol="big")
    with pytest.raises(TypeError, match=r"metalcore.linalg.pinv: A must have dtype"):
        metalcore.linalg.pinv(torch.ones(3, 3, dtype=torch.int64))


@pytest.mark.parametrize("m,n,hermitian", [(5, 3, False), (3, 5, False), (4, 4, False), (4, 4, True)], ids=str)
def test_pinv_gradcheck_and_matches_torch(m, n, hermitian):
    A = well_conditioned((2,), m, n).requires_grad_()
    fn = (lambda X: metalcore.linalg.pinv(X + X.mT, hermitian=True)) if hermitian else metalcore.linalg.pinv
    reference = (lambda X: torch.linalg.pinv(X + X.mT, hermitian=True)) if hermitian else torch.linalg.pinv
    torch.autograd.gradcheck(fn, (A,))
    g = torch.randn(2, n, m, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(fn(A), A, g)[0], torch.autograd.grad(reference(A), A, g)[0])


def _with_singular_values(values, seed=0):
    """Q₁ diag(values) Q₂ᵀ with random orthogonal Q₁, Q₂: a chosen (possibly repeated) spectrum."""
    gen = torch.Generator().manual_seed(seed)
    n = len(values)
    Q1 = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    return (Q1 * torch.tensor(values, dtype=torch.float64)) @ Q2.mT


# Repeated singular values: the SVD's own backward divides by σ_i² − σ_j² there, pinv must not.
DEGENERATE = {"eye": torch.eye(3, dtype=torch.float64), "2-2-1-0.5": _with_singular_values([2, 2, 1, 0.5]),
              "all-equal": 3 * _with_singular_values([1, 1, 1, 1], seed=1)}


@pytest.mark.parametrize("hermitian", [False, True], ids=["general", "hermitian"])
@pytest.mark.parametrize("name", list(DEGENERATE))
def test_pinv_gradient_at_repeated_singular_values(name, hermitian, backend):
    A = DEGENERATE[name]
    if hermitian:
        A = A @ A.mT  # symmetric, singular values squared: still repeated
    A = A.clone().requires_grad_()
    sym = (lambda X: (X + X.mT) / 2) if hermitian else (lambda X: X)
    ours = lambda X: metalcore.linalg.pinv(sym(X), hermitian=hermitian)  # noqa: E731
    theirs = lambda X: torch.linalg.pinv(sym(X), hermitian=hermitian)  # noqa: E731
    torch.autograd.gradcheck(ours, (A,))
    g = torch.randn(A.shape, dtype=torch.float64)
    got, = torch.autograd.grad(ours(A), A, g)
    want, = torch.autograd.grad(theirs(A), A, g)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_pinv_of_empty_input_stays_in_the_graph():
    A = torch.randn(2, 0, 3, dtype=torch.float64, requires_grad=True)
    P = metalcore.linalg.pinv(A)
    assert P.shape == (2, 3, 0) and P.grad_fn is not None
    grad, = torch.autograd.grad(P.sum(), A)
    assert grad.shape == A.shape


def test_pinv_rcond_positional_form_is_rtol():
    A = _with_singular_values([4.0, 1.0, 1e-3])
    torch.testing.assert_close(metalcore.linalg.pinv(A, 1e-2), torch.linalg.pinv(A, 1e-2))
    torch.testing.assert_close(metalcore.linalg.pinv(A, 1e-2), metalcore.linalg.pinv(A, rtol=1e-2))
    torch.testing.assert_close(metalcore.linalg.pinv(A, 1e-2, True), torch.linalg.pinv(A, 1e-2, True))
    with pytest.raises(TypeError, match="rcond"):
        metalcore.linalg.pinv(A, 1e-2, rtol=1e-2)


def test_pinv_out_dtype_follows_torch():
    A = torch.randn(3, 3, dtype=torch.float64)
    out = torch.empty(0, dtype=torch.float32)  # a safe cast from float64: torch accepts it
    torch.testing.assert_close(metalcore.linalg.pinv(A, out=out), torch.linalg.pinv(A).float())
    with pytest.raises(RuntimeError, match="out"):
        metalcore.linalg.pinv(A, out=torch.empty(0, dtype=torch.int64))
