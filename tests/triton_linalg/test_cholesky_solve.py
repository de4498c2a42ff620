"""cholesky_solve kernel (metalcore/linalg/triangular_triton.py, two substitutions in one program)
against LAPACK's solve ratio: every size, batch shape and both triangles, both ways of reading the
factor, several right-hand-side blocks, NaN isolation per batch element, gradients through the
kernel."""

import importlib

import pytest
import torch

import metalcore
from linalg_matrices import BATCHES, DTYPES, SIZES, case_id, solve_ratio, spd
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from oracle import assert_lapack_ratio


def trsm_module():
    return importlib.import_module("metalcore.linalg.triangular_triton")


CASES = [(BATCHES[i % 4], n, (1, 3, 70)[i % 3], i % 2 == 1) for i, n in enumerate(SIZES)]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n,k,upper", CASES,
                         ids=[f"{case_id(b, n, k)}-{'upper' if u else 'lower'}" for b, n, k, u in CASES])
def test_cholesky_solve_lapack_ratio(batch, n, k, upper, dtype, device):
    A = spd("random", batch, n, dtype).to(device)
    L = torch.linalg.cholesky(A, upper=upper)
    B = torch.randn(*batch, n, k, dtype=dtype, device=device)
    assert cholesky_solve_op.backend_for(B, L, upper) == ("reference" if B.numel() == 0 else "triton")
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    assert X.shape == B.shape and X.dtype == dtype and X.is_contiguous()
    assert_lapack_ratio(solve_ratio(A, X, B, dtype), f"cholesky_solve {case_id(batch, n, k)}")


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_launch_keywords_and_rhs_blocks(upper, device):
    """A launch shape other than the default: the right-hand sides split over several programs, two
    matrices per program (the last half empty), garbage (NaN) in the triangle that must not be read."""
    A = spd("random", (3,), 13, torch.float64).to(device)
    L = torch.linalg.cholesky(A, upper=upper)
    unread = torch.ones_like(L, dtype=torch.bool)
    unread = unread.tril(-1) if upper else unread.triu(1)
    garbage = torch.where(unread, float("nan"), L)
    B = torch.randn(3, 13, 9, dtype=torch.float64, device=device)
    X = trsm_module().cholesky_solve_launch(B, garbage, upper, block_k=4, group_size=2)
    torch.testing.assert_close(X, torch.cholesky_solve(B, L, upper=upper))


def test_cholesky_solve_broadcasts_and_strides(device):
    A = spd("random", (2, 1), 6, torch.float64).to(device)
    L = torch.linalg.cholesky(A).mT.contiguous().mT        # column-major factor
    B = torch.randn(3, 5, 6, dtype=torch.float64, device=device).mT   # (3, 6, 5), strided
    X = metalcore.linalg.cholesky_solve(B, L)
    assert X.shape == (2, 3, 6, 5)
    torch.testing.assert_close(X, torch.cholesky_solve(B, L))


def test_nan_stays_in_its_batch_element(device):
    A = spd("random", (4,), 9, torch.float32).to(device)
    L = torch.linalg.cholesky(A)
    L[2, 5, 1] = float("nan")
    B = torch.randn(4, 9, 2, device=device)
    X = metalcore.linalg.cholesky_solve(B, L)
    assert X[2].isnan().any()
    good = [0, 1, 3]
    assert not X[good].isnan().any()
    torch.testing.assert_close(X[good], torch.cholesky_solve(B[good], L[good]))


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_cholesky_solve_gradients_run_the_kernel(upper, device, launches):
    A = spd("random", (2,), 5, torch.float64).to(device)
    L = torch.linalg.cholesky(A, upper=upper).requires_grad_()
    B = torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    calls = launches(trsm_module(), "cholesky_solve_launch")
    X = metalcore.linalg.cholesky_solve(B, L, upper)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (B, L), g)
    theirs = torch.autograd.grad(torch.cholesky_solve(B, L, upper=upper), (B, L), g)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)
    assert len(calls) == 2


def test_cholesky_solve_is_automatic_at_every_size_the_kernel_takes(monkeypatch):
    """Faster than torch on the H100 up to n = 128 (the register limit), so CUDA inputs get the kernel
    without a request; larger ones go to the reference. CPU tensors stand in for CUDA ones: the
    automatic backend is patched to triton."""
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    with metalcore.use_backend("auto"):
        for n, chosen in ((3, "triton"), (65, "triton"), (128, "triton"), (129, "reference")):
            L = torch.eye(n).expand(2, n, n)
            assert cholesky_solve_op.backend_for(torch.ones(2, n, 1), L, False) == chosen, n


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n,k", [((1000,), 32, 1), ((64,), 128, 128), ((10000,), 3, 1), ((100,), 64, 64),
                                       ((4096,), 8, 8), ((500,), 16, 16)], ids=str)
def test_gpu_cholesky_solve_full_size(batch, n, k, dtype, device):
    for kind in ("random", "ill", "graded"):
        A = spd(kind, batch, n, dtype).to(device)
        L, info = torch.linalg.cholesky_ex(A)
        assert not info.any()
        B = torch.randn(*batch, n, k, dtype=dtype, device=device)
        X = metalcore.linalg.cholesky_solve(B, L)
        assert_lapack_ratio(solve_ratio(L @ L.mT, X, B, dtype), f"cholesky_solve {kind} {case_id(batch, n, k)}")
