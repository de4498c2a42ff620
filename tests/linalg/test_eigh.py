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


# --- Register-tile Jacobi (eigh_batched_triton) and cuSOLVER's batched syev (cusolver_batched) ------

from linalg_matrices import KINDS, scale_of  # noqa: E402
from linalg_matrices import symmetric as family  # noqa: E402


def _register_eigh(A, UPLO="L"):
    from metalcore.linalg.eigh_batched_triton import eigh_registers
    return eigh_registers(A, UPLO == "U", True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_register_eigh_matrix_families(kind, dtype, triton_backend):
    # n = 13: an odd side (one padding index in the tournament) in a 16-wide tile, 3 matrices.
    A = family(kind, (3,), 13, dtype)
    L, Q = _register_eigh(with_garbage(A, "U"), "U")
    scale = scale_of(kind, dtype)
    what = f"register eigh {kind} {dtype}"
    assert_lapack_ratio(residual_ratio(A.double() / scale, (Q.double() * (L.double() / scale).unsqueeze(-2))
                                       @ Q.double().mT, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), what + " Q")
    assert bool((L[..., :-1] <= L[..., 1:]).all()), "eigenvalues must be ascending"


@pytest.mark.parametrize("n", [1, 2, 3, 8, 32])
def test_register_eigh_sizes_and_many_matrices_per_program(n, triton_backend):
    from metalcore.linalg.eigh_batched_triton import eigh_registers
    A = symmetric((5,), n)
    for G in (1, 2, 8):                        # 5 matrices: a partial last program for G = 2 and 8
        L, Q = eigh_registers(A, False, True, matrices_per_program=G)
        assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float64), f"n={n} G={G}")
        assert_lapack_ratio(orthogonality_ratio(Q, torch.float64), f"n={n} G={G} Q")
        L2, _ = eigh_registers(A, False, False, matrices_per_program=G)
        assert torch.equal(L, L2), "eigenvalues without vectors: the same rotations, bit for bit"


def test_register_eigh_nan_stays_in_its_matrix(triton_backend):
    A = symmetric((4,), 6, torch.float32)
    A[2, 3, 1] = float("nan")
    L, Q = _register_eigh(A)
    assert L[2].isnan().all() and Q[2].isnan().all()
    good = [0, 1, 3]
    assert not L[good].isnan().any() and not Q[good].isnan().any()
    assert_lapack_ratio(residual_ratio(A[good], Q[good] @ torch.diag_embed(L[good]) @ Q[good].mT, torch.float32),
                        "the other matrices")


def test_register_eigh_serves_the_op_when_routed(triton_backend, monkeypatch):
    from metalcore import _selection
    from metalcore.linalg import eigh_triton
    calls = []
    original = eigh_triton.eigh_registers
    monkeypatch.setattr(eigh_triton, "eigh_registers", lambda *a, **k: calls.append(1) or original(*a, **k))
    A = symmetric((2,), 7)
    with _selection.use_path("eigh", "registers"):
        L, Q = metalcore.linalg.eigh(A)
    assert calls, "the 'registers' path runs the register kernel"
    assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float64), "routed")


def test_cusolver_batched_falls_back_where_missing(monkeypatch):
    from metalcore.linalg import cusolver_batched, eigh_triton
    monkeypatch.setattr(cusolver_batched, "_load", lambda: None)
    assert not cusolver_batched.available()
    with pytest.raises(RuntimeError, match="XsyevBatched"):
        cusolver_batched.syev_batched(torch.eye(3), False, True)
    # Sizes the Jacobi kernels do not take are then not the triton implementation's.
    assert not eigh_triton._cusolver_supported(torch.eye(200))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [3, 40, 200])
def test_cusolver_batched_matches_the_contract(n, dtype):
    from metalcore.linalg import cusolver_batched
    if not cusolver_batched.available():
        pytest.skip("this libcusolver has no XsyevBatched (CUDA < 12.6.2)")
    A = symmetric((3,), n).cuda()
    A[1, 2, 0] = float("nan")
    for UPLO in ("L", "U"):
        L, Q = cusolver_batched.syev_batched(with_garbage(A, UPLO).to(dtype), UPLO == "U", True)
        good = [0, 2]
        assert L[1].isnan().all() and Q[1].isnan().all() and not L[good].isnan().any()
        assert_lapack_ratio(residual_ratio(A[good], Q[good] @ torch.diag_embed(L[good]) @ Q[good].mT, dtype), "residual")
        assert_lapack_ratio(orthogonality_ratio(Q[good], dtype), "Q")
        L2, _ = cusolver_batched.syev_batched(with_garbage(A, UPLO).to(dtype), UPLO == "U", False)
        assert_within_torch_error(L2[good], torch.linalg.eigvalsh(A[good].to(dtype)), torch.linalg.eigvalsh(A[good]))


def test_cusolver_batched_is_chosen_only_for_measured_batches(monkeypatch):
    from metalcore.linalg import cusolver_batched, eigh_triton
    monkeypatch.setattr(cusolver_batched, "available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: cuda))
    assert eigh_triton._cusolver_preferred(torch.empty(4, 64, 64))
    assert eigh_triton._cusolver_preferred(torch.empty(2, 512, 512, dtype=torch.float64))
    assert not eigh_triton._cusolver_preferred(torch.empty(64, 64))          # a single matrix: not timed
    assert not eigh_triton._cusolver_preferred(torch.empty(8, 32, 32))       # slower than torch there
    assert not eigh_triton._cusolver_preferred(torch.empty(2, 513, 513))     # not timed
    monkeypatch.setattr(cusolver_batched, "available", lambda: False)
    assert not eigh_triton._cusolver_preferred(torch.empty(4, 64, 64))       # missing symbol: fall back
