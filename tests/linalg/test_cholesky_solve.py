"""metalcore.linalg.cholesky_solve (the reference path): torch.cholesky_solve's results, shapes,
broadcasting, one-triangle reads, errors and gradients."""

import importlib

import pytest
import torch

from backends import expected_backend

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous, shape_id
from linalg_matrices import BATCHES as BATCHES_triton, DTYPES as DTYPES_triton, SIZES as SIZES_triton, case_id, spd as spd_triton
from linalg_matrices import solve_ratio
from linalg_matrices import BATCHES as BATCHES_metal, spd as spd_metal
from linalg_matrices import METAL_MAX_N as MAX_N, METAL_SIZES as SIZES_metal
from metalcore import _metal
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from oracle import assert_lapack_ratio, assert_like_torch, vjp


def spd(batch, n, dtype):
    X = torch.randn(*batch, n, n, dtype=torch.float64)
    return (X @ X.mT / n + torch.eye(n, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("batch,n", [(b, n) for b in BATCHES for n in SIZES], ids=lambda v: str(v))
def test_cholesky_solve_lapack_ratio(batch, n, upper, dtype):
    A = spd(batch, n, dtype)
    L = torch.linalg.cholesky(A, upper=upper)
    B = torch.randn(*batch, n, 3, dtype=dtype)
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    assert X.shape == B.shape and X.dtype == dtype
    assert_lapack_ratio(solve_ratio(A, X, B, dtype), f"cholesky_solve {shape_id(batch, n, n)}")


def test_broadcasting_noncontiguous_and_one_triangle():
    A = spd((2, 1), 7, torch.float64)
    L = torch.linalg.cholesky(A)
    B = torch.randn(4, 7, 2, dtype=torch.float64)
    garbage = L + torch.randn_like(L).triu(1)
    X = metalcore.linalg.cholesky_solve(noncontiguous(B), garbage)
    assert X.shape == (2, 4, 7, 2)
    torch.testing.assert_close(X, torch.cholesky_solve(B, L))


def test_bad_inputs():
    L = torch.linalg.cholesky(spd((2,), 4, torch.float64))
    with pytest.raises(ValueError, match="4 rows"):
        metalcore.linalg.cholesky_solve(torch.randn(2, 5, 1, dtype=torch.float64), L)
    with pytest.raises(ValueError, match="square"):
        metalcore.linalg.cholesky_solve(torch.randn(2, 4, 1, dtype=torch.float64), L[..., :3])
    with pytest.raises(ValueError, match="cannot be broadcast"):
        metalcore.linalg.cholesky_solve(torch.randn(3, 4, 1, dtype=torch.float64), L)
    with pytest.raises((TypeError, ValueError)):
        metalcore.linalg.cholesky_solve(torch.randn(2, 4, 1), L)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_gradients_match_torch(upper):
    L = torch.linalg.cholesky(spd((2,), 5, torch.float64), upper=upper).requires_grad_()
    B = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    # Only one triangle is read; like torch, the gradient is not projected onto it, so gradcheck
    # differentiates through the projection.
    project = torch.triu if upper else torch.tril
    torch.autograd.gradcheck(lambda b, f: metalcore.linalg.cholesky_solve(b, project(f), upper), (B, L))
    g = torch.randn(2, 5, 3, dtype=torch.float64)
    ours = torch.autograd.grad(metalcore.linalg.cholesky_solve(B, L, upper), (B, L), g)
    assert_like_torch(ours, vjp(lambda B, L: torch.cholesky_solve(B, L, upper=upper)), B, L, g)


def test_compiles_without_graph_breaks():
    L = torch.linalg.cholesky(spd((3,), 8, torch.float32))
    B = torch.randn(3, 8, 2)
    compiled = torch.compile(metalcore.linalg.cholesky_solve, fullgraph=True)
    torch.testing.assert_close(compiled(B, L), torch.cholesky_solve(B, L))


# --- Triton kernel (interpreter in CI): cholesky_solve --------------------------------------------
# cholesky_solve kernel (metalcore/linalg/triangular_triton.py, two substitutions in one program)
# against LAPACK's solve ratio: every size, batch shape and both triangles, both ways of reading the
# factor, several right-hand-side blocks, NaN isolation per batch element, gradients through the
# kernel.


def trsm_module():
    return importlib.import_module("metalcore.linalg.triangular_triton")


CASES = [(BATCHES_triton[i % 4], n, (1, 3, 70)[i % 3], i % 2 == 1) for i, n in enumerate(SIZES_triton)]


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,n,k,upper", CASES,
                         ids=[f"{case_id(b, n, k)}-{'upper' if u else 'lower'}" for b, n, k, u in CASES])
def test_cholesky_solve_lapack_ratio_triton(batch, n, k, upper, dtype, device):
    A = spd_triton("random", batch, n, dtype).to(device)
    L = torch.linalg.cholesky(A, upper=upper)
    B = torch.randn(*batch, n, k, dtype=dtype, device=device)
    assert cholesky_solve_op.backend_for(B, L, upper) == expected_backend("triton", B, L, upper)
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    assert X.shape == B.shape and X.dtype == dtype and X.is_contiguous()
    assert_lapack_ratio(solve_ratio(A, X, B, dtype), f"cholesky_solve {case_id(batch, n, k)}")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_launch_keywords_and_rhs_blocks(upper, device):
    """A launch shape other than the default: the right-hand sides split over several programs, two
    matrices per program (the last half empty), garbage (NaN) in the triangle that must not be read."""
    A = spd_triton("random", (3,), 13, torch.float64).to(device)
    L = torch.linalg.cholesky(A, upper=upper)
    unread = torch.ones_like(L, dtype=torch.bool)
    unread = unread.tril(-1) if upper else unread.triu(1)
    garbage = torch.where(unread, float("nan"), L)
    B = torch.randn(3, 13, 9, dtype=torch.float64, device=device)
    X = trsm_module().cholesky_solve_launch(B, garbage, upper, block_k=4, group_size=2)
    assert_like_torch(X, torch.cholesky_solve, B, L, upper=upper)


@pytest.mark.usefixtures("triton_backend")
def test_cholesky_solve_broadcasts_and_strides(device):
    A = spd_triton("random", (2, 1), 6, torch.float64).to(device)
    L = torch.linalg.cholesky(A).mT.contiguous().mT        # column-major factor
    B = torch.randn(3, 5, 6, dtype=torch.float64, device=device).mT   # (3, 6, 5), strided
    X = metalcore.linalg.cholesky_solve(B, L)
    assert X.shape == (2, 3, 6, 5)
    assert_like_torch(X, torch.cholesky_solve, B, L)


@pytest.mark.usefixtures("triton_backend")
def test_nan_stays_in_its_batch_element(device):
    A = spd_triton("random", (4,), 9, torch.float32).to(device)
    L = torch.linalg.cholesky(A)
    L[2, 5, 1] = float("nan")
    B = torch.randn(4, 9, 2, device=device)
    X = metalcore.linalg.cholesky_solve(B, L)
    assert X[2].isnan().any()
    good = [0, 1, 3]
    assert not X[good].isnan().any()
    assert_like_torch(X[good], torch.cholesky_solve, B[good], L[good])


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_cholesky_solve_gradients_run_the_kernel(upper, device, executions):
    A = spd_triton("random", (2,), 5, torch.float64).to(device)
    L = torch.linalg.cholesky(A, upper=upper).requires_grad_()
    B = torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (B, L), g)
    assert_like_torch(ours, vjp(lambda B, L: torch.cholesky_solve(B, L, upper=upper)), B, L, g)
    assert [e for e in executions if e[0] == "cholesky_solve"] == [("cholesky_solve", "triton")] * 2


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_cholesky_solve_batch_dims_that_do_not_collapse_and_new_data(upper, device):
    A = spd_triton("random", (4, 3), 6, torch.float64).to(device)
    L = torch.linalg.cholesky(A, upper=upper).transpose(0, 1)   # (3, 4, 6, 6), batch dims do not collapse
    B = torch.randn(3, 4, 6, 2, dtype=torch.float64, device=device)
    for _ in range(2):
        assert_like_torch(metalcore.linalg.cholesky_solve(B, L, upper), torch.cholesky_solve, B, L, upper=upper)
        B.mul_(-2.0)


@pytest.mark.usefixtures("triton_backend")
def test_cholesky_solve_is_automatic_at_every_size_the_kernel_takes(monkeypatch):
    """Faster than torch on the H100 up to n = 128 (the register limit), so CUDA inputs get the kernel
    without a request; larger ones go to the reference. CPU tensors stand in for CUDA ones: the
    automatic backend is patched to triton."""
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    with metalcore.use_backend("auto"):
        for n, chosen in ((3, "triton"), (65, "triton"), (128, "triton"), (129, "reference")):
            L = torch.eye(n).expand(2, n, n)
            assert cholesky_solve_op.backend_for(torch.ones(2, n, 1), L, False) == chosen, n


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,n,k", [((1000,), 32, 1), ((64,), 128, 128), ((10000,), 3, 1), ((100,), 64, 64),
                                       ((4096,), 8, 8), ((500,), 16, 16)], ids=str)
def test_gpu_cholesky_solve_full_size(batch, n, k, dtype, device):
    for kind in ("random", "ill", "graded"):
        A = spd_triton(kind, batch, n, dtype).to(device)
        L, info = torch.linalg.cholesky_ex(A)
        assert not info.any()
        B = torch.randn(*batch, n, k, dtype=dtype, device=device)
        X = metalcore.linalg.cholesky_solve(B, L)
        assert_lapack_ratio(solve_ratio(L @ L.mT, X, B, dtype), f"cholesky_solve {kind} {case_id(batch, n, k)}")


# --- Metal shader (executor in CI): cholesky_solve ------------------------------------------------
# ``cholesky_solve_<dtype>`` of shaders/linalg.metal through the metal backend on CPU tensors (the
# shader executor): both substitutions in one dispatch, judged by LAPACK's solve ratio against
# float64 over odd sizes, batch shapes, both triangles and several right-hand-side counts; the
# unread triangle may hold NaN; broadcasting, NaN confinement per batch element and gradients.


F32 = torch.float32
# k = 9 and 70 give SIMD-groups several columns each (8 SIMD-groups a threadgroup).
CASES_metal = [(BATCHES_metal[i % 4], n, (1, 9, 70)[i % 3], i % 2 == 1) for i, n in enumerate(SIZES_metal)]


def _solve(B, L, upper):
    assert cholesky_solve_op.backend_for(B, L, upper) == expected_backend("metal", B, L, upper)
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    assert X.shape == B.shape and X.dtype == F32 and X.is_contiguous()
    return X


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,n,k,upper", CASES_metal,
                         ids=[f"{case_id(b, n, k)}-{'upper' if u else 'lower'}" for b, n, k, u in CASES_metal])
def test_cholesky_solve_lapack_ratio_metal(batch, n, k, upper):
    A = spd_metal("random", batch, n, F32)
    L = torch.linalg.cholesky(A, upper=upper)
    B = torch.randn(*batch, n, k)
    X = _solve(B, L, upper)
    assert_lapack_ratio(solve_ratio(A, X, B, F32), f"cholesky_solve {case_id(batch, n, k)}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("kind", ("ill", "graded"))
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_cholesky_solve_hard_matrices_read_one_triangle(kind, upper):
    A = spd_metal(kind, (3,), 33, F32)
    L = torch.linalg.cholesky(A, upper=upper)
    unread = torch.ones_like(L, dtype=torch.bool)
    unread = unread.tril(-1) if upper else unread.triu(1)
    B = torch.randn(3, 33, 4)
    X = _solve(B, torch.where(unread, float("nan"), L), upper)
    assert_lapack_ratio(solve_ratio(A, X, B, F32), f"cholesky_solve {kind}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_cholesky_solve_broadcasts_and_strides_metal():
    A = spd_metal("random", (2, 1), 6, F32)
    L = torch.linalg.cholesky(A).mT.contiguous().mT   # column-major factor
    B = torch.randn(3, 5, 6).mT                        # (3, 6, 5), strided
    X = metalcore.linalg.cholesky_solve(B, L)
    assert X.shape == (2, 3, 6, 5)
    assert "cholesky_solve_float" in _metal.launched
    assert_like_torch(X, torch.cholesky_solve, B, L)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_cholesky_solve_nan_stays_in_its_batch_element():
    A = spd_metal("random", (4,), 9, F32)
    L = torch.linalg.cholesky(A)
    L[2, 5, 1] = float("nan")
    B = torch.randn(4, 9, 2)
    X = _solve(B, L, False)
    assert X[2].isnan().any()
    good = [0, 1, 3]
    assert not X[good].isnan().any()
    assert_lapack_ratio(solve_ratio(A[good], X[good], B[good], F32), "cholesky_solve beside a NaN factor")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_cholesky_solve_gradients_run_the_shader(upper):
    A = spd_metal("random", (2,), 5, F32)
    L = torch.linalg.cholesky(A, upper=upper).requires_grad_()
    B = torch.randn(2, 5, 3, requires_grad=True)
    _metal.launched.clear()
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (B, L), g)
    assert "cholesky_solve_float" in _metal.launched
    assert_like_torch(ours, vjp(lambda B, L: torch.cholesky_solve(B, L, upper=upper)), B, L, g)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_cholesky_solve_limits_route_to_the_reference():
    assert cholesky_solve_op.backend_for(torch.ones(MAX_N + 1, 2), torch.eye(MAX_N + 1), False) == "reference"
    assert cholesky_solve_op.backend_for(torch.ones(4, 2, dtype=torch.float64), torch.eye(4, dtype=torch.float64),
                                         False) == "reference"
    assert cholesky_solve_op.backend_for(torch.ones(MAX_N, 500), torch.eye(MAX_N), False) == expected_backend("metal", torch.ones(MAX_N, 500), torch.eye(MAX_N), False)
