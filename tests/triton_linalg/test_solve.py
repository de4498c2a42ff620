"""LU solve kernel (metalcore/linalg/solve_triton.py) against LAPACK's solve ratio and torch:
every size and batch shape, left and right, many right-hand sides, broadcasting, info for
singular matrices per batch element, NaN isolation, gradients through the kernels."""

import importlib

import pytest
import torch

import metalcore
from linalg_matrices import BATCHES, DTYPES, SIZES, case_id, general, scale_of, solve_ratio
from metalcore.linalg.solve import solve_ex_op
from oracle import assert_lapack_ratio


def solve_module():
    return importlib.import_module("metalcore.linalg.solve_triton")


def check_solve(A, B, left, what, scale=1.0):
    X, info = metalcore.linalg.solve_ex(A, B, left=left)
    assert not info.any() and info.shape == A.shape[:-2] and info.dtype == torch.int32
    assert X.dtype == A.dtype and X.is_contiguous()
    A, B = A / scale, B / scale   # keep the oracle's squares of 1e200-scaled entries finite
    ratio = solve_ratio(A, X, B, A.dtype) if left else solve_ratio(A.mT, X.mT, B.mT, A.dtype)
    assert_lapack_ratio(ratio, what)


SOLVE_CASES = [(BATCHES[(i + j) % 4], n, (1, 4, 70 if (i + j) % 4 != 3 else 2)[(i + 2 * j) % 3], j == 1) for i, n in enumerate(SIZES)
               for j in range(2)]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n,k,left", SOLVE_CASES,
                         ids=[f"{case_id(b, n, k)}-{'left' if l else 'right'}" for b, n, k, l in SOLVE_CASES])
def test_solve_lapack_ratio(batch, n, k, left, dtype, device):
    A = general("random", batch, n, n, dtype).to(device)
    B = torch.randn(*batch, *((n, k) if left else (k, n)), dtype=dtype, device=device)
    assert solve_ex_op.backend_for(A, B, left, False) == ("reference" if A.numel() == 0 else "triton")
    check_solve(A, B, left, f"solve {case_id(batch, n, k)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ill", "cluster", "graded", "tiny", "huge"])
def test_solve_hard_matrices(kind, dtype, device):
    A = general(kind, (3,), 16, 16, dtype).to(device)
    B = torch.randn(3, 16, 2, dtype=dtype, device=device) * scale_of(kind, dtype)
    check_solve(A, B, True, f"solve {kind}", scale_of(kind, dtype))


def test_solve_broadcasts_and_vectors(device):
    A = torch.randn(3, 1, 6, 6, dtype=torch.float64, device=device)
    B = torch.randn(4, 6, 2, dtype=torch.float64, device=device)
    X, info = metalcore.linalg.solve_ex(A, B)
    assert X.shape == (3, 4, 6, 2) and info.shape == (3, 1)
    torch.testing.assert_close(X, torch.linalg.solve(A, B))
    b = torch.randn(3, 1, 6, dtype=torch.float64, device=device)
    torch.testing.assert_close(metalcore.linalg.solve(A, b), torch.linalg.solve(A, b))


def test_solve_singular_info_and_nan_stay_in_their_batch_element(device):
    A = torch.randn(5, 7, 7, device=device)
    A[1] = 0.0                   # U[0, 0] = 0
    A[2, :, 4] = 0.0             # a zero column: U[4, 4] = 0 exactly
    A[3, 2, 5] = float("nan")
    B = torch.randn(5, 7, 3, device=device)
    X, info = metalcore.linalg.solve_ex(A, B)
    assert info.tolist() == [0, 1, 5, 0, 0]
    assert torch.equal(info.cpu(), torch.linalg.solve_ex(A.cpu(), B.cpu()).info)
    assert X[3].isnan().any()
    good = [0, 4]
    torch.testing.assert_close(X[good], torch.linalg.solve(A[good], B[good]), rtol=1e-4, atol=1e-4)
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*singular"):
        metalcore.linalg.solve(A, B)


def test_solve_pivots_like_lapack(device):
    """A zero leading entry needs the row swap; the pivoted result matches LAPACK's bit for bit
    in the ordering of operations up to rounding."""
    A = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [3.0, 0.0, 1.0]], dtype=torch.float64, device=device)
    B = torch.eye(3, dtype=torch.float64, device=device)
    torch.testing.assert_close(metalcore.linalg.solve(A, B), torch.linalg.inv(A))


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_gradients_run_the_kernel(left, device, launches):
    A = torch.randn(2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    B = torch.randn(2, *((5, 3) if left else (3, 5)), dtype=torch.float64, device=device, requires_grad=True)
    calls = launches(solve_module(), "solve_launch")
    X = metalcore.linalg.solve(A, B, left=left)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (A, B), g)
    theirs = torch.autograd.grad(torch.linalg.solve(A, B, left=left), (A, B), g)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)
    assert len(calls) == 2


def test_solve_really_runs_the_interpreted_kernel():
    k = solve_module()._lu_solve_kernel
    k.interpreted = None
    metalcore.linalg.solve(torch.randn(3, 3) + 3 * torch.eye(3), torch.randn(3, 1))
    assert k.interpreted is not None and k.compiled is None


def test_solve_is_automatic_at_every_size_the_kernel_takes(monkeypatch):
    """Faster than torch on the H100 up to n = 128 (the register limit), so CUDA inputs get the kernel
    without a request; larger ones go to the reference. CPU tensors stand in for CUDA ones: the
    automatic backend is patched to triton."""
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    with metalcore.use_backend("auto"):
        for n, chosen in ((3, "triton"), (65, "triton"), (128, "triton"), (129, "reference")):
            assert solve_ex_op.backend_for(torch.eye(n), torch.ones(n, 1), True, False) == chosen, n


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n,k", [((1000,), 32, 1), ((1000,), 32, 32), ((64,), 128, 200), ((10000,), 3, 1),
                                       ((100,), 64, 64), ((4096,), 8, 8)], ids=str)
def test_gpu_solve_full_size(batch, n, k, dtype, device):
    for kind in ("random", "ill", "graded", "tiny", "huge"):
        A = general(kind, batch, n, n, dtype).to(device)
        B = torch.randn(*batch, n, k, dtype=dtype, device=device) * scale_of(kind, dtype)
        check_solve(A, B, True, f"solve {kind}", scale_of(kind, dtype))
    # A and B are the last family's ("huge"): the ratio needs its scale, or its norms overflow.
    check_solve(A, B.mT.contiguous(), False, "solve right", scale_of(kind, dtype))


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("implicit", [True, False], ids=["row-order", "swaps"])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 2), (8, 5), (17, 3), (33, 1)], ids=str)
def test_pivoting_variants(n, k, implicit, device):
    """Both pivoting schemes at every size (the default picks swaps below n = 64 and the row order
    from 64: without this, the row order would run in CI only at the sizes where it is the default)
    meet the same ratio, info and NaN isolation."""
    A = general("random", (6,), n, n, torch.float64).to(device)
    B = torch.randn(6, n, k, dtype=torch.float64, device=device)
    A[2] = 0.0                       # info 1
    A[3, :, n // 2] = 0.0            # a zero column: info n//2 + 1
    A[4, 1 % n, 0] = float("nan")
    X, info = solve_module().solve_launch(A, B, True, implicit_pivoting=implicit, group_size=2)
    assert torch.equal(info.cpu(), torch.linalg.solve_ex(A.cpu(), B.cpu()).info)
    assert X[4].isnan().all()
    good = [0, 1, 5]
    assert_lapack_ratio(solve_ratio(A[good], X[good], B[good], torch.float64), f"LU implicit={implicit} n={n}")
    Xr, _ = solve_module().solve_launch(A[good], B[good].mT, False, implicit_pivoting=implicit)
    assert_lapack_ratio(solve_ratio(A[good].mT, Xr.mT, B[good], torch.float64), f"LU implicit={implicit} right n={n}")
