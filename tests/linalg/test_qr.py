import importlib

import pytest
import torch

from backends import expected_backend

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous, shape_id
from linalg_matrices import BATCHES as BATCHES_triton, DTYPES as DTYPES_triton, KINDS, SIZES as SIZES_triton
from linalg_matrices import case_id, general, scale_of
from linalg_matrices import HARD, METAL_CASES as CASES_metal, METAL_MAX_N as MAX_N, METAL_SIZES as SIZES_metal
from metalcore import _metal
from metalcore.linalg.householder import geqr2, geqr2_op, householder_product_op
from metalcore.linalg.qr import qr_op
from metalcore.linalg.qr import qr_batched
from oracle import assert_lapack_ratio, assert_like_torch, orthogonality_ratio, residual_ratio, vjp


def matrix_shapes(n):
    """Square, tall and wide shapes with largest side n."""
    return [(n, n)] if n == 1 else [(n, n), (n, (n + 1) // 2), ((n + 1) // 2, n)]


# Batches of 2x3 skip the largest sizes: the small sizes already cover the batch logic.
CASES = [(b, mn) for b in BATCHES for n in SIZES for mn in matrix_shapes(n) if not (len(b) == 2 and n > 33)]
CASE_IDS = [shape_id(b, *mn) for b, mn in CASES]


def check_qr(A, Q, R, mode, dtype, what):
    *batch, m, n = A.shape
    k = min(m, n)
    q_cols = m if mode == "complete" else k
    assert Q.shape == (*batch, m, q_cols) and R.shape == (*batch, q_cols, n)
    assert Q.dtype == R.dtype == dtype
    assert torch.equal(R, R.triu()), "R must be exactly upper triangular"
    assert_lapack_ratio(residual_ratio(A, Q @ R, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), what + " Q")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,mn", CASES, ids=CASE_IDS)
def test_qr_lapack_ratios(batch, mn, dtype):
    A = torch.randn(*batch, *mn, dtype=dtype)
    Q, R = metalcore.linalg.qr(A)
    check_qr(A, Q, R, "reduced", dtype, f"qr {shape_id(batch, *mn)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", [(33, 16), (16, 33), (31, 31), (65, 1)], ids=str)
def test_qr_complete_and_r_modes(m, n, dtype):
    A = torch.randn(7, m, n, dtype=dtype)
    Q, R = metalcore.linalg.qr(A, mode="complete")
    check_qr(A, Q, R, "complete", dtype, "qr complete")
    Q, R = metalcore.linalg.qr(A, mode="r")
    assert Q.shape == (0,) and R.shape == (7, min(m, n), n)
    assert torch.equal(R, R.triu())
    # R alone is judged by RᴴR = AᴴA (its rows' signs are free): the LAPACK ratio of that product.
    assert_lapack_ratio(residual_ratio(A.mH @ A, R.mH @ R, dtype), "qr mode='r'")


def test_qr_noncontiguous_out_and_return_type():
    A = torch.randn(3, 9, 6, dtype=torch.float64)
    result = metalcore.linalg.qr(noncontiguous(A))
    assert isinstance(result, torch.return_types.linalg_qr)
    check_qr(A, result.Q, result.R, "reduced", torch.float64, "noncontiguous")
    out = (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
    result = metalcore.linalg.qr(A, out=out)
    assert isinstance(result, torch.return_types.linalg_qr) and result.Q is out[0] and result.R is out[1]
    check_qr(A, *out, "reduced", torch.float64, "out")


def test_qr_batched_is_qr():
    assert qr_batched is metalcore.linalg.qr
    A = torch.randn(500, 16, 16, dtype=torch.float32)
    Q, R = qr_batched(A)
    check_qr(A, Q, R, "reduced", torch.float32, "qr_batched")


def test_qr_rejects_bad_input():
    A = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"metalcore.linalg.qr: mode must be one of 'reduced', 'complete', 'r'; got 'full'"):
        metalcore.linalg.qr(A, mode="full")
    with pytest.raises(TypeError, match=r"metalcore.linalg.qr: A must have dtype"):
        metalcore.linalg.qr(A.to(torch.complex128))
    with pytest.raises(ValueError, match=r"metalcore.linalg.qr: A must be a matrix"):
        metalcore.linalg.qr(torch.randn(3, dtype=torch.float64))


def well_conditioned(batch, m, n):
    """Random columns plus a scaled identity block: R's diagonal stays far from zero."""
    return torch.randn(*batch, m, n, dtype=torch.float64) + 3 * torch.eye(m, n, dtype=torch.float64)


@pytest.mark.parametrize("mode,m,n", [("reduced", 5, 3), ("reduced", 3, 5), ("reduced", 4, 4), ("reduced", 1, 3),
                                      ("complete", 3, 5), ("complete", 4, 4)], ids=str)
def test_qr_gradcheck_and_matches_torch(mode, m, n):
    A = well_conditioned((2,), m, n).requires_grad_()
    torch.autograd.gradcheck(lambda X: metalcore.linalg.qr(X, mode=mode), (A,))
    ours = metalcore.linalg.qr(A, mode=mode)
    theirs = torch.linalg.qr(A, mode=mode)
    grads = [torch.randn_like(t) for t in theirs]
    torch.testing.assert_close(torch.autograd.grad(ours, A, grads)[0], torch.autograd.grad(theirs, A, grads)[0])
    g_ours, = torch.autograd.grad(metalcore.linalg.qr(A, mode=mode).R, A, grads[1])
    g_theirs, = torch.autograd.grad(torch.linalg.qr(A, mode=mode).R, A, grads[1])
    torch.testing.assert_close(g_ours, g_theirs)


def test_qr_backward_errors_like_torch():
    A = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="mode='r'"):
        metalcore.linalg.qr(A, mode="r").R.sum().backward()
    with pytest.raises(RuntimeError, match="mode='complete' and nrows > ncols"):
        metalcore.linalg.qr(A, mode="complete").Q.sum().backward()


def test_qr_compiles_without_graph_breaks():
    A = torch.randn(3, 9, 5, dtype=torch.float32)
    compiled = torch.compile(metalcore.linalg.qr, fullgraph=True)
    Q, R = compiled(A)
    check_qr(A, Q, R, "reduced", torch.float32, "compiled qr")


# --- Metal shader (executor in CI): qr ------------------------------------------------------------
# shaders/linalg.metal through the metal backend on CPU tensors (the shader executor): batched
# small-matrix Cholesky, triangular solve, LU solve and Householder QR in float32, judged by LAPACK's
# test ratios (tests/oracle.py) over odd sizes, batch shapes and hard matrix families, with info and
# NaN confinement per batch element compared with torch.
#
# The Metal kernels' cases: sizes up to METALCORE_LINALG_MAX_N (tests/linalg_matrices.py).
F32 = torch.float32
CASE_IDS_metal = [case_id(b, n) for b, n in CASES_metal]


MODES = ("reduced", "complete", "r")
# Square, tall and wide shapes: each case's second side is a neighbour size (or the limit).
QR_CASES = [(b, n, SIZES_metal[(i // 2 + 3) % len(SIZES_metal)] if i % 2 else n, MODES[i % 3]) for i, (b, n) in enumerate(CASES_metal)]


def _qr(A, mode):
    assert qr_op.backend_for(A, mode) == expected_backend("metal", A, mode)
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


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,m,n,mode", QR_CASES, ids=[f"{case_id(b, m, n)}-{mo}" for b, m, n, mo in QR_CASES])
def test_qr_lapack_ratio(batch, m, n, mode):
    A = general("random", batch, m, n, F32)
    Q, R = _qr(A, mode)
    _check_qr(A, Q, R, mode, case_id(batch, m, n))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("kind", HARD + ("rank",))
def test_qr_hard_matrices(kind):
    A = general(kind, (2,), 33, 20, F32)
    s = scale_of(kind, F32)
    for mode in ("reduced", "complete"):
        Q, R = _qr(A, mode)
        assert R.isfinite().all()
        _check_qr(A, Q, R, mode, kind, s)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_qr_zero_column_and_nan_stay_in_their_batch_element():
    A = torch.randn(4, 9, 6)
    A[1, :, 2] = 0.0            # a zero column: tau = 0, Q stays orthonormal
    A[2, 4, 3] = float("nan")
    Q, R = _qr(A, "reduced")
    assert Q[2].isnan().any() or R[2].isnan().any()
    good = [0, 1, 3]
    assert Q[good].isfinite().all() and R[good].isfinite().all()
    _check_qr(A[good], Q[good], R[good], "reduced", "zero column")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_qr_gradient_runs_the_shader():
    A = torch.randn(2, 7, 5, requires_grad=True)
    _metal.launched.clear()
    Q, R = metalcore.linalg.qr(A)
    gQ, gR = torch.randn_like(Q), torch.randn_like(R)
    ours, = torch.autograd.grad((Q, R), A, (gQ, gR))
    assert "qr_float" in _metal.launched
    assert_like_torch(ours, vjp(torch.linalg.qr), A, (gQ, gR))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_qr_limits_route_to_the_reference():
    # Beyond the tile, float32 goes to the blocked QR (tests/linalg/test_qr_blocked.py).
    assert qr_op.backend_for(torch.ones(3, 3, dtype=torch.float64), "reduced") == "reference"
    assert qr_op.backend_for(torch.ones(MAX_N, MAX_N), "complete") == expected_backend("metal", torch.ones(MAX_N, MAX_N), "complete")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
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


# --- Triton kernel (interpreter in CI): qr --------------------------------------------------------
# Householder QR kernel (metalcore/linalg/qr_triton.py): qr in every mode, geqr2 and
# householder_product against LAPACK's test ratios and torch, on square, tall and wide matrices of
# every hard family; NaN isolation; gradients through the kernels.


def qr_module():
    return importlib.import_module("metalcore.linalg.qr_triton")


def check_qr_triton(A, mode, what):
    dtype = A.dtype
    m, n = A.shape[-2:]
    k = min(m, n)
    Q, R = metalcore.linalg.qr(A, mode=mode)
    Qt, Rt = torch.linalg.qr(A.cpu(), mode=mode)
    assert Q.shape == Qt.shape and R.shape == Rt.shape and R.is_contiguous()
    assert torch.equal(R, R.triu()), f"{what}: R must be upper triangular"
    if mode == "r":
        assert Q.numel() == 0
        # |R| is unique up to row signs: compare with the reduced mode's R, which is checked below.
        _, R2 = metalcore.linalg.qr(A, mode="reduced")
        assert torch.equal(R, R2)
        return
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), f"{what} QᵀQ")
    s = A.abs().amax().clamp_min(torch.finfo(dtype).tiny).item() if A.numel() else 1.0
    Qk = Q[..., :k] if mode == "complete" else Q
    assert_lapack_ratio(residual_ratio(A.double() / s, Qk.double() @ (R[..., :k, :].double() / s), dtype), f"{what} A−QR")


QR_SHAPES = [(m, n) for n in SIZES_triton for m in (n, n + 3 if n < 31 else 33, max(n - 2, 1))]
QR_CASES_triton = [(BATCHES_triton[i % 4], m, n, ("reduced", "complete", "r")[i % 3]) for i, (m, n) in enumerate(QR_SHAPES)
            if (m, n) != (33, 33)]


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,m,n,mode", QR_CASES_triton, ids=[f"{case_id(b, m, n)}-{mode}" for b, m, n, mode in QR_CASES_triton])
def test_qr_lapack_ratios_triton(batch, m, n, mode, dtype, device):
    A = general("random", batch, m, n, dtype).to(device)
    assert qr_op.backend_for(A, mode) == expected_backend("triton", A, mode)
    check_qr_triton(A, mode, f"qr {case_id(batch, m, n)} {mode}")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("kind", KINDS[1:])
def test_qr_hard_matrices_triton(kind, dtype, device):
    for m, n in ((12, 12), (13, 6)):
        A = general(kind, (2,), m, n, dtype).to(device)
        check_qr_triton(A, "reduced", f"qr {kind} {m}x{n}")


@pytest.mark.usefixtures("triton_backend")
def test_qr_rank_deficient_and_zero_matrices(device):
    A = torch.randn(3, 9, 6, dtype=torch.float64, device=device)
    A[0, :, 2] = 0.0           # a zero column: H = I at that step (τ = 0)
    A[1] = 0.0                 # all zero: Q = I
    A[2, :, 4] = A[2, :, 1]    # repeated column
    Q, R = metalcore.linalg.qr(A, mode="complete")
    assert orthogonality_ratio(Q, torch.float64) < 30
    torch.testing.assert_close(Q[1], torch.eye(9, dtype=torch.float64, device=device))
    assert_lapack_ratio(residual_ratio(A, Q @ R, torch.float64), "rank-deficient A−QR")


@pytest.mark.usefixtures("triton_backend")
def test_qr_matches_lapack_signs(device):
    """Same algorithm as LAPACK geqr2/org2r, so Q and R match torch (not just up to signs)."""
    A = torch.randn(5, 10, 7, dtype=torch.float64, device=device)
    assert_like_torch(metalcore.linalg.qr(A), torch.linalg.qr, A)


@pytest.mark.usefixtures("triton_backend")
def test_geqr2_and_householder_product(device):
    for m, n in ((7, 7), (9, 4), (4, 9)):
        A = torch.randn(2, 3, m, n, dtype=torch.float64, device=device)
        assert geqr2_op.backend_for(A) == expected_backend("triton", A)
        QR, tau = geqr2(A)
        QRt, taut = torch.geqrf(A)
        assert_like_torch((QR, tau), torch.geqrf, A)
        if m >= n:
            # Junk above the diagonal must not be read.
            V = QRt + torch.full_like(QRt, float("nan")).triu()
            assert householder_product_op.backend_for(V, taut) == expected_backend("triton", V, taut)
            assert_like_torch(metalcore.linalg.householder_product(V, taut[..., :n - 1]),
                              torch.linalg.householder_product, QRt, taut[..., :n - 1])


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,m,n,mode", [(3, 40, 40, "reduced"), (2, 66, 33, "reduced"), (2, 70, 35, "complete"),
                                            (1, 35, 70, "r"), (2, 40, 40, "complete")], ids=str)
def test_qr_blocked_path(batch, m, n, mode, dtype, device, launches):
    """The "blocked" alternative path (panels of PATH_NB columns where the register tile would take
    the whole matrix), forced as the selection sweep forces it: LAPACK's ratios in every mode, on
    square, tall (qdwh's stacked 2n × n) and wide matrices."""
    from metalcore import _selection
    from metalcore.linalg import qr_blocked

    blocked = launches(qr_blocked, "qr_blocked")
    A = general("random", (batch,), m, n, dtype).to(device)
    with _selection.use_path("qr", "blocked"):
        check_qr_triton(A, mode, f"qr blocked {case_id((batch,), m, n)} {mode}")
    assert blocked


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,m,n", [((256,), 128, 128), ((256,), 65, 65), ((256,), 130, 65), ((1,), 100, 100),
                                       ((16,), 40, 128)], ids=str)
def test_gpu_qr_blocked_path_full_size(batch, m, n, dtype, device):
    """The "blocked" path compiled, at the sizes the sweep times it (the register tile's 65-128 and
    qdwh's stacked 2n × n), on every matrix family."""
    from metalcore import _selection

    with _selection.use_path("qr", "blocked"):
        for kind in KINDS:
            check_qr_triton(general(kind, batch, m, n, dtype).to(device), "reduced", f"qr blocked {kind} {case_id(batch, m, n)}")
        check_qr_triton(general("random", batch, m, n, dtype).to(device), "complete", "qr blocked complete")


@pytest.mark.usefixtures("triton_backend")
def test_qr_blocked_path_takes_sides_from_33(device):
    from metalcore import BackendUnavailableError, _selection

    with _selection.use_path("qr", "blocked"), pytest.raises(BackendUnavailableError, match="'blocked' does not"):
        metalcore.linalg.qr(torch.randn(2, 32, 20, device=device))
    assert not qr_module()._blocked_path_supported(torch.randn(2, 40, 40, dtype=torch.float16), "reduced")


@pytest.mark.usefixtures("triton_backend")
def test_qr_nan_stays_in_its_batch_element(device):
    A = torch.randn(5, 6, 6, device=device)
    A[3, 4, 1] = float("nan")
    Q, R = metalcore.linalg.qr(A)
    assert Q[3].isnan().any() and R[3].isnan().any()
    good = [0, 1, 2, 4]
    assert Q[good].isfinite().all() and R[good].isfinite().all()
    assert_like_torch((Q[good], R[good]), torch.linalg.qr, A[good])


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("m,n", [(6, 6), (7, 4), (4, 7)], ids=str)
def test_qr_gradient_runs_the_kernels(m, n, device, executions):
    A = torch.randn(2, m, n, dtype=torch.float64, device=device, requires_grad=True)
    Q, R = metalcore.linalg.qr(A)
    gQ, gR = torch.randn_like(Q), torch.randn_like(R)
    ours, = torch.autograd.grad((Q, R), A, (gQ, gR))
    assert_like_torch(ours, vjp(torch.linalg.qr), A, (gQ, gR))
    assert ("qr", "triton") in executions and {b for _, b in executions} == {"triton"}, executions


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("mode", ["reduced", "complete", "r"])
def test_qr_batch_dims_that_do_not_collapse_and_new_data(mode, device):
    """The plan keeps a launch specialized to the call signature: batch dims that do not collapse
    into one stride are copied per call, and the next call reads the new data."""
    A = torch.randn(4, 3, 6, 5, dtype=torch.float64, device=device).transpose(0, 1)   # (3, 4, 6, 5)
    for _ in range(2):
        Q, R = metalcore.linalg.qr(A, mode=mode)
        want = torch.linalg.qr(A, mode=mode)
        assert_like_torch(R.abs(), lambda A: want.R.abs(), A)
        if mode != "r":
            torch.testing.assert_close(Q @ R, A)
        A.mul_(-3.0)


@pytest.mark.usefixtures("triton_backend")
def test_qr_really_runs_the_interpreted_kernel():
    k = qr_module()._householder_kernel
    k.interpreted = None
    metalcore.linalg.qr(torch.randn(3, 4))
    assert k.interpreted is not None and k.compiled is None


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,m,n", [((500,), 16, 16), ((1000,), 32, 32), ((100,), 64, 64), ((4096,), 8, 8),
                                       ((64,), 128, 128), ((10000,), 3, 3), ((50,), 128, 40), ((50,), 40, 128)],
                         ids=str)
def test_gpu_qr_full_size(batch, m, n, dtype, device):
    for kind in KINDS:
        A = general(kind, batch, m, n, dtype).to(device)
        check_qr_triton(A, "reduced", f"qr {kind} {case_id(batch, m, n)}")
    check_qr_triton(general("random", batch, m, n, dtype).to(device), "complete", "qr complete")


# --- matrices beyond the register tile: the blocked QR (metalcore/linalg/qr_blocked.py) -------------

@pytest.fixture
def small_tile(monkeypatch):
    """Route every side over 16 to the blocked path, with 8-column panels (single matrices and batches)."""
    module = qr_module()
    monkeypatch.setattr(module, "SMALL_MAX", 16)
    monkeypatch.setattr(module, "BLOCK_NB", 8)
    monkeypatch.setattr(module, "BATCHED_NB_SMALL", 8)
    monkeypatch.setattr(module, "BATCHED_NB_LARGE", 8)
    return module


@pytest.fixture
def small_panel_tile(small_tile, monkeypatch):
    """Also panels beyond 16 rows past the register kernel, to the tall-panel kernel in 16-row tiles."""
    monkeypatch.setattr(importlib.import_module("metalcore.linalg.qr_blocked"), "PANEL_KERNEL_MAX", 16)
    monkeypatch.setattr(importlib.import_module("metalcore.linalg.qr_panel_triton"), "TILE_ELEMENTS",
                        {torch.float32: 128, torch.float64: 128})
    return small_tile


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,m,n,mode", [((), 40, 24, "reduced"), ((2,), 24, 40, "complete"), ((3,), 40, 24, "r"),
                                            ((2,), 12, 12, "reduced")], ids=str)
def test_large_qr_goes_blocked(small_tile, launches, batch, m, n, mode, dtype, device):
    A = general("random", batch, m, n, dtype).to(device)
    calls = launches(importlib.import_module("metalcore.linalg.qr_blocked"), "qr_blocked")
    assert qr_op.backend_for(A, mode) == expected_backend("triton", A, mode)
    check_qr_triton(A, mode, f"qr {case_id(batch, m, n)} {mode}")
    assert bool(calls) == (max(m, n) > 16)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,m,n,mode", [((), 40, 24, "reduced"), ((2,), 24, 40, "complete"), ((), 45, 45, "r"),
                                            ((3,), 70, 20, "reduced")], ids=str)
def test_qr_tsqr_path(small_tile, monkeypatch, batch, m, n, mode, dtype, device):
    """The "tsqr" path (blocked QR with TSQR panels), forced as the sweep forces it, beyond the tile only:
    leaves of 16 rows and 8-column panels, so that a 70-row panel goes through two levels of stacked
    R's; every mode, tall, wide and square, LAPACK's ratios."""
    from metalcore import BackendUnavailableError, _selection
    monkeypatch.setattr(importlib.import_module("metalcore.linalg.qr_tsqr_triton"), "LEAF_ROWS", 16)
    monkeypatch.setattr(qr_module(), "TSQR_NB", 8)
    A = general("random", batch, m, n, dtype).to(device)
    with _selection.use_path("qr", "tsqr"):
        check_qr_triton(A, mode, f"qr tsqr {case_id(batch, m, n)} {mode}")
        with pytest.raises(BackendUnavailableError, match="'tsqr' does not"):
            metalcore.linalg.qr(torch.randn(2, 16, 12, dtype=dtype, device=device))


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("batch,m,n", [((), 4096, 4096), ((), 11008, 4096), ((2,), 1024, 1024)], ids=str)
def test_gpu_qr_tsqr_path_full_size(batch, m, n, device):
    """The "tsqr" path compiled (its CUDA graph replayed on the second call), at the sizes it exists for,
    on random, cond-1e6 and rank-deficient input."""
    from metalcore import _selection
    g = torch.Generator(device=device).manual_seed(0)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, device=device, generator=g, dtype=torch.float64))[0]
    W = torch.linalg.qr(torch.randn(*batch, n, k, device=device, generator=g, dtype=torch.float64))[0]
    i = torch.arange(k, device=device, dtype=torch.float64)
    with _selection.use_path("qr", "tsqr"):
        for kind, s in (("random", None), ("ill", 1e6 ** (-i / (k - 1))), ("rank", (i < k // 2).double())):
            A = (torch.randn(*batch, m, n, device=device, generator=g) if s is None else ((U * s) @ W.mT).float())
            for _ in range(2):
                Q, R = metalcore.linalg.qr(A)
                assert Q.shape == (*batch, m, k) and R.shape == (*batch, k, n) and torch.equal(R, R.triu())
                assert_lapack_ratio(orthogonality_ratio(Q, torch.float32), f"tsqr qr {kind} {case_id(batch, m, n)} QᵀQ")
                assert_lapack_ratio(residual_ratio(A, Q.double() @ R.double(), torch.float32),
                                    f"tsqr qr {kind} {case_id(batch, m, n)} A−QR")


@pytest.mark.usefixtures("triton_backend")
def test_large_geqr2_and_householder_product_go_blocked(small_tile):
    A = torch.randn(2, 37, 21, dtype=torch.float64)
    QR, tau = geqr2(A)
    assert_like_torch((QR, tau), torch.geqrf, A)
    assert householder_product_op.backend_for(QR, tau) == expected_backend("triton", QR, tau)
    assert_like_torch(metalcore.linalg.householder_product(QR, tau[..., :15]), torch.linalg.householder_product,
                      QR, tau[..., :15])


@pytest.mark.usefixtures("triton_backend")
def test_large_qr_gradient_through_the_blocked_path(small_tile):
    A = torch.randn(2, 30, 20, dtype=torch.float64, requires_grad=True)
    Q, R = metalcore.linalg.qr(A)
    gQ, gR = torch.randn_like(Q), torch.randn_like(R)
    ours, = torch.autograd.grad((Q, R), A, (gQ, gR))
    assert_like_torch(ours, vjp(torch.linalg.qr), A, (gQ, gR))


@pytest.mark.usefixtures("triton_backend")
def test_blocked_qr_is_automatic_only_above_the_measured_crossover(monkeypatch):
    """Until the H100 shows the blocked QR at least as fast as cuSOLVER (BLOCKED_AUTO_MIN_SIDE set),
    automatic selection keeps large matrices off it; an explicit triton request takes any size."""
    module = qr_module()
    A = torch.empty(200, 150)
    monkeypatch.setattr(module, "BLOCKED_AUTO_MIN_SIDE", None)
    assert not module._automatic(A, "reduced")
    monkeypatch.setattr(module, "BLOCKED_AUTO_MIN_SIDE", 150)
    assert module._automatic(A, "reduced")
    assert not module._automatic(A[:, :149], "reduced")
    assert module._automatic(A[:100, :100], "reduced")   # the register-tile kernel
    monkeypatch.setattr(module, "BLOCKED_AUTO_MIN_SIDE", None)
    assert module._supports(A, "reduced")                 # what an explicit request may run


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("mode", ("reduced", "complete"))
def test_large_batched_qr_takes_tall_panels(small_panel_tile, launches, mode):
    """A batch beyond the tile: blocked QR whose panels (taller than the register tile) the tall-panel
    kernel factors; a single matrix keeps torch.geqrf's panels."""
    blocked = importlib.import_module("metalcore.linalg.qr_blocked")
    tall, geqrf = launches(blocked, "_tall_block"), launches(blocked, "_geqrf")
    A = general("random", (2,), 40, 24, torch.float32)
    check_qr_triton(A, mode, f"qr batched tall panels {mode}")
    assert tall and not geqrf
    check_qr_triton(A[0], mode, f"qr single geqrf panels {mode}")
    assert geqrf


@pytest.mark.usefixtures("triton_backend")
def test_large_batched_geqr2_is_geqrf(small_panel_tile):
    A = torch.randn(2, 37, 21, dtype=torch.float64)
    for got, want in zip(geqr2(A), torch.geqrf(A)):
        torch.testing.assert_close(got, want)


def test_batched_blocked_qr_is_automatic_from_the_batch_rule(monkeypatch):
    """Batches beyond the tile take the blocked path automatically from BATCHED_AUTO_MIN_BATCH
    matrices (None: never), with panels of BATCHED_NB_SMALL columns up to BATCHED_NB_SPLIT and
    BATCHED_NB_LARGE above; one matrix keeps BLOCK_NB."""
    module = qr_module()
    monkeypatch.setattr(module, "BLOCKED_AUTO_MIN_SIDE", None)
    monkeypatch.setattr(module, "BATCHED_AUTO_MIN_BATCH", 4)
    assert module._automatic(torch.empty(4, 200, 150), "reduced")
    assert module._automatic(torch.empty(2, 2, 129, 3), "reduced")
    assert not module._automatic(torch.empty(3, 200, 150), "reduced")
    assert not module._automatic(torch.empty(200, 150), "reduced")
    monkeypatch.setattr(module, "BATCHED_AUTO_MIN_BATCH", None)
    assert not module._automatic(torch.empty(64, 256, 256), "reduced")
    assert module._automatic(torch.empty(64, 128, 128), "reduced")   # the register-tile kernel
    assert module._block_nb(torch.empty(2, 200, 150)) == module.BATCHED_NB_SMALL
    assert module._block_nb(torch.empty(2, 1024, 768)) == module.BATCHED_NB_LARGE
    assert module._block_nb(torch.empty(1, 200, 150)) == module.BLOCK_NB


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("batch,m,n", [((), 4096, 4096), ((), 11008, 4096), ((8,), 1024, 1024), ((2,), 300, 700),
                                       ((64,), 256, 256), ((4,), 3072, 3072)],
                         ids=str)
def test_gpu_blocked_qr_full_size(batch, m, n, device):
    """The blocked path at the sizes it exists for (the triton backend is requested explicitly by
    the fixture; batches take tall panels); hard families built on the device (the CPU oracle's fp64
    QR of 11008² is minutes)."""
    g = torch.Generator(device=device).manual_seed(0)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, device=device, generator=g, dtype=torch.float64))[0]
    W = torch.linalg.qr(torch.randn(*batch, n, k, device=device, generator=g, dtype=torch.float64))[0]
    i = torch.arange(k, device=device, dtype=torch.float64)
    for kind, s in (("random", None), ("ill", 1e6 ** (-i / (k - 1))), ("rank", (i < k // 2).double())):
        A = (torch.randn(*batch, m, n, device=device, generator=g) if s is None else ((U * s) @ W.mT).float())
        assert qr_op.backend_for(A, "reduced") == expected_backend("triton", A, "reduced")
        Q, R = metalcore.linalg.qr(A)
        assert Q.shape == (*batch, m, k) and R.shape == (*batch, k, n) and torch.equal(R, R.triu())
        assert_lapack_ratio(orthogonality_ratio(Q, torch.float32), f"blocked qr {kind} {case_id(batch, m, n)} QᵀQ")
        assert_lapack_ratio(residual_ratio(A, Q.double() @ R.double(), torch.float32),
                            f"blocked qr {kind} {case_id(batch, m, n)} A−QR")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 3, 0), (0, 0, 0)], ids=str)
def test_qr_of_empty_matrices_in_a_batch(shape, device):
    A = torch.randn(*shape, device=device)
    for mode in ("reduced", "complete", "r"):
        for got, want in zip(metalcore.linalg.qr(A, mode=mode), torch.linalg.qr(A, mode=mode)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)
    QR, tau = geqr2(A)
    assert QR.shape == A.shape and tau.shape == torch.geqrf(A)[1].shape
    if shape[1] >= shape[2]:
        torch.testing.assert_close(metalcore.linalg.householder_product(A, tau),
                                   torch.linalg.householder_product(A, tau))
