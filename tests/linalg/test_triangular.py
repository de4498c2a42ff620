import importlib
import itertools

import pytest
import torch

from backends import expected_backend

import metalcore
from cases import DTYPES, noncontiguous
from linalg_matrices import DTYPES as DTYPES_triton_gpu
from linalg_matrices import BATCHES as BATCHES_triton, DTYPES as DTYPES_triton, SIZES as SIZES_triton, case_id, scale_of, solve_ratio, spd
from linalg_matrices import METAL_CASES as CASES, METAL_MAX_N as MAX_N
from metalcore import _metal
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.linalg.triangular import solve_triangular_op
from oracle import assert_lapack_ratio, assert_like_torch, assert_within_torch_error, residual_ratio, vjp


FLAGS = list(itertools.product([False, True], [True, False], [False, True]))
FLAG_IDS = [f"{'upper' if u else 'lower'}-{'left' if l else 'right'}{'-unit' if d else ''}" for u, l, d in FLAGS]


def well_conditioned_triangular(batch, n, upper, dtype):
    A = torch.randn(*batch, n, n, dtype=torch.float64) / n ** 0.5
    A = A + torch.diag_embed(torch.sign(torch.randn(*batch, n, dtype=torch.float64)) * 2)
    return (A.triu() if upper else A.tril()).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upper,left,unit", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("batch,n,k", [((), 1, 1), ((7,), 31, 5), ((2, 3), 33, 2), ((0,), 4, 3), ((), 127, 65)],
                         ids=str)
def test_solve_triangular_matches_oracle(batch, n, k, upper, left, unit, dtype):
    A = well_conditioned_triangular(batch, n, upper, dtype)
    B = torch.randn(*batch, *((n, k) if left else (k, n)), dtype=dtype)
    X = metalcore.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    expected = torch.linalg.solve_triangular(A.double(), B.double(), upper=upper, left=left, unitriangular=unit)
    same_dtype = torch.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    assert X.shape == expected.shape and X.dtype == dtype
    assert_within_torch_error(X, same_dtype, expected)


def test_trsm_defaults_to_lower_and_broadcasts():
    L = well_conditioned_triangular((3, 1), 9, False, torch.float64)
    B = torch.randn(4, 9, 2, dtype=torch.float64)
    X = metalcore.trsm(L, noncontiguous(B))
    assert X.shape == (3, 4, 9, 2)
    torch.testing.assert_close(L @ X, B.expand(3, 4, 9, 2))


@pytest.mark.parametrize("upper,left,unit", FLAGS, ids=FLAG_IDS)
def test_solve_triangular_gradcheck(upper, left, unit):
    A = well_conditioned_triangular((2,), 4, upper, torch.float64).requires_grad_()
    B = torch.randn(2, *((4, 3) if left else (3, 4)), dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: metalcore.linalg.solve_triangular(a, b, upper=upper, left=left, unitriangular=unit)
    torch.autograd.gradcheck(fn, (A, B))
    g = torch.randn_like(B)
    ours = torch.autograd.grad(fn(A, B), (A, B), g)
    theirs = torch.autograd.grad(torch.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit),
                                 (A, B), g)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)


# --- Triton kernel (interpreter in CI): solve_triangular ------------------------------------------
# Cholesky and triangular solve kernels (metalcore/linalg/cholesky_triton.py, triangular_triton.py)
# against LAPACK's test ratios and torch: every size, batch shape and hard-matrix family; info and
# NaN isolation per batch element; gradients through the kernels.


def chol_module():
    return importlib.import_module("metalcore.linalg.cholesky_triton")


def trsm_module():
    return importlib.import_module("metalcore.linalg.triangular_triton")


FLAGS_triton = list(itertools.product([False, True], [True, False], [False, True]))
FLAG_IDS_triton = [f"{'upper' if u else 'lower'}-{'left' if l else 'right'}{'-unit' if d else ''}" for u, l, d in FLAGS_triton]


def triangular(batch, n, upper, dtype, device):
    A = torch.randn(*batch, n, n, dtype=torch.float64) / n ** 0.5
    A = A + torch.diag_embed(torch.sign(torch.randn(*batch, n, dtype=torch.float64)) * 2)
    return (A.triu() if upper else A.tril()).to(dtype).to(device)


def check_trsm(A, B, upper, left, unit, dtype, what):
    X = metalcore.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    assert X.shape == B.shape and X.dtype == dtype and X.is_contiguous()
    M = A.triu() if upper else A.tril()
    if unit:
        M = M - torch.diag_embed(M.diagonal(dim1=-2, dim2=-1)) + torch.eye(A.shape[-1], dtype=dtype, device=A.device)
    if left:
        ratio = solve_ratio(M, X, B, dtype)
    else:
        ratio = solve_ratio(M.mT, X.mT, B.mT, dtype)
    assert_lapack_ratio(ratio, what)
    return X


# Sizes × batch shapes × right-hand-side counts (1, a few, more than one 64-column block).
TRSM_CASES = [(b, n, k) for i, n in enumerate(SIZES_triton)
              for b, k in ((BATCHES_triton[i % 4], (1, 3, 70)[i % 3]), (BATCHES_triton[(i + 2) % 4], (2, 5)[i % 2]))]


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,n,k", TRSM_CASES, ids=[case_id(b, n, k) for b, n, k in TRSM_CASES])
def test_solve_triangular_lapack_ratio(batch, n, k, dtype, device):
    upper, left, unit = FLAGS_triton[(n + k) % len(FLAGS_triton)]
    A = triangular(batch, n, upper, dtype, device)
    B = torch.randn(*batch, *((n, k) if left else (k, n)), dtype=dtype, device=device)
    assert solve_triangular_op.backend_for(A, B, upper, left, unit) == expected_backend("triton", A, B, upper, left, unit)
    check_trsm(A, B, upper, left, unit, dtype, f"trsm {case_id(batch, n, k)}")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("upper,left,unit", FLAGS_triton, ids=FLAG_IDS_triton)
def test_solve_triangular_every_flag(upper, left, unit, device):
    for dtype in DTYPES_triton:
        A = triangular((3,), 17, upper, dtype, device)
        # The unread triangle (and the diagonal, when unit) holds NaN: it must never be read.
        junk = torch.full_like(A, float("nan"))
        A = A + (junk.tril(-1) if upper else junk.triu(1))
        if unit:
            A = A + torch.diag_embed(torch.full(A.shape[:-1], float("nan"), dtype=dtype, device=device))
        B = torch.randn(3, *((17, 4) if left else (4, 17)), dtype=dtype, device=device)
        X = metalcore.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
        assert_like_torch(X, torch.linalg.solve_triangular, torch.nan_to_num(A), B, upper=upper, left=left,
                          unitriangular=unit)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("upper,left,unit", FLAGS_triton, ids=FLAG_IDS_triton)
def test_solve_triangular_launch_keywords(upper, left, unit, device):
    """Launch shapes other than the default: several RHS blocks and matrices per program (the last
    program half empty); the unread triangle (and a unit diagonal) hold NaN."""
    A = triangular((5,), 13, upper, torch.float64, device)
    junk = torch.full_like(A, float("nan"))
    A = A + (junk.tril(-1) if upper else junk.triu(1))
    if unit:
        A = A + torch.diag_embed(torch.full(A.shape[:-1], float("nan"), dtype=A.dtype, device=device))
    B = torch.randn(5, *((13, 7) if left else (7, 13)), dtype=torch.float64, device=device)
    X = trsm_module().solve_triangular_launch(A, B, upper, left, unit, block_k=2, group_size=2)
    assert_like_torch(X, torch.linalg.solve_triangular, torch.nan_to_num(A), B, upper=upper, left=left,
                      unitriangular=unit)


@pytest.mark.usefixtures("triton_backend")
def test_solve_triangular_broadcast_and_strided(device):
    L = triangular((3, 1), 9, False, torch.float64, device)
    B = torch.randn(4, 2, 9, dtype=torch.float64, device=device).mT  # (4, 9, 2), column-major
    X = metalcore.trsm(L, B)
    assert X.shape == (3, 4, 9, 2)
    assert_like_torch(X, torch.linalg.solve_triangular, L, B, upper=False)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_triangular_batch_dims_that_do_not_collapse_and_new_data(left, device):
    """The plan keeps a launch specialized to the call signature: batch dims that do not collapse
    into one stride are copied per call, and the next call reads the new data."""
    L = triangular((4, 3), 6, False, torch.float64, device).transpose(0, 1)   # (3, 4, 6, 6)
    B = torch.randn(3, 4, *((6, 2) if left else (2, 6)), dtype=torch.float64, device=device)
    for _ in range(2):
        X = metalcore.linalg.solve_triangular(L, B, upper=False, left=left)
        assert_like_torch(X, torch.linalg.solve_triangular, L, B, upper=False, left=left)
        B.mul_(-2.0)


@pytest.mark.usefixtures("triton_backend")
def test_solve_triangular_nan_stays_in_its_batch_element(device):
    A = triangular((5,), 8, False, torch.float32, device)
    B = torch.randn(5, 8, 3, device=device)
    A[2, 6, 1] = float("nan")
    X = metalcore.linalg.solve_triangular(A, B, upper=False)
    assert X[2].isnan().any()
    good = [0, 1, 3, 4]
    assert X[good].isfinite().all()
    assert_like_torch(X[good], torch.linalg.solve_triangular, A[good], B[good], upper=False)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_triangular_gradients(left, device, executions):
    A = triangular((2,), 5, True, torch.float64, device).requires_grad_()
    B = torch.randn(2, 5, 3, dtype=torch.float64, device=device)
    B = (B if left else B.mT.contiguous()).requires_grad_()
    X = metalcore.linalg.solve_triangular(A, B, upper=True, left=left)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (A, B), g)
    assert_like_torch(ours, vjp(lambda A, B: torch.linalg.solve_triangular(A, B, upper=True, left=left)), A, B, g)
    assert executions == [("solve_triangular", "triton")] * 2, "the backward's solve must run the kernel too"


# --- Triton kernels: automatic selection ----------------------------------------------------------
# Cholesky and triangular solve kernels (metalcore/linalg/cholesky_triton.py, triangular_triton.py)
# against LAPACK's test ratios and torch: every size, batch shape and hard-matrix family; info and
# NaN isolation per batch element; gradients through the kernels.


def chol_module_triton_selection():
    return importlib.import_module("metalcore.linalg.cholesky_triton")


def trsm_module_triton_selection():
    return importlib.import_module("metalcore.linalg.triangular_triton")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("n,chosen", [(1, "triton"), (33, "triton"), (64, "triton"), (65, "reference"),
                                      (128, "reference")], ids=str)
def test_cholesky_and_trsm_are_automatic_up_to_n_64(n, chosen, monkeypatch):
    """Where the H100 measured them faster than torch (n ≤ 64) the kernels serve CUDA inputs without
    a request; beyond, cuSOLVER/cuBLAS do. CPU tensors stand in for CUDA ones: the automatic backend
    is patched to triton (the interpreter makes the kernel runnable on them)."""
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    A = torch.eye(n).expand(2, n, n)
    with metalcore.use_backend("auto"):
        assert cholesky_ex_op.backend_for(A, False, False) == chosen
        assert solve_triangular_op.backend_for(A, torch.ones(2, n, 3), False, True, False) == chosen


# --- Triton kernels: GPU, full size ---------------------------------------------------------------
# Cholesky and triangular solve kernels (metalcore/linalg/cholesky_triton.py, triangular_triton.py)
# against LAPACK's test ratios and torch: every size, batch shape and hard-matrix family; info and
# NaN isolation per batch element; gradients through the kernels.


def chol_module_triton_gpu():
    return importlib.import_module("metalcore.linalg.cholesky_triton")


def trsm_module_triton_gpu():
    return importlib.import_module("metalcore.linalg.triangular_triton")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES_triton_gpu, ids=str)
@pytest.mark.parametrize("batch,n", [((1000,), 32), ((64,), 128), ((10000,), 3), ((100,), 64)], ids=str)
def test_gpu_cholesky_and_trsm_full_size(batch, n, dtype, device):
    for kind in ("random", "ill", "tiny", "huge"):
        A = spd(kind, batch, n, dtype).to(device)
        L, info = metalcore.linalg.cholesky_ex(A)
        assert not info.any()
        s = scale_of(kind, dtype)
        assert_lapack_ratio(residual_ratio(A / s, (L / s ** 0.5) @ (L / s ** 0.5).mT, dtype), f"cholesky {kind}")
    for upper, left, unit in FLAGS:
        A = triangular(batch, n, upper, dtype, device)
        B = torch.randn(*batch, *((n, 17) if left else (17, n)), dtype=dtype, device=device)
        check_trsm(A, B, upper, left, unit, dtype, f"trsm {upper} {left} {unit}")


# --- Metal shader (executor in CI): solve_triangular ----------------------------------------------
# shaders/linalg.metal through the metal backend on CPU tensors (the shader executor): batched
# small-matrix Cholesky, triangular solve, LU solve and Householder QR in float32, judged by LAPACK's
# test ratios (tests/oracle.py) over odd sizes, batch shapes and hard matrix families, with info and
# NaN confinement per batch element compared with torch.
#
# The Metal kernels' cases: sizes up to METALCORE_LINALG_MAX_N (tests/linalg_matrices.py).
F32 = torch.float32
CASE_IDS = [case_id(b, n) for b, n in CASES]


FLAGS_metal = list(itertools.product([False, True], [True, False], [False, True]))
FLAG_IDS_metal = [f"{'upper' if u else 'lower'}-{'left' if l else 'right'}{'-unit' if d else ''}" for u, l, d in FLAGS_metal]
# Right-hand-side counts: one, a few, and more columns than the threadgroup has SIMD-groups (8).
TRSM_CASES_metal = [(b, n, (1, 3, 70)[i % 3]) for i, (b, n) in enumerate(CASES)]


def triangular_metal(batch, n, upper, dtype=F32):
    return triangular(batch, n, upper, dtype, "cpu")


def _trsm(A, B, upper, left, unit):
    assert solve_triangular_op.backend_for(A, B, upper, left, unit) == expected_backend("metal", A, B, upper, left, unit)
    X = metalcore.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    assert X.shape == B.shape and X.dtype == F32 and X.is_contiguous()
    return X


def _trsm_ratio(A, X, B, upper, left, unit):
    M = A.double().triu() if upper else A.double().tril()
    if unit:
        M = M - torch.diag_embed(M.diagonal(dim1=-2, dim2=-1)) + torch.eye(A.shape[-1], dtype=torch.float64)
    return solve_ratio(M, X, B, F32) if left else solve_ratio(M.mT, X.mT, B.mT, F32)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,n,k", TRSM_CASES_metal, ids=[case_id(b, n, k) for b, n, k in TRSM_CASES_metal])
def test_solve_triangular_lapack_ratio_metal(batch, n, k):
    upper, left, unit = FLAGS_metal[(n + k) % len(FLAGS_metal)]
    A = triangular_metal(batch, n, upper)
    B = torch.randn(*batch, *((n, k) if left else (k, n)))
    X = _trsm(A, B, upper, left, unit)
    assert_lapack_ratio(_trsm_ratio(A, X, B, upper, left, unit), f"trsm {case_id(batch, n, k)}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("upper,left,unit", FLAGS_metal, ids=FLAG_IDS_metal)
def test_solve_triangular_every_flag_reads_one_triangle(upper, left, unit):
    A = triangular_metal((3,), 33, upper)
    # The unread triangle (and the diagonal, when unit) holds NaN: it must never be read.
    junk = torch.full_like(A, float("nan"))
    A = A + (junk.tril(-1) if upper else junk.triu(1))
    if unit:
        A = A + torch.diag_embed(torch.full(A.shape[:-1], float("nan")))
    B = torch.randn(3, *((33, 9) if left else (9, 33)))
    X = _trsm(A, B, upper, left, unit)
    assert_lapack_ratio(_trsm_ratio(torch.nan_to_num(A), X, B, upper, left, unit), "trsm")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
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


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_solve_triangular_nan_stays_in_its_batch_element_metal():
    A = triangular_metal((5,), 8, False)
    B = torch.randn(5, 8, 3)
    A[2, 6, 1] = float("nan")
    X = _trsm(A, B, False, True, False)
    assert X[2].isnan().any()
    good = [0, 1, 3, 4]
    assert X[good].isfinite().all()
    assert_like_torch(X[good], torch.linalg.solve_triangular, A[good], B[good], upper=False)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_solve_triangular_broadcast_and_strided_metal():
    L = triangular_metal((3, 1), 9, False)
    B = torch.randn(4, 2, 9).mT  # (4, 9, 2), column-major
    assert solve_triangular_op.backend_for(*torch.broadcast_tensors(L[..., :1], B[..., :1]), False, True, False)
    X = metalcore.trsm(L, B)
    assert X.shape == (3, 4, 9, 2)
    assert_like_torch(X, torch.linalg.solve_triangular, L, B, upper=False)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_triangular_gradients_metal(left):
    A = triangular_metal((2,), 5, True).requires_grad_()
    B = torch.randn(2, 5, 3)
    B = (B if left else B.mT.contiguous()).requires_grad_()
    _metal.launched.clear()
    X = metalcore.linalg.solve_triangular(A, B, upper=True, left=left)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (A, B), g)
    assert "trsm_float" in _metal.launched
    assert_like_torch(ours, vjp(lambda A, B: torch.linalg.solve_triangular(A, B, upper=True, left=left)), A, B, g)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_solve_triangular_limits_route_to_the_reference():
    big, b = torch.eye(MAX_N + 1), torch.ones(MAX_N + 1, 2)
    assert solve_triangular_op.backend_for(big, b, False, True, False) == "reference"
    assert solve_triangular_op.backend_for(big.double()[:4, :4], b.double()[:4], False, True, False) == "reference"
    assert solve_triangular_op.backend_for(torch.eye(MAX_N), torch.ones(MAX_N, 500), False, True, False) == expected_backend("metal", torch.eye(MAX_N), torch.ones(MAX_N, 500), False, True, False)
