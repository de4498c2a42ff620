import importlib

import pytest
import torch

from backends import expected_backend

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous, shape_id
from linalg_matrices import (BATCHES as BATCHES_triton, DTYPES as DTYPES_triton, SIZES as SIZES_triton, case_id, scale_of, spd as spd_triton)
from linalg_matrices import spd as spd_metal
from linalg_matrices import HARD, METAL_CASES as CASES, METAL_MAX_N as MAX_N
from metalcore import _metal
from metalcore.linalg.cholesky import cholesky_ex_op
from oracle import assert_lapack_ratio, assert_like_torch, residual_ratio, vjp


def spd(batch, n, dtype, cond_scale=1.0):
    X = torch.randn(*batch, n, n, dtype=torch.float64)
    return (X @ X.mT / n + cond_scale * torch.eye(n, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("batch,n", [(b, n) for b in BATCHES for n in SIZES if not (len(b) == 2 and n > 33)],
                         ids=lambda v: str(v))
def test_cholesky_lapack_ratio(batch, n, upper, dtype):
    A = spd(batch, n, dtype)
    L = metalcore.linalg.cholesky(A, upper=upper)
    assert L.shape == A.shape and L.dtype == dtype
    tri = L.triu() if upper else L.tril()
    assert torch.equal(L, tri), "the other triangle must be exactly zero"
    recon = L.mH @ L if upper else L @ L.mH
    assert_lapack_ratio(residual_ratio(A, recon, dtype), f"cholesky {shape_id(batch, n, n)}")


def test_cholesky_reads_one_triangle_and_noncontiguous():
    A = spd((4,), 17, torch.float64)
    garbage = A.tril() + torch.randn(4, 17, 17, dtype=torch.float64).triu(1)
    torch.testing.assert_close(metalcore.cholesky(garbage), torch.linalg.cholesky(A))
    torch.testing.assert_close(metalcore.cholesky(noncontiguous(A)), torch.linalg.cholesky(A))


def test_cholesky_ex_info_matches_torch(backend):
    A = spd((5,), 6, torch.float64)
    A[1, 3, 3] = -100.0
    A[4] = -A[4]
    L, info = metalcore.linalg.cholesky_ex(A)
    assert torch.equal(info, torch.linalg.cholesky_ex(A).info)
    assert info.dtype == torch.int32
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*order 4"):
        metalcore.linalg.cholesky(A)
    with pytest.raises(torch.linalg.LinAlgError, match="batch element 1"):
        metalcore.linalg.cholesky_ex(A, check_errors=True)


@pytest.mark.parametrize("upper", [False, True])
def test_cholesky_gradient_matches_torch(upper, backend):
    A = spd((2,), 5, torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda X: metalcore.linalg.cholesky(X @ X.mT, upper=upper), (A,))
    g = torch.randn(2, 5, 5, dtype=torch.float64)
    ours, = torch.autograd.grad(metalcore.linalg.cholesky(A, upper=upper), A, g)
    theirs, = torch.autograd.grad(torch.linalg.cholesky(A, upper=upper), A, g)
    torch.testing.assert_close(ours, theirs)


def test_cholesky_compiles_without_graph_breaks():
    A = spd((3,), 8, torch.float32)
    compiled = torch.compile(metalcore.linalg.cholesky, fullgraph=True)
    torch.testing.assert_close(compiled(A), metalcore.linalg.cholesky(A))
    with pytest.raises(torch.linalg.LinAlgError):
        compiled(-A)


# --- Triton kernel (interpreter in CI): cholesky --------------------------------------------------
# Cholesky and triangular solve kernels (metalcore/linalg/cholesky_triton.py, triangular_triton.py)
# against LAPACK's test ratios and torch: every size, batch shape and hard-matrix family; info and
# NaN isolation per batch element; gradients through the kernels.


def chol_module():
    return importlib.import_module("metalcore.linalg.cholesky_triton")


def trsm_module():
    return importlib.import_module("metalcore.linalg.triangular_triton")


# Every size with every batch shape would be 32 interpreted launches per dtype; each size meets two
# batch shapes instead, and each batch shape meets every size across the two dtypes.
CHOL_CASES = [(b, n) for i, n in enumerate(SIZES_triton) for b in (BATCHES_triton[i % 4], BATCHES_triton[(i + 1) % 4])]


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,n", CHOL_CASES, ids=[case_id(b, n) for b, n in CHOL_CASES])
def test_cholesky_lapack_ratio_triton(batch, n, dtype, device):
    A = spd_triton("random", batch, n, dtype).to(device)
    upper = n % 2 == 1
    assert cholesky_ex_op.backend_for(A, upper, False) == expected_backend("triton", A, upper, False)
    L, info = metalcore.linalg.cholesky_ex(A, upper=upper)
    assert L.shape == A.shape and L.dtype == dtype and L.is_contiguous()
    assert info.shape == batch and info.dtype == torch.int32 and not info.any()
    assert torch.equal(L, L.triu() if upper else L.tril()), "the other triangle must be exactly zero"
    recon = L.mH @ L if upper else L @ L.mH
    assert_lapack_ratio(residual_ratio(A, recon, dtype), f"cholesky {case_id(batch, n, n)}")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("kind", ["ill", "cluster", "graded", "tiny", "huge"])
def test_cholesky_hard_matrices(kind, dtype, device):
    A = spd_triton(kind, (3,), 16, dtype).to(device)
    L, info = metalcore.linalg.cholesky_ex(A)
    assert not info.any()
    s = scale_of(kind, dtype)
    assert_lapack_ratio(residual_ratio(A / s, (L / s ** 0.5) @ (L / s ** 0.5).mT, dtype), f"cholesky {kind}")


@pytest.mark.usefixtures("triton_backend")
def test_cholesky_reads_one_triangle(device):
    A = spd_triton("random", (4,), 13, torch.float64).to(device)
    for upper in (False, True):
        garbage = A.triu() if upper else A.tril()
        garbage = garbage + (torch.full_like(A, float("nan")).tril(-1) if upper else
                             torch.full_like(A, float("nan")).triu(1))
        assert_like_torch(metalcore.linalg.cholesky(garbage, upper=upper), torch.linalg.cholesky, A, upper=upper)
        transposed = A.mT.contiguous().mT  # the same values with column-major strides
        assert_like_torch(metalcore.linalg.cholesky(transposed, upper=upper), torch.linalg.cholesky, A, upper=upper)


@pytest.mark.usefixtures("triton_backend")
def test_cholesky_info_and_nan_stay_in_their_batch_element(device):
    A = spd_triton("random", (6,), 9, torch.float32).to(device)
    A[1, 3, 3] = -100.0       # leading minor of order 4 is indefinite
    A[2, 5, 2] = float("nan")  # read (lower triangle): reaches the pivot of order 6
    A[4] = -A[4]              # order 1
    L, info = metalcore.linalg.cholesky_ex(A)
    assert torch.equal(info.cpu(), torch.linalg.cholesky_ex(A.cpu()).info)
    assert info.tolist() == [0, 4, 6, 0, 1, 0]
    good = [0, 3, 5]
    assert_like_torch(L[good], torch.linalg.cholesky, A[good])
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*order 4"):
        metalcore.linalg.cholesky(A)


@pytest.mark.usefixtures("triton_backend")
def test_cholesky_gradient_runs_the_kernels(device, executions):
    A = spd_triton("random", (2,), 6, torch.float64).to(device).requires_grad_()
    g = torch.randn(2, 6, 6, dtype=torch.float64, device=device)
    for upper in (False, True):
        ours, = torch.autograd.grad(metalcore.linalg.cholesky(A, upper=upper), A, g)
        assert_like_torch(ours, vjp(lambda X: torch.linalg.cholesky(X, upper=upper)), A, g)
    assert sorted(executions) == [("cholesky_ex", "triton")] * 2 + [("solve_triangular", "triton")] * 4


@pytest.mark.usefixtures("triton_backend")
def test_cholesky_batch_dims_that_do_not_collapse_and_new_data(device):
    A = spd_triton("random", (4, 3), 6, torch.float64).to(device).transpose(0, 1)   # (3, 4, 6, 6)
    for upper in (False, True, False):
        assert_like_torch(metalcore.linalg.cholesky(A, upper=upper), torch.linalg.cholesky, A, upper=upper)
        A.mul_(2.0)


@pytest.mark.usefixtures("triton_backend")
def test_cpu_tensors_really_run_the_interpreted_kernel():
    k = chol_module()._cholesky_kernel
    k.interpreted = None
    metalcore.linalg.cholesky(spd_triton("random", (2,), 4, torch.float32))
    assert k.interpreted is not None and k.compiled is None


@pytest.mark.usefixtures("triton_backend")
def test_cholesky_beyond_the_register_limit_goes_to_the_reference():
    A = torch.eye(129)
    assert cholesky_ex_op.backend_for(A, False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(128), False, False) == expected_backend("triton", torch.eye(128), False, False)


# --- Metal shader (executor in CI): cholesky ------------------------------------------------------
# shaders/linalg.metal through the metal backend on CPU tensors (the shader executor): batched
# small-matrix Cholesky, triangular solve, LU solve and Householder QR in float32, judged by LAPACK's
# test ratios (tests/oracle.py) over odd sizes, batch shapes and hard matrix families, with info and
# NaN confinement per batch element compared with torch.
#
# The Metal kernels' cases: sizes up to METALCORE_LINALG_MAX_N (tests/linalg_matrices.py).
F32 = torch.float32
CASE_IDS = [case_id(b, n) for b, n in CASES]


def _cholesky(A, upper=False):
    assert cholesky_ex_op.backend_for(A, upper, False) == expected_backend("metal", A, upper, False)
    L, info = metalcore.linalg.cholesky_ex(A, upper=upper)
    assert L.shape == A.shape and L.dtype == F32 and L.is_contiguous()
    assert info.shape == A.shape[:-2] and info.dtype == torch.int32
    return L, info


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,n", CASES, ids=CASE_IDS)
def test_cholesky_lapack_ratio_metal(batch, n):
    A = spd_metal("random", batch, n, F32)
    upper = n % 2 == 1
    L, info = _cholesky(A, upper)
    assert not info.any()
    assert torch.equal(L, L.triu() if upper else L.tril()), "the other triangle must be exactly zero"
    recon = L.mH @ L if upper else L @ L.mH
    assert_lapack_ratio(residual_ratio(A, recon, F32), f"cholesky {case_id(batch, n, n)}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("kind", HARD)
def test_cholesky_hard_matrices_metal(kind):
    A = spd_metal(kind, (3,), 33, F32)
    L, info = _cholesky(A)
    assert not info.any()
    s = scale_of(kind, F32)
    L64 = L.double() / s ** 0.5
    assert_lapack_ratio(residual_ratio(A.double() / s, L64 @ L64.mT, F32), f"cholesky {kind}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_cholesky_reads_one_triangle_metal():
    A = spd_metal("random", (4,), 13, F32)
    for upper in (False, True):
        nan = torch.full_like(A, float("nan"))
        garbage = A.triu() + nan.tril(-1) if upper else A.tril() + nan.triu(1)
        L, _ = _cholesky(garbage, upper)
        assert_like_torch(L, torch.linalg.cholesky, A, upper=upper)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_cholesky_info_and_nan_stay_in_their_batch_element_metal():
    A = spd_metal("random", (6,), 9, F32)
    A[1, 3, 3] = -100.0        # leading minor of order 4 is indefinite
    A[2, 5, 2] = float("nan")  # read (lower triangle): reaches the pivot of order 6
    A[4] = -A[4]               # order 1
    L, info = _cholesky(A)
    assert torch.equal(info, torch.linalg.cholesky_ex(A).info)
    assert info.tolist() == [0, 4, 6, 0, 1, 0]
    good = [0, 3, 5]
    assert L[good].isfinite().all()
    assert_like_torch(L[good], torch.linalg.cholesky, A[good])
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*order 4"):
        metalcore.linalg.cholesky(A)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_cholesky_gradient_runs_the_shaders():
    A = spd_metal("random", (2,), 6, F32).requires_grad_()
    g = torch.randn(2, 6, 6)
    _metal.launched.clear()
    ours, = torch.autograd.grad(metalcore.linalg.cholesky(A), A, g)
    assert {"cholesky_float", "trsm_float"} <= _metal.launched
    assert_like_torch(ours, vjp(torch.linalg.cholesky), A, g)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_cholesky_limits_route_to_the_reference():
    assert cholesky_ex_op.backend_for(torch.eye(MAX_N + 1), False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(4, dtype=torch.float64), False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(MAX_N), False, False) == expected_backend("metal", torch.eye(MAX_N), False, False)
