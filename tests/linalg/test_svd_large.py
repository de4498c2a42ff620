"""svd_large (QR + QDWH + eigh), the svd op's large-matrix path, run directly at small sizes on the CPU."""

import pytest
import torch

from backends import expected_backend

import metalcore
from cases import DTYPES, noncontiguous, shape_id
from linalg_matrices import case_id
from linalg_matrices import KINDS, general, scale_of
from metalcore import _metal
from metalcore.linalg import qr_blocked_metal, svd_large as svd_large_metal, svd_metal
from metalcore.linalg import svd_large as svd_large_module
from metalcore.linalg.svd import svd_op
from metalcore.linalg.svd_large import LARGE_MIN_N, large_supported, svd_large
from oracle import assert_lapack_ratio, assert_within_torch_error, eps, orthogonality_ratio, residual_ratio


# Square, tall enough for the QR-first path (m > 1.15 n), barely tall (QDWH on the m × n matrix), wide.
SHAPES = [(1, 1), (2, 1), (1, 3), (5, 5), (16, 16), (33, 16), (16, 33), (35, 31), (31, 35), (8, 3)]
BATCHES = ((), (0,), (3,), (2, 2))
CASES = [(b, m, n) for b in BATCHES for m, n in SHAPES if not (len(b) == 2 and max(m, n) > 16)]


def check_svd(A, U, S, Vh, dtype, what, full_matrices=False):
    *batch, m, n = A.shape
    k = min(m, n)
    u, v = (m, n) if full_matrices else (k, k)
    assert (U.shape, S.shape, Vh.shape) == ((*batch, m, u), (*batch, k), (*batch, v, n)), what
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert_lapack_ratio(residual_ratio(A, U[..., :k] @ torch.diag_embed(S) @ Vh[..., :k, :], dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(U, dtype), what + " U")
    assert_lapack_ratio(orthogonality_ratio(Vh, dtype, rows=True), what + " Vh")
    assert bool((S[..., :-1] >= S[..., 1:]).all()) and bool((S >= 0).all()), what + " S descending, >= 0"


@pytest.mark.parametrize("full_matrices", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n", CASES, ids=[shape_id(*c[:1], *c[1:]) for c in CASES])
def test_svd_large_lapack_ratios(batch, m, n, dtype, full_matrices):
    A = torch.randn(*batch, m, n, dtype=dtype)
    U, S, Vh = svd_large(noncontiguous(A), full_matrices, True)
    check_svd(A, U, S, Vh, dtype, f"svd_large {shape_id(batch, m, n)}", full_matrices)
    assert_within_torch_error(S, torch.linalg.svdvals(A), torch.linalg.svdvals(A.double()))
    U0, S0, Vh0 = svd_large(A, full_matrices, False)
    assert U0.shape == Vh0.shape == (0,)
    assert_within_torch_error(S0, torch.linalg.svdvals(A), torch.linalg.svdvals(A.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,n", [(16, 16), (33, 16), (16, 31)], ids=str)
def test_svd_large_hard_families(kind, m, n, dtype):
    """Ill-conditioned (κ up to 1e6 fp32 / 1e12 fp64), rank-deficient (the completion of U's columns
    for zero singular values), clustered, graded, and near the under/overflow scales."""
    A = general(kind, (2,), m, n, dtype)
    for full_matrices in (False, True):
        U, S, Vh = svd_large(A, full_matrices, True)
        # The oracle's Frobenius norm squares entries: judge the tiny/huge families at unit scale.
        s = scale_of(kind, dtype)
        check_svd(A / s, U, S / s, Vh, dtype, f"svd_large {kind} {m}x{n} {dtype}", full_matrices)
        expected = torch.linalg.svdvals(A.double() / s)
        assert (S.double() / s - expected).abs().max() <= 30 * max(m, n) * eps(dtype) * expected.amax()


def test_svd_large_rank_zero_and_empty():
    U, S, Vh = svd_large(torch.zeros(3, 20, 12), False, True)
    assert (S == 0).all()
    check_svd(torch.zeros(3, 20, 12), U, S, Vh, torch.float32, "zero matrix")
    for shape in [(0, 5), (5, 0), (2, 0, 3), (0, 4, 4)]:
        for full_matrices in (False, True):
            for got, want in zip(svd_large(torch.randn(shape), full_matrices, True),
                                 torch.linalg.svd(torch.randn(shape), full_matrices=full_matrices)):
                assert got.shape == want.shape


def test_svd_large_paths_agree(monkeypatch):
    """The QR-first path and QDWH on the tall matrix itself compute the same decomposition."""
    A = torch.randn(4, 40, 20, dtype=torch.float64)
    direct = svd_large(A, True, True)
    monkeypatch.setattr(svd_large_module, "TALL_QR_RATIO", 10.0)
    via_qdwh = svd_large(A, True, True)
    torch.testing.assert_close(via_qdwh[1], direct[1], atol=1e-13, rtol=0)
    k = 20
    torch.testing.assert_close(via_qdwh[0][..., :k] @ torch.diag_embed(via_qdwh[1]) @ via_qdwh[2],
                               direct[0][..., :k] @ torch.diag_embed(direct[1]) @ direct[2], atol=1e-12, rtol=0)
    check_svd(A, *via_qdwh, torch.float64, "direct path, full", True)


def test_large_supported():
    n = LARGE_MIN_N
    assert large_supported(torch.empty(n, n)) and large_supported(torch.empty(2, 3 * n, n, dtype=torch.float64))
    assert not large_supported(torch.empty(n - 1, 4 * n))
    assert not large_supported(torch.empty(n, n, dtype=torch.bfloat16))


# --- Metal (executor in CI): the large-SVD route --------------------------------------------------
# The metal svd implementation's large-matrix route (metalcore/linalg/svd_metal.py → svd_large:
# QR + QDWH polar + eigh), with its QRs on the blocked Metal QR (geqr2_panel shader) through the
# executor on CPU tensors. Thresholds are forced small (Jacobi shader up to side 16, svd_large from
# both sides 20, blocked QR beyond 16, panels of 8), so the route runs at test sizes; LAPACK's ratios
# against float64.


F32 = torch.float32
# Tall enough for svd_large_metal's first QR (m > 1.15 n), near-square, wide, and a batch.
SHAPES_metal = [((), 80, 24), ((), 30, 28), ((), 24, 60), ((2,), 40, 22)]


@pytest.fixture
def _large_at_small_sizes(executor, monkeypatch):
    monkeypatch.setattr(svd_metal, "JACOBI_MAX", 16)
    monkeypatch.setattr(svd_large_metal, "LARGE_MIN_N", 20)
    monkeypatch.setattr(qr_blocked_metal, "SMALL_MAX", 16)
    monkeypatch.setattr(qr_blocked_metal, "NB", 8)
    with metalcore.use_backend("metal"):
        yield


def _values_ratio(S, A, scale):
    """max |σ − σ₆₄| / (σ₁ max(m, n) ε): singular values to ε‖A‖ absolutely, as gesdd gives them."""
    S64 = torch.linalg.svdvals(A.double() / scale)
    err = (S.double() / scale - S64).abs().amax(-1) / (S64[..., :1].squeeze(-1) * max(A.shape[-2:]) * eps(F32))
    return err.max().item()


def _svd(A, full_matrices, compute_uv):
    assert svd_op.backend_for(A, full_matrices, compute_uv) == expected_backend("metal", A, full_matrices, compute_uv)
    _metal.launched.clear()
    U, S, Vh = svd_op(A, full_matrices, compute_uv)
    assert "geqr2_panel_float" in _metal.launched, "svd_large's QRs run on the blocked Metal QR"
    assert "jacobi_svd_float" not in _metal.launched
    return U, S, Vh


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_large_at_small_sizes")
@pytest.mark.parametrize("full_matrices", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("batch,m,n", SHAPES_metal, ids=[case_id(*s) for s in SHAPES_metal])
def test_large_svd_lapack_ratio(batch, m, n, full_matrices):
    A = general("random", batch, m, n, F32)
    U, S, Vh = _svd(A, full_matrices, True)
    k = min(m, n)
    assert U.shape == (*batch, m, m if full_matrices else k) and Vh.shape == (*batch, n if full_matrices else k, n)
    recon = (U[..., :k].double() * S.double().unsqueeze(-2)) @ Vh[..., :k, :].double()
    what = case_id(batch, m, n)
    assert_lapack_ratio(residual_ratio(A.double(), recon, F32), f"svd {what}")
    assert_lapack_ratio(orthogonality_ratio(U, F32), f"svd U {what}")
    assert_lapack_ratio(orthogonality_ratio(Vh, F32, rows=True), f"svd Vh {what}")
    assert_lapack_ratio(_values_ratio(S, A, 1.0), f"svd values {what}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_large_at_small_sizes")
@pytest.mark.parametrize("kind", ("ill", "rank"))
def test_large_svd_hard_matrices(kind):
    A = general(kind, (), 70, 24, F32)
    s = scale_of(kind, F32)
    U, S, Vh = _svd(A, False, True)
    recon = (U.double() * (S.double() / s).unsqueeze(-2)) @ Vh.double()
    assert_lapack_ratio(residual_ratio(A.double() / s, recon, F32), f"svd {kind}")
    assert_lapack_ratio(orthogonality_ratio(U, F32), f"svd U {kind}")
    assert_lapack_ratio(orthogonality_ratio(Vh, F32, rows=True), f"svd Vh {kind}")
    assert_lapack_ratio(_values_ratio(S, A, s), f"svd values {kind}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_large_at_small_sizes")
def test_large_svd_values_only():
    A = general("random", (), 60, 24, F32)
    U, S, Vh = _svd(A, False, False)
    assert U.numel() == 0 and Vh.numel() == 0
    assert_lapack_ratio(_values_ratio(S, A, 1.0), "svdvals")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_large_at_small_sizes")
def test_large_route_thresholds(monkeypatch):
    """At the default thresholds (JACOBI_MAX is the tile side)."""
    max_n = _metal.constants()["METALCORE_LINALG_MAX_N"]
    monkeypatch.setattr(svd_metal, "JACOBI_MAX", max_n)
    monkeypatch.setattr(svd_large_metal, "LARGE_MIN_N", 1024)
    assert svd_op.backend_for(torch.ones(max_n, max_n), False, True) == expected_backend("metal", torch.ones(max_n, max_n), False, True)  # the Jacobi shader
    assert svd_op.backend_for(torch.ones(max_n + 1, max_n + 1), False, True) == "reference"
    assert svd_op.backend_for(torch.ones(1023, 2000), False, True) == "reference"
    assert svd_op.backend_for(torch.ones(1024, 1024), False, True) == expected_backend("metal", torch.ones(1024, 1024), False, True)
    assert svd_op.backend_for(torch.ones(1024, 1023), False, True) == "reference"
    assert svd_op.backend_for(torch.ones(1024, 1024, dtype=torch.float64), False, True) == "reference"


# --- The svd op's "qdwh" alternative path: batches of sides from 33 ----------------------------------
# The path function is svd_large itself, registered on the triton backend (metalcore/linalg/svd_triton.py)
# for min(m, n) >= PATH_MIN_N. Called here as the selection table would call it, on CPU tensors: its QRs
# and its eigh go through metalcore's ops, which run the reference here (as they do on CUDA where their
# own routing or table says so), so these tests judge the algorithm and its batching at the sizes the
# path starts from.

PATH_SHAPES = [(33, 33), (65, 40), (129, 129), (130, 130), (200, 140), (140, 200)]
PATH_BATCHES = [(3,), (2, 2)]


@pytest.fixture
def qdwh_path():
    """The registered path function (importing the triton backend registers it)."""
    from backends import unavailable
    from metalcore._backend import triton_importable
    if not triton_importable():
        unavailable("triton is not importable: the svd paths of the triton backend are not registered")
    import metalcore.linalg.svd_triton  # noqa: F401  (registers the path)
    from metalcore import _selection
    return _selection.paths("svd", "triton")["qdwh"].fn


def _values_ratio64(S, A64, scale):
    """max |σ − σ₆₄| / (σ₁ max(m, n) ε) against float64 torch: singular values to ε‖A‖ absolutely (a zero
    matrix's exact zeros count as error 0, not 0/0)."""
    S64 = torch.linalg.svdvals(A64 / scale)
    top = S64[..., 0].clamp_min(torch.finfo(torch.float64).tiny)
    return ((S.double() / scale - S64).abs().amax(-1) / (top * max(A64.shape[-2:]) * eps(S.dtype))).max().item()


def _check_path(fn, A, full_matrices, what, scale=1.0):
    dtype = A.dtype
    U, S, Vh = fn(A, full_matrices, True)
    check_svd(A / scale, U, S / scale, Vh, dtype, what, full_matrices)
    A64 = A.double()
    assert_lapack_ratio(_values_ratio64(S, A64, scale), what + " values")
    U0, S0, Vh0 = fn(A, full_matrices, False)
    assert U0.shape == Vh0.shape == (0,) and S0.shape == S.shape
    assert_lapack_ratio(_values_ratio64(S0, A64, scale), what + " svdvals")


@pytest.mark.parametrize("full_matrices", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", PATH_BATCHES, ids=lambda b: "B" + "x".join(map(str, b)))
@pytest.mark.parametrize("m,n", PATH_SHAPES, ids=lambda s: str(s))
def test_qdwh_path_batched_shapes(qdwh_path, m, n, batch, dtype, full_matrices):
    """Square at the path's first side (33) and above the Jacobi kernels' 128 (129, 130), tall enough for the QR-first step (200×140) and
    wide (140×200), over 1-D and 2-D batches, non-contiguous input."""
    A = torch.randn(*batch, m, n, dtype=dtype)
    _check_path(qdwh_path, noncontiguous(A), full_matrices, f"qdwh path {shape_id(batch, m, n)} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_qdwh_path_hard_families(qdwh_path, kind, dtype):
    """Every family of tests/linalg_matrices.py in a batch of 3 — ill-conditioned (κ 1e6 fp32 / 1e12
    fp64), rank-deficient (U's columns completed), clustered, graded, tiny/huge-scaled — each family
    on one of the path's shapes in turn."""
    i = KINDS.index(kind) + DTYPES.index(dtype)
    m, n = PATH_SHAPES[i % len(PATH_SHAPES)]
    A = general(kind, (3,), m, n, dtype)
    for full_matrices in (False, True):
        _check_path(qdwh_path, A, full_matrices, f"qdwh path {kind} {m}x{n} {dtype}", scale_of(kind, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qdwh_path_mixed_batch(qdwh_path, dtype):
    """One rank-deficient and one zero matrix among full-rank ones: the completing QR then runs for the
    whole batch, and must leave the full-rank matrices' factors as accurate as the rest."""
    A = torch.stack([general("random", (), 140, 130, dtype), general("rank", (), 140, 130, dtype),
                     torch.zeros(140, 130, dtype=dtype), general("ill", (), 140, 130, dtype)])
    for full_matrices in (False, True):
        _check_path(qdwh_path, A, full_matrices, f"qdwh path mixed batch {dtype}")


def test_qdwh_path_support_and_routing(monkeypatch):
    """The path takes float32/float64 from min(m, n) = 33, any batch; automatic selection never runs it
    without a measured table; forced, the op runs svd_large through it."""
    from backends import unavailable
    from metalcore._backend import triton_importable
    if not triton_importable():
        unavailable("triton is not importable: the svd paths of the triton backend are not registered")
    import metalcore.linalg.svd_triton  # noqa: F401  (registers the path)
    from metalcore import _selection
    path = _selection.paths("svd", "triton")["qdwh"]
    assert path.fn is svd_large
    for shape, dtype, takes in [((33, 33), torch.float32, True), ((32, 4000), torch.float32, False),
                                ((1, 4000, 129), torch.float64, True), ((5, 2, 300, 200), torch.float32, True),
                                ((300, 300), torch.bfloat16, False)]:
        assert path.supports(torch.empty(shape, dtype=dtype), False, True) is takes, (shape, dtype)
    kernel = svd_op.kernels["triton"]
    mid = torch.empty(16, 256, 256)
    assert kernel.supports(mid, False, True) and not kernel.automatic(mid, False, True)
    assert kernel.automatic(torch.empty(LARGE_MIN_N, LARGE_MIN_N), False, True)
    # Forced through the op on the triton backend (the interpreter's; one matrix, whose QRs then take
    # torch's geqrf panels and GEMMs): the path runs, the kernel's own routing at this side is torch's.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    A = torch.randn(130, 129, dtype=torch.float64)
    spy = lambda *args: calls.append(args) or svd_large(*args)  # noqa: E731
    monkeypatch.setitem(_selection._PATHS[("svd", "triton")], "qdwh", _selection.AlternativePath(
        "svd", "triton", "qdwh", spy, path.supports))
    with metalcore.use_backend("triton"), _selection.use_path("svd", "qdwh"):
        U, S, Vh = metalcore.linalg.svd(A, full_matrices=False)
    assert len(calls) == 1
    check_svd(A, U, S, Vh, torch.float64, "qdwh path through the op")
    with metalcore.use_backend("triton"), _selection.use_path("svd", "kernel"):
        metalcore.linalg.svd(A, full_matrices=False)
    assert len(calls) == 1, "the kernel's own routing does not take the path at side 129"
