import pytest
import torch

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous, shape_id
from oracle import assert_lapack_ratio, assert_within_torch_error, eps, orthogonality_ratio, residual_ratio
from metalcore.linalg.svd import seed_svd, svd_op


def matrix_shapes(n):
    """Square, tall and wide shapes with largest side n."""
    return [(n, n)] if n == 1 else [(n, n), (n, (n + 1) // 2), ((n + 1) // 2, n)]


# Batches of 2x3 skip the largest sizes: the small sizes already cover the batch logic.
CASES = [(b, mn) for b in BATCHES for n in SIZES for mn in matrix_shapes(n) if not (len(b) == 2 and n > 33)]
CASE_IDS = [shape_id(b, *mn) for b, mn in CASES]


def weights(k):
    return torch.linspace(1.0, 2.0, k, dtype=torch.float64)


def invariants(U, S, Vh):
    """Functions of the SVD that do not depend on the sign of each singular pair."""
    w = weights(S.shape[-1])
    return U @ torch.diag_embed(S * w) @ Vh, (U * w) @ U.mH, (Vh.mH * w) @ Vh, S


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,mn", CASES, ids=CASE_IDS)
def test_svd_lapack_ratios(batch, mn, dtype):
    m, n = mn
    A = torch.randn(*batch, m, n, dtype=dtype)
    U, S, Vh = metalcore.linalg.svd(A, full_matrices=False)
    k = min(m, n)
    assert (U.shape, S.shape, Vh.shape) == ((*batch, m, k), (*batch, k), (*batch, k, n))
    assert U.dtype == S.dtype == Vh.dtype == dtype
    what = f"svd {shape_id(batch, m, n)}"
    assert_lapack_ratio(residual_ratio(A, U @ torch.diag_embed(S) @ Vh, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(U, dtype), what + " U")
    assert_lapack_ratio(orthogonality_ratio(Vh, dtype, rows=True), what + " Vh")
    assert bool((S[..., :-1] >= S[..., 1:]).all()), "singular values must be descending"
    assert bool((S >= 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", [(33, 16), (16, 33), (31, 31)], ids=str)
def test_svd_full_matrices(m, n, dtype):
    A = torch.randn(7, m, n, dtype=dtype)
    U, S, Vh = metalcore.linalg.svd(A)
    assert U.shape == (7, m, m) and Vh.shape == (7, n, n)
    k = min(m, n)
    assert_lapack_ratio(orthogonality_ratio(U, dtype), "full U")
    assert_lapack_ratio(orthogonality_ratio(Vh, dtype, rows=True), "full Vh")
    assert_lapack_ratio(residual_ratio(A, U[..., :k] @ torch.diag_embed(S) @ Vh[..., :k, :], dtype), "full residual")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,r", [(33, 16, 5), (16, 33, 1), (31, 31, 30), (64, 64, 0)], ids=str)
def test_svd_rank_deficient_keeps_orthonormal_vectors(m, n, r, dtype):
    A = (torch.randn(4, m, r, dtype=torch.float64) @ torch.randn(4, r, n, dtype=torch.float64)).to(dtype)
    U, S, Vh = metalcore.linalg.svd(A, full_matrices=False)
    assert_lapack_ratio(orthogonality_ratio(U, dtype), "rank-deficient U")
    assert_lapack_ratio(orthogonality_ratio(Vh, dtype, rows=True), "rank-deficient Vh")
    assert_lapack_ratio(residual_ratio(A, U @ torch.diag_embed(S) @ Vh, dtype), "rank-deficient residual")
    largest = S[..., :1].clamp_min(1.0) if r == 0 else S[..., :1]
    tail = S[..., r:] / largest
    assert tail.max().item() <= 30 * max(m, n) * eps(dtype), "the null singular values must vanish"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_singular_values_within_torch_error(dtype):
    A = torch.randn(7, 65, 33, dtype=torch.float64)
    expected = torch.linalg.svdvals(A)
    A_low = A.to(dtype)
    assert_within_torch_error(metalcore.linalg.svd(A_low).S, torch.linalg.svdvals(A_low), expected)
    assert_within_torch_error(metalcore.linalg.svdvals(A_low), torch.linalg.svdvals(A_low), expected)


def test_svd_noncontiguous_and_return_types():
    A = torch.randn(3, 9, 6, dtype=torch.float64)
    result = metalcore.linalg.svd(noncontiguous(A))
    assert isinstance(result, torch.return_types.linalg_svd)
    # Where automatic selection gives the call to torch (the CPU), the outputs are torch's own, strides
    # included (LAPACK's column-major U and Vh): the drop-in promise is torch's result.
    expected = torch.linalg.svd(noncontiguous(A))
    assert all(t.stride() == e.stride() for t, e in zip(result, expected))
    U, S, Vh = result
    assert_lapack_ratio(residual_ratio(A, U[..., :6] @ torch.diag_embed(S) @ Vh, torch.float64), "noncontiguous")
    assert isinstance(metalcore.linalg.svdvals(noncontiguous(A)), torch.Tensor)


def test_svd_out():
    A = torch.randn(2, 5, 3, dtype=torch.float64)
    out = (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
    result = metalcore.linalg.svd(A, full_matrices=False, out=out)
    assert result.U is out[0] and result.S is out[1] and result.Vh is out[2]
    assert_lapack_ratio(residual_ratio(A, out[0] @ torch.diag_embed(out[1]) @ out[2], torch.float64), "out")
    s = torch.empty(0, dtype=torch.float64)
    assert metalcore.linalg.svdvals(A, out=s) is s and s.shape == (2, 3)


def test_seed_svd_returns_v_not_vh():
    A = torch.randn(4, 7, 5, dtype=torch.float64)
    result = seed_svd(A)
    assert isinstance(result, torch.return_types.svd)
    U, S, V = result
    assert U.shape == (4, 7, 5) and V.shape == (4, 5, 5), "reduced by default"
    assert_lapack_ratio(residual_ratio(A, U @ torch.diag_embed(S) @ V.mT, torch.float64), "seed svd A = U S Vᵀ")
    U, S, V = seed_svd(A, full_matrices=True)
    assert U.shape == (4, 7, 7) and V.shape == (4, 5, 5)


def test_svd_driver_is_cuda_only_like_torch():
    A = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="driver"):
        torch.linalg.svd(A, driver="gesvd")
    with pytest.raises(RuntimeError, match=r"metalcore.linalg.svd: .*driver.*CUDA"):
        metalcore.linalg.svd(A, driver="gesvd")
    with pytest.raises(RuntimeError, match=r"metalcore.linalg.svdvals: .*driver.*CUDA"):
        metalcore.linalg.svdvals(A, driver="gesvdj")


def test_svd_rejects_bad_input():
    with pytest.raises(TypeError, match=r"metalcore.linalg.svd: A must have dtype float32, float64; got int64"):
        metalcore.linalg.svd(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"metalcore.linalg.svd: A must be a matrix"):
        metalcore.linalg.svd(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"metalcore.linalg.svdvals: A must be a torch.Tensor"):
        metalcore.linalg.svdvals([[1.0]])


@pytest.mark.parametrize("m,n", [(5, 3), (3, 5), (4, 4)], ids=str)
def test_svd_gradcheck(m, n):
    A = torch.randn(2, m, n, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda X: invariants(*metalcore.linalg.svd(X, full_matrices=False)), (A,))
    torch.autograd.gradcheck(metalcore.linalg.svdvals, (A,))

    def seed_invariants(X):
        U, S, V = seed_svd(X)
        return invariants(U, S, V.mT)

    torch.autograd.gradcheck(seed_invariants, (A,))


@pytest.mark.parametrize("full_matrices", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("m,n", [(6, 4), (4, 6), (5, 5)], ids=str)
def test_svd_gradient_matches_torch(m, n, full_matrices):
    # Also for full_matrices with m != n, where torch ignores the gradient of the extra columns of U
    # (rows of Vh): they are an arbitrary basis of the complement.
    A = torch.randn(3, m, n, dtype=torch.float64, requires_grad=True)
    ours = metalcore.linalg.svd(A, full_matrices=full_matrices)
    theirs = torch.linalg.svd(A, full_matrices=full_matrices)
    grads = [torch.randn_like(t) for t in theirs]
    g_ours, = torch.autograd.grad(ours, A, grads)
    g_theirs, = torch.autograd.grad(theirs, A, grads)
    torch.testing.assert_close(g_ours, g_theirs)
    # Each output alone (the others' gradients are None in the backward).
    for i in range(3):
        g_ours, = torch.autograd.grad(metalcore.linalg.svd(A, full_matrices=full_matrices)[i], A, grads[i])
        g_theirs, = torch.autograd.grad(torch.linalg.svd(A, full_matrices=full_matrices)[i], A, grads[i])
        torch.testing.assert_close(g_ours, g_theirs)


def test_svdvals_gradient_is_finite_for_repeated_singular_values():
    A = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1).requires_grad_()
    g = torch.randn(2, 4, dtype=torch.float64)
    ours, = torch.autograd.grad(metalcore.linalg.svdvals(A), A, g)
    theirs, = torch.autograd.grad(torch.linalg.svdvals(A), A, g)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs)


def test_svd_without_vectors_is_not_differentiable():
    A = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    U, S, Vh = svd_op(A, False, False)
    assert U.shape == (0,) and Vh.shape == (0,)
    with pytest.raises(RuntimeError, match="compute_uv=False"):
        S.sum().backward()


def test_svd_compiles_without_graph_breaks():
    A = torch.randn(3, 9, 5, dtype=torch.float32)
    compiled = torch.compile(lambda X: metalcore.linalg.svd(X, full_matrices=False), fullgraph=True)
    U, S, Vh = compiled(A)
    assert_lapack_ratio(residual_ratio(A, U @ torch.diag_embed(S) @ Vh, torch.float32), "compiled svd")
    torch.testing.assert_close(S, torch.linalg.svdvals(A))


# --- Strongly graded matrices: every backend's Jacobi converges (issue 25, item 7) ------------------

def strongly_graded(batch, m, n, row_decades, col_decades, dtype):
    """``B`` with its rows and columns scaled by ``10^(-d·U(0,1))`` in no particular order: ordinary
    finite matrices on which unpreconditioned Jacobi, or Jacobi on an unpivoted QR factor, needed
    more than the 30-sweep bound (and so answered NaN)."""
    B = torch.randn(*batch, m, n, dtype=torch.float64)
    rows = 10.0 ** (-row_decades * torch.rand(*batch, m, 1, dtype=torch.float64))
    cols = 10.0 ** (-col_decades * torch.rand(*batch, 1, n, dtype=torch.float64))
    return (B * rows * cols).to(dtype)


def assert_graded_svd(A, what):
    dtype = A.dtype
    U, S, Vh = metalcore.linalg.svd(A, full_matrices=False)
    assert not S.isnan().any(), f"{what}: NaN (no convergence) for a finite input"
    assert_lapack_ratio(residual_ratio(A, U @ torch.diag_embed(S) @ Vh, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(U, dtype), what + " U")
    assert_lapack_ratio(orthogonality_ratio(Vh.mT, dtype), what + " V")


def test_svd_strongly_graded_converges_triton(triton_backend):
    # fp64 64x64 with column scales over 30 decades: Jacobi on the unpivoted QR factor took 31-35
    # sweeps (NaN); fp32 32x32 likewise, and with rows and columns over 8 decades each: 13-99 sweeps.
    assert_graded_svd(strongly_graded((1,), 64, 64, 0, 30, torch.float64), "triton graded fp64 64x64")
    assert_graded_svd(strongly_graded((3,), 32, 32, 0, 30, torch.float32), "triton graded fp32 32x32")
    assert_graded_svd(strongly_graded((3,), 32, 32, 8, 8, torch.float32), "triton graded rows+cols fp32 32x32")


def test_svd_strongly_graded_converges_metal():
    from metalcore import _metal
    from backends import unavailable
    if _metal.executor() is None:
        unavailable("the Metal shader executor cannot be built here (needs clang++ >= 17)")
    # fp32 33x33 with column scales over 30 decades: without preconditioning 3-5 of 12 came back NaN.
    with metalcore.use_backend("metal"):
        assert_graded_svd(strongly_graded((12,), 33, 33, 0, 30, torch.float32), "metal graded fp32 33x33")
        assert_graded_svd(strongly_graded((4,), 24, 40, 0, 30, torch.float32), "metal graded fp32 24x40")
        assert_graded_svd(strongly_graded((4,), 33, 33, 8, 8, torch.float32), "metal graded rows+cols fp32 33x33")


# --- Register-tile one-sided Jacobi (svd_batched_triton) ---------------------------------------------

from linalg_matrices import KINDS, general, scale_of  # noqa: E402


def _register_svd(A, precondition=True, full=False):
    from metalcore.linalg.svd_triton import svd_launch
    return svd_launch(A, full, True, precondition=precondition, registers=True)


def _assert_svd(A, U, S, Vh, dtype, what, scale=1.0):
    assert not S.isnan().any(), f"{what}: NaN"
    assert bool((S[..., 1:] <= S[..., :-1]).all()), f"{what}: singular values must descend"
    recon = U.double() @ torch.diag_embed(S.double() / scale) @ Vh.double()
    assert_lapack_ratio(residual_ratio(A.double() / scale, recon, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(U, dtype), what + " U")
    assert_lapack_ratio(orthogonality_ratio(Vh, dtype, rows=True), what + " Vh")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_register_svd_matrix_families(kind, dtype, triton_backend):
    for m, n in ((13, 9), (9, 13)):
        A = general(kind, (2,), m, n, dtype)
        U, S, Vh = _register_svd(A)
        _assert_svd(A, U, S, Vh, dtype, f"register svd {kind} {m}x{n} {dtype}", scale_of(kind, dtype))


@pytest.mark.parametrize("precondition", [True, False], ids=["qr", "no-qr"])
def test_register_svd_sizes(precondition, triton_backend):
    for m, n in ((1, 1), (3, 3), (8, 8), (32, 32), (32, 5)):
        A = torch.randn(3, m, n, dtype=torch.float32)
        U, S, Vh = _register_svd(A, precondition)
        _assert_svd(A, U, S, Vh, torch.float32, f"register svd {m}x{n}")


def test_register_svd_nan_stays_in_its_matrix(triton_backend):
    A = torch.randn(3, 6, 6)
    A[1, 0, 0] = float("inf")
    _, S, _ = _register_svd(A, precondition=False)
    assert S[1].isnan().all() and not S[[0, 2]].isnan().any()


@pytest.mark.parametrize("n", [8, 3])
def test_register_svd_converges_on_the_batches_that_hung_the_scratch_kernel(n, triton_backend):
    """The shapes and seed of bench/scripts/svd_small_probe.py, whose 200×8 and 10000×3 batches
    never finished with the scratch kernel on the H100 (the matrices there come from CUDA's
    generator; the device check batched_eigh_svd_check.py replays those, this replays the shapes)."""
    torch.manual_seed(0)
    A = torch.randn(200, n, n)
    for precondition in (False, True):
        U, S, Vh = _register_svd(A, precondition)
        _assert_svd(A, U, S, Vh, torch.float32, f"register svd 200x{n} pre={precondition}")


# --- The preconditioned register path in one launch (svd_fused_triton) --------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", [(16, 16), (32, 32), (32, 7), (7, 32), (2, 1), (1, 3)], ids=str)
def test_fused_svd_shapes_and_values_only(m, n, dtype, triton_backend):
    from metalcore.linalg.svd_fused_triton import svd_fused
    A = torch.randn(3, m, n, dtype=dtype)
    sweeps = torch.zeros(3, dtype=torch.int32)
    U, S, Vh = svd_fused(A, m == n, True, sweeps=sweeps)
    k = min(m, n)
    assert (U.shape, S.shape, Vh.shape) == ((3, m, k), (3, k), (3, k, n))
    _assert_svd(A, U, S, Vh, dtype, f"fused svd {m}x{n}")
    assert bool((sweeps >= 1).all()) and bool((sweeps < 30).all())
    # Values only run the same Jacobi on the same Rᵀ: the same bits.
    _, S_only, _ = svd_fused(A, False, False)
    assert torch.equal(S_only, S)


def test_fused_svd_is_what_the_register_path_runs_and_matches_the_chain(triton_backend):
    from metalcore.linalg.svd_triton import svd_launch
    A = torch.randn(4, 12, 9, dtype=torch.float64)
    U, S, Vh = svd_launch(A, False, True, registers=True)
    Uc, Sc, Vhc = svd_launch(A, False, True, registers=True, fused=False)
    # Same algorithm, different rounding: singular values to the LAPACK bound, vectors up to sign.
    assert_lapack_ratio(((S - Sc).abs().amax(-1) / (S[..., 0] * 12 * eps(torch.float64))).max().item(), "S vs chain")
    assert_lapack_ratio(((U * Uc).sum(-2).abs() - 1).abs().amax().item() / (12 * eps(torch.float64)), "U vs chain")
    assert_lapack_ratio(((Vh * Vhc).sum(-1).abs() - 1).abs().amax().item() / (12 * eps(torch.float64)), "V vs chain")


def test_fused_svd_full_matrices_of_a_rectangular_matrix_keeps_the_chain(triton_backend):
    from metalcore.linalg.svd_fused_triton import svd_fused
    from metalcore.linalg.svd_triton import svd_launch
    A = torch.randn(2, 9, 5)
    with pytest.raises(ValueError, match="full_matrices"):
        svd_fused(A, True, True)
    U, S, Vh = svd_launch(A, True, True, registers=True)
    assert U.shape == (2, 9, 9) and Vh.shape == (2, 5, 5)
    assert_lapack_ratio(orthogonality_ratio(U, torch.float32), "complete U")


def test_fused_svd_nan_stays_in_its_matrix(triton_backend):
    from metalcore.linalg.svd_fused_triton import svd_fused
    A = torch.randn(5, 6, 4)
    A[2, 3, 1] = float("nan")
    A[4, 0, 0] = float("-inf")
    U, S, Vh = svd_fused(A, False, True)
    for out in (U, S, Vh):
        assert out[[2, 4]].isnan().all() and not out[[0, 1, 3]].isnan().any()


def test_registers_path_runs_the_fused_launch_through_the_op(triton_backend):
    from metalcore import _selection
    A = torch.randn(4, 9, 6)
    with _selection.use_path("svd", "registers"):
        for full in (False, True):                 # 9×6 complete: the chain; reduced: the fused launch
            U, S, Vh = metalcore.linalg.svd(A, full_matrices=full)
            U, S, Vh = metalcore.linalg.svd(A, full_matrices=full)
            k = 6
            _assert_svd(A, U[..., :k], S, Vh[..., :k, :], torch.float32, f"registers path full={full}")


def test_chain_path_serves_the_op_when_routed(triton_backend, monkeypatch):
    from metalcore import _selection
    from metalcore.linalg import svd_fused_triton
    monkeypatch.setattr(svd_fused_triton, "_fused_svd_kernel", None)    # the chain must not use it
    A = torch.randn(3, 7, 7)
    with _selection.use_path("svd", "chain"):
        U, S, Vh = metalcore.linalg.svd(A)
    _assert_svd(A, U, S, Vh, torch.float32, "chain path")


# --- Bidiagonalisation, bisection and inverse iteration (svd_bidiag_triton) -----------------------------

from oracle import values_ratio  # noqa: E402


def _bidiag(A, compute_uv=True, **kw):
    from metalcore.linalg.svd_bidiag_triton import svd_bidiag
    return svd_bidiag(A, compute_uv, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_bidiag_svd_matrix_families(kind, dtype, triton_backend):
    """A tall 13×9 and its wide transpose (read through strides), 2 matrices each: LAPACK's ratios
    against float64, the values alone equal to the values with vectors."""
    for A in (general(kind, (2,), 13, 9, dtype), general(kind, (2,), 9, 13, dtype)):
        U, S, Vh = _bidiag(A)
        what = f"bidiag svd {kind} {tuple(A.shape)} {dtype}"
        _assert_svd(A, U, S, Vh, dtype, what, scale_of(kind, dtype))
        assert_lapack_ratio(values_ratio(S.double(), torch.linalg.svdvals(A.double()), dtype), what + " values")
        assert torch.equal(_bidiag(A, False)[1], S), what + ": values alone"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bidiag_svd_at_its_largest_side_and_rank_deficient(dtype, triton_backend):
    """128² (MAX_N, κ = 1/ε), a rank-3 40×20 whose 17 zero singular values are T_GK's 34 zero
    eigenvalues (and its transpose), the zero matrix, the identity, and repeated values next to zeros."""
    from metalcore.linalg.svd_bidiag_triton import MAX_N
    torch.manual_seed(1)
    rank3 = torch.randn(1, 40, 3, dtype=torch.float64) @ torch.randn(1, 3, 20, dtype=torch.float64)
    Q1, Q2 = (torch.linalg.qr(torch.randn(1, 30, 30, dtype=torch.float64))[0] for _ in range(2))
    repeated = (Q1 * torch.tensor([1.0] * 10 + [1e-3] * 10 + [0.0] * 10, dtype=torch.float64)) @ Q2
    for A in (general("ill", (1,), MAX_N, MAX_N, dtype), rank3.to(dtype), rank3.mT.to(dtype),
              torch.zeros(1, 24, 24, dtype=dtype), torch.eye(17, dtype=dtype)[None], repeated.to(dtype)):
        U, S, Vh = _bidiag(A)
        what = f"{tuple(A.shape)} {dtype}"
        _assert_svd(A, U, S, Vh, dtype, what)
        assert_lapack_ratio(values_ratio(S.double(), torch.linalg.svdvals(A.double()), dtype), what + " values")
        assert (S >= 0).all(), what + ": non-negative"
        if not A.any():
            assert torch.equal(S, torch.zeros_like(S)), what + ": the zero matrix's values are exactly 0"


def test_bidiag_svd_short_halves_of_zero_singular_values(triton_backend):
    """Rank-4 12×8 matrices in fp32 with bisection: in one of them (index 7) the u-halves of the zero
    singular values were short, and normalising them magnified their rounding-level share of the
    other lanes' directions to an orthogonality ratio of 164 until those lanes were orthogonalised
    against every other lane."""
    torch.manual_seed(5)
    for r in (0, 2, 4):                                    # the draws of the batch that measured 164
        A = torch.randn(24, 12, r, dtype=torch.float64) @ torch.randn(24, r, 8, dtype=torch.float64)
    A = A.float()
    U, S, Vh = _bidiag(A, sections=1)
    _assert_svd(A, U, S, Vh, torch.float32, "rank 4, 12×8")


@pytest.mark.parametrize("m,n", [(1, 1), (2, 2), (1, 5), (5, 1), (3, 8), (17, 17)], ids=str)
def test_bidiag_svd_sizes_batch_shapes_and_schedules(m, n, triton_backend):
    """Every shape class, batch dims (2, 1), column-major strides, bisection and 8-point multisection,
    and more matrices than persistent programs."""
    A = torch.randn(2, 1, m, n, dtype=torch.float64)
    expected = torch.linalg.svdvals(A)
    for U, S, Vh in (_bidiag(A, sections=1), _bidiag(A, sections=8), _bidiag(A.mT.contiguous().mT, programs=1)):
        k = min(m, n)
        assert (U.shape, S.shape, Vh.shape) == ((2, 1, m, k), (2, 1, k), (2, 1, k, n))
        _assert_svd(A, U, S, Vh, torch.float64, f"{m}x{n}")
        assert_lapack_ratio(values_ratio(S, expected, torch.float64), f"{m}x{n} values")
    assert _bidiag(A, False)[0].numel() == 0


def test_bidiag_svd_back_transformation_in_a_separate_kernel(triton_backend):
    """``split_back``: both factors' reflectors applied by ``_reflect_kernel`` (a program per matrix
    and block of columns, through the outputs' strides: ``U`` and ``Vh``, transposed for a wide
    matrix) instead of the kernel's loop: equal results in the interpreter, LAPACK's ratios, NaN
    confined to its matrix."""
    torch.manual_seed(7)
    for A in (general("rank", (3,), 40, 19, torch.float64), general("random", (3,), 6, 37, torch.float32)):
        A[1, 2, 3] = float("nan")
        U0, S0, V0 = _bidiag(A)
        for columns in (16, 32):
            U, S, Vh = _bidiag(A, split_back=columns)
            what = f"{tuple(A.shape)} {A.dtype} split {columns}"
            for got, expected in ((U, U0), (S, S0), (Vh, V0)):
                assert torch.equal(got.nan_to_num(), expected.nan_to_num()), what
            assert U[1].isnan().all() and Vh[1].isnan().all(), what
            _assert_svd(A[[0, 2]], U[[0, 2]], S[[0, 2]], Vh[[0, 2]], A.dtype, what)


def test_bidiag_svd_nan_stays_in_its_matrix_and_serves_the_op_when_routed(triton_backend):
    from metalcore import BackendUnavailableError, _selection
    A = torch.randn(3, 10, 6)
    A[1, 2, 3] = float("inf")
    with _selection.use_path("svd", "bidiag"):
        S = metalcore.linalg.svdvals(A)
        U, S2, Vh = metalcore.linalg.svd(A, full_matrices=False)
        square = torch.randn(2, 6, 6)
        Us, Ss, Vhs = metalcore.linalg.svd(square)                                # full = reduced
        with pytest.raises(BackendUnavailableError, match="'bidiag' does not"):
            metalcore.linalg.svd(A)                                                # complete U: not this path
    assert torch.equal(S.nan_to_num(-1.0), S2.nan_to_num(-1.0)), "the values alone"
    assert S[1].isnan().all() and U[1].isnan().all() and Vh[1].isnan().all()
    assert not (S[[0, 2]].isnan().any() or U[[0, 2]].isnan().any() or Vh[[0, 2]].isnan().any())
    _assert_svd(A[[0, 2]], U[[0, 2]], S[[0, 2]], Vh[[0, 2]], torch.float32, "the other matrices")
    _assert_svd(square, Us, Ss, Vhs, torch.float32, "square through the op")


@pytest.mark.parametrize("path,launcher", [("registers", "svd_fused_launcher"), ("bidiag", "svd_bidiag_launcher")])
def test_svd_path_is_specialized_once_per_signature(path, launcher, triton_backend, monkeypatch):
    """An alternative path's ``specialize`` is kept in the op's plan like the kernel's: the launch is
    bound once per call signature (values and vectors are two), and other strides make another."""
    from metalcore import _selection
    from metalcore.linalg import svd_triton
    built = []
    original = getattr(svd_triton, launcher)
    monkeypatch.setattr(svd_triton, launcher, lambda A, *a, **k: built.append(A.stride()) or original(A, *a, **k))
    _selection._clear_plans()
    A = torch.randn(3, 7, 5)
    column_major = A.mT.contiguous().mT
    with _selection.use_path("svd", path):
        for _ in range(3):
            S = metalcore.linalg.svdvals(A)
            U, S2, Vh = metalcore.linalg.svd(A, full_matrices=False)
        S3 = metalcore.linalg.svdvals(column_major)                              # another signature
    assert built == [A.stride(), A.stride(), column_major.stride()]
    assert torch.equal(S, S2) and torch.equal(S, S3)
    _assert_svd(A, U, S, Vh, torch.float32, f"specialized {path} path")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n", [(100, 64, 64), (64, 128, 128), (1000, 32, 32), (16, 100, 40), (300, 40, 100)],
                         ids=str)
def test_gpu_bidiag_svd_full_size(batch, m, n, dtype, triton_backend, device):
    """The compiled path at the sizes the sweep times it, on every matrix family, with and without
    vectors."""
    from metalcore import _selection
    for kind in KINDS:
        A = general(kind, (batch,), m, n, dtype).to(device)
        with _selection.use_path("svd", "bidiag"):
            S = metalcore.linalg.svdvals(A)
            U, S2, Vh = metalcore.linalg.svd(A, full_matrices=False)
        what = f"bidiag svd {kind} {batch}×{m}×{n} {dtype}"
        assert_lapack_ratio(values_ratio(S.double().cpu(), torch.linalg.svdvals(A.double().cpu()), dtype), what)
        assert bool((S[..., :-1] >= S[..., 1:]).all()), what + ": descending"
        _assert_svd(A.cpu(), U.cpu(), S2.cpu(), Vh.cpu(), dtype, what, scale_of(kind, dtype))
