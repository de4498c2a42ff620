import importlib

import pytest
import torch

from backends import expected_backend

import metalcore
from cases import BATCHES, DTYPES, noncontiguous, shape_id
from linalg_matrices import case_id, general, scale_of, solve_ratio
from linalg_matrices import BATCHES as BATCHES_triton, DTYPES as DTYPES_triton, SIZES as SIZES_triton
from linalg_matrices import HARD, METAL_CASES as CASES, METAL_MAX_N as MAX_N
from metalcore import _metal
from metalcore.linalg.solve import solve_ex_op
from oracle import assert_lapack_ratio, assert_like_torch, assert_within_torch_error, vjp


def well_conditioned(batch, n, dtype=torch.float64):
    A = torch.randn(*batch, n, n, dtype=torch.float64) / n ** 0.5 + 2 * torch.eye(n, dtype=torch.float64)
    return A.to(dtype)


SOLVE_CASES = [(b, n, k) for b in BATCHES for n, k in [(1, 1), (2, 3), (31, 5), (33, 1), (65, 2)]
               if not (len(b) == 2 and n > 33)] + [((), 127, 65)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("batch,n,k", SOLVE_CASES, ids=[shape_id(b, n, k) for b, n, k in SOLVE_CASES])
def test_solve_matches_oracle(batch, n, k, left, dtype):
    A = well_conditioned(batch, n, dtype)
    B = torch.randn(*batch, *((n, k) if left else (k, n)), dtype=dtype)
    X = metalcore.linalg.solve(A, B, left=left)
    expected = torch.linalg.solve(A.double(), B.double(), left=left)
    assert X.shape == expected.shape and X.dtype == dtype
    assert_within_torch_error(X, torch.linalg.solve(A, B, left=left), expected)


# (A shape, B shape, left): vectors, batches of vectors, broadcasting, and shapes torch rejects.
SHAPE_CASES = [
    ((3, 4, 4), (4,), True), ((3, 4, 4), (3, 4), True), ((3, 4, 4), (4, 2), True), ((3, 4, 4), (2, 1, 4, 2), True),
    ((1, 4, 4), (5, 4, 2), True), ((4, 4), (4,), True), ((4, 4, 4), (4, 4), True), ((4, 4), (3, 4), False),
    ((2, 1, 4, 4), (3, 2, 4), False), ((0, 4, 4), (4,), True), ((0, 4, 4), (0, 4, 3), True),
    # rejected by torch: vector right-hand sides with left=False, mismatched sizes and batches
    ((3, 4, 4), (4,), False), ((4, 4, 4), (4, 4), False), ((4, 4), (3, 4), True), ((3, 4, 4), (2, 3, 4), True),
    ((3, 4, 4), (2, 3, 4), False), ((1, 1), (1,), False),
]


@pytest.mark.parametrize("a_shape,b_shape,left", SHAPE_CASES, ids=str)
def test_solve_shapes_follow_torch(a_shape, b_shape, left):
    A = well_conditioned(a_shape[:-2], a_shape[-1])
    B = torch.randn(*b_shape, dtype=torch.float64)
    try:
        expected = torch.linalg.solve_ex(A, B, left=left)
    except RuntimeError:
        with pytest.raises(ValueError, match=r"metalcore.linalg.solve_ex: .*B"):
            metalcore.linalg.solve_ex(A, B, left=left)
        return
    X, info = metalcore.linalg.solve_ex(A, B, left=left)
    assert X.shape == expected.result.shape and info.shape == expected.info.shape and info.dtype == torch.int32
    torch.testing.assert_close(X, expected.result)


def test_solve_noncontiguous_and_out():
    A = well_conditioned((3,), 9)
    B = torch.randn(3, 9, 4, dtype=torch.float64)
    expected = torch.linalg.solve(A, B)
    torch.testing.assert_close(metalcore.linalg.solve(noncontiguous(A), noncontiguous(B)), expected)
    out = torch.empty(0, dtype=torch.float64)
    assert metalcore.linalg.solve(A, B, out=out) is out
    torch.testing.assert_close(out, expected)
    out = (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int32))
    result = metalcore.linalg.solve_ex(A, B, out=out)
    assert isinstance(result, torch.return_types.linalg_solve_ex) and result.result is out[0] and result.info is out[1]


def singular_batch():
    A = well_conditioned((5,), 6)
    A[1] = 0.0
    A[3, :, 2] = 0.0
    return A


def test_solve_ex_info_matches_torch(backend):
    A = singular_batch()
    B = torch.randn(5, 6, 2, dtype=torch.float64)
    X, info = metalcore.linalg.solve_ex(A, B)
    assert torch.equal(info, torch.linalg.solve_ex(A, B).info)
    assert info.tolist() == [0, 1, 0, 3, 0]
    ok = info == 0
    torch.testing.assert_close(X[ok], torch.linalg.solve(A[ok], B[ok]))


def test_singular_solve_raises_naming_the_batch_element(backend):
    A = singular_batch()
    B = torch.randn(5, 6, 2, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\): The solver failed because the input "
                                                       r"matrix is singular"):
        metalcore.linalg.solve(A, B)
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\)"):
        metalcore.linalg.solve_ex(A, B, check_errors=True)
    with pytest.raises(torch.linalg.LinAlgError, match="^linalg.solve: The solver failed"):
        metalcore.linalg.solve(A[1], B[1])


def test_solve_rejects_bad_input():
    A = well_conditioned((), 3)
    with pytest.raises(ValueError, match=r"metalcore.linalg.solve: A must be a square matrix"):
        metalcore.linalg.solve(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"metalcore.linalg.solve: expected all tensors to have the same dtype"):
        metalcore.linalg.solve(A, torch.randn(3))
    with pytest.raises(ValueError, match=r"metalcore.linalg.solve: B must have at least 1 dimensions"):
        metalcore.linalg.solve(A, torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"metalcore.linalg.solve: B .* only supported with left=True"):
        metalcore.linalg.solve(A, torch.randn(3, dtype=torch.float64), left=False)


@pytest.mark.parametrize("a_batch,b_shape,left", [((2,), (2, 4, 3), True), ((2,), (2, 3, 4), False),
                                                  ((2,), (4,), True), ((1,), (3, 4, 2), True),
                                                  ((3,), (1, 2, 4), False)], ids=str)
def test_solve_gradcheck_and_matches_torch(a_batch, b_shape, left):
    A = well_conditioned(a_batch, 4).requires_grad_()
    B = torch.randn(*b_shape, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda A, B: metalcore.linalg.solve(A, B, left=left), (A, B))
    torch.autograd.gradcheck(lambda A, B: metalcore.linalg.solve_ex(A, B, left=left).result, (A, B))
    theirs = torch.linalg.solve(A, B, left=left)
    g = torch.randn_like(theirs)
    for o, t in zip(torch.autograd.grad(metalcore.linalg.solve(A, B, left=left), (A, B), g),
                    torch.autograd.grad(theirs, (A, B), g)):
        torch.testing.assert_close(o, t)


def test_solve_compiles_without_graph_breaks():
    A = well_conditioned((3,), 8, torch.float32)
    B = torch.randn(3, 8, dtype=torch.float32)
    compiled = torch.compile(metalcore.linalg.solve, fullgraph=True)
    torch.testing.assert_close(compiled(A, B), torch.linalg.solve(A, B))
    with pytest.raises(torch.linalg.LinAlgError, match="batch element 0"):
        compiled(torch.zeros_like(A), B)


# --- Metal shader (executor in CI): solve ---------------------------------------------------------
# shaders/linalg.metal through the metal backend on CPU tensors (the shader executor): batched
# small-matrix Cholesky, triangular solve, LU solve and Householder QR in float32, judged by LAPACK's
# test ratios (tests/oracle.py) over odd sizes, batch shapes and hard matrix families, with info and
# NaN confinement per batch element compared with torch.
#
# The Metal kernels' cases: sizes up to METALCORE_LINALG_MAX_N (tests/linalg_matrices.py).
F32 = torch.float32
CASE_IDS = [case_id(b, n) for b, n in CASES]


SOLVE_CASES_metal = [(b, n, (1, 4, 70)[i % 3], i % 2 == 1) for i, (b, n) in enumerate(CASES)]


def _solve(A, B, left=True):
    assert solve_ex_op.backend_for(A, B, left, False) == expected_backend("metal", A, B, left, False)
    X, info = metalcore.linalg.solve_ex(A, B, left=left)
    assert X.dtype == F32 and X.is_contiguous()
    assert info.shape == A.shape[:-2] and info.dtype == torch.int32
    return X, info


def _solve_ratio(A, X, B, left):
    return solve_ratio(A, X, B, F32) if left else solve_ratio(A.mT, X.mT, B.mT, F32)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("batch,n,k,left", SOLVE_CASES_metal,
                         ids=[f"{case_id(b, n, k)}-{'left' if l else 'right'}" for b, n, k, l in SOLVE_CASES_metal])
def test_solve_lapack_ratio(batch, n, k, left):
    A = general("random", batch, n, n, F32)
    B = torch.randn(*batch, *((n, k) if left else (k, n)))
    X, info = _solve(A, B, left)
    assert X.shape == B.shape and not info.any()
    assert_lapack_ratio(_solve_ratio(A, X, B, left), f"solve {case_id(batch, n, k)}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("kind", HARD + ("rank",))
def test_solve_hard_matrices(kind):
    A = general(kind, (3,), 33, 33, F32)
    B = torch.randn(3, 33, 2) * scale_of(kind, F32)
    X, info = _solve(A, B)
    if kind == "rank":
        # Numerically singular: rounding leaves tiny nonzero pivots, so info is torch's (0 here too).
        assert torch.equal(info, torch.linalg.solve_ex(A, B).info)
        return
    assert not info.any()
    # The ratio is invariant to the scale of A, X and B; float64 holds the products of 1e±25 values.
    assert_lapack_ratio(_solve_ratio(A, X, B, True), f"solve {kind}")


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_solve_broadcasts_vectors_and_no_right_hand_sides():
    A = general("well", (3, 1), 6, 6, torch.float32)
    B = torch.randn(4, 6, 2)
    X, info = _solve(A, B)
    assert X.shape == (3, 4, 6, 2) and info.shape == (3, 1)
    assert_like_torch(X, torch.linalg.solve, A, B)
    b = torch.randn(3, 1, 6)
    assert_like_torch(metalcore.linalg.solve(A, b), torch.linalg.solve, A, b)
    S = torch.randn(2, 5, 5)
    S[1, :, 2] = 0.0
    X, info = _solve(S, torch.randn(2, 5, 0))
    assert X.shape == (2, 5, 0) and torch.equal(info, torch.linalg.solve_ex(S, torch.randn(2, 5, 0)).info)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_solve_singular_info_and_nan_stay_in_their_batch_element():
    A = general("well", (5,), 7, 7, torch.float32)
    A[1] = 0.0                   # U[0, 0] = 0
    A[2, :, 4] = 0.0             # a zero column: U[4, 4] = 0 exactly
    A[3, 2, 5] = float("nan")
    B = torch.randn(5, 7, 3)
    X, info = _solve(A, B)
    assert info.tolist() == [0, 1, 5, 0, 0]
    assert torch.equal(info, torch.linalg.solve_ex(A, B).info)
    assert X[3].isnan().any()
    good = [0, 4]
    assert X[good].isfinite().all()
    assert_like_torch(X[good], torch.linalg.solve, A[good], B[good])
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*singular"):
        metalcore.linalg.solve(A, B)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_solve_pivots_like_lapack():
    """A zero leading entry needs the row swap; ties go to the first row of largest |a|."""
    A = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [3.0, 0.0, 1.0]])
    X, _ = _solve(A, torch.eye(3))
    assert_like_torch(X, torch.linalg.inv, A)
    T = torch.tensor([[1.0, 1.0], [-1.0, 2.0]])  # |a| ties in column 0: row 0 stays, exactly as LAPACK
    X, _ = _solve(T, torch.eye(2))
    torch.testing.assert_close(X, torch.linalg.inv(T), rtol=0, atol=0)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_gradients_run_the_shader(left):
    A = general("well", (2,), 5, 5, torch.float32).requires_grad_()
    B = torch.randn(2, *((5, 3) if left else (3, 5)), requires_grad=True)
    _metal.launched.clear()
    X = metalcore.linalg.solve(A, B, left=left)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (A, B), g)
    assert "lu_solve_float" in _metal.launched
    assert_like_torch(ours, vjp(lambda A, B: torch.linalg.solve(A, B, left=left)), A, B, g)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_solve_limits_route_to_the_reference():
    assert solve_ex_op.backend_for(torch.eye(MAX_N + 1), torch.ones(MAX_N + 1, 1), True, False) == "reference"
    assert solve_ex_op.backend_for(torch.eye(3).double(), torch.ones(3, 1).double(), True, False) == "reference"
    assert solve_ex_op.backend_for(torch.eye(MAX_N), torch.ones(MAX_N, 300), True, False) == expected_backend("metal", torch.eye(MAX_N), torch.ones(MAX_N, 300), True, False)


# --- Triton kernel (interpreter in CI): solve -----------------------------------------------------
# LU solve kernel (metalcore/linalg/solve_triton.py) against LAPACK's solve ratio and torch:
# every size and batch shape, left and right, many right-hand sides, broadcasting, info for
# singular matrices per batch element, NaN isolation, gradients through the kernels.


def solve_module():
    return importlib.import_module("metalcore.linalg.solve_triton")


def check_solve(A, B, left, what, scale=1.0):
    X, info = metalcore.linalg.solve_ex(A, B, left=left)
    assert not info.any() and info.shape == A.shape[:-2] and info.dtype == torch.int32
    assert X.dtype == A.dtype and X.is_contiguous()
    A, B = A / scale, B / scale   # keep the oracle's squares of 1e200-scaled entries finite
    ratio = solve_ratio(A, X, B, A.dtype) if left else solve_ratio(A.mT, X.mT, B.mT, A.dtype)
    assert_lapack_ratio(ratio, what)


SOLVE_CASES_triton = [(BATCHES_triton[(i + j) % 4], n, (1, 4, 70 if (i + j) % 4 != 3 else 2)[(i + 2 * j) % 3], j == 1) for i, n in enumerate(SIZES_triton)
               for j in range(2)]


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,n,k,left", SOLVE_CASES_triton,
                         ids=[f"{case_id(b, n, k)}-{'left' if l else 'right'}" for b, n, k, l in SOLVE_CASES_triton])
def test_solve_lapack_ratio_triton(batch, n, k, left, dtype, device):
    A = general("random", batch, n, n, dtype).to(device)
    B = torch.randn(*batch, *((n, k) if left else (k, n)), dtype=dtype, device=device)
    assert solve_ex_op.backend_for(A, B, left, False) == expected_backend("triton", A, B, left, False)
    check_solve(A, B, left, f"solve {case_id(batch, n, k)}")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("kind", ["ill", "cluster", "graded", "tiny", "huge"])
def test_solve_hard_matrices_triton(kind, dtype, device):
    A = general(kind, (3,), 16, 16, dtype).to(device)
    B = torch.randn(3, 16, 2, dtype=dtype, device=device) * scale_of(kind, dtype)
    check_solve(A, B, True, f"solve {kind}", scale_of(kind, dtype))


@pytest.mark.usefixtures("triton_backend")
def test_solve_broadcasts_and_vectors(device):
    A = general("well", (3, 1), 6, 6, torch.float64).to(device)
    B = torch.randn(4, 6, 2, dtype=torch.float64, device=device)
    X, info = metalcore.linalg.solve_ex(A, B)
    assert X.shape == (3, 4, 6, 2) and info.shape == (3, 1)
    assert_like_torch(X, torch.linalg.solve, A, B)
    b = torch.randn(3, 1, 6, dtype=torch.float64, device=device)
    assert_like_torch(metalcore.linalg.solve(A, b), torch.linalg.solve, A, b)


@pytest.mark.usefixtures("triton_backend")
def test_solve_batch_dims_that_do_not_collapse_and_new_data_in_the_same_tensors(device):
    """The plan keeps a launch specialized to the call signature: batch dims that do not collapse
    into one stride and a broadcast B are copied per call, and the next call reads the new data."""
    A = general("well", (4, 3), 5, 5, torch.float64).to(device).transpose(0, 1)   # (3, 4, 5, 5)
    B = torch.randn(4, 5, 2, dtype=torch.float64, device=device)
    for _ in range(2):
        X, info = metalcore.linalg.solve_ex(A, B)
        assert X.shape == (3, 4, 5, 2) and info.shape == (3, 4)
        assert_like_torch(X, torch.linalg.solve, A, B)
        B.mul_(-2.0)
        A.diagonal(dim1=-2, dim2=-1).add_(1.0)


@pytest.mark.usefixtures("triton_backend")
def test_solve_singular_info_and_nan_stay_in_their_batch_element_triton(device):
    A = general("well", (5,), 7, 7, torch.float32).to(device)
    A[1] = 0.0                   # U[0, 0] = 0
    A[2, :, 4] = 0.0             # a zero column: U[4, 4] = 0 exactly
    A[3, 2, 5] = float("nan")
    B = torch.randn(5, 7, 3, device=device)
    X, info = metalcore.linalg.solve_ex(A, B)
    assert info.tolist() == [0, 1, 5, 0, 0]
    assert torch.equal(info.cpu(), torch.linalg.solve_ex(A.cpu(), B.cpu()).info)
    assert X[3].isnan().any()
    good = [0, 4]
    assert_like_torch(X[good], torch.linalg.solve, A[good], B[good])
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*singular"):
        metalcore.linalg.solve(A, B)


@pytest.mark.usefixtures("triton_backend")
def test_solve_pivots_like_lapack_triton(device):
    """A zero leading entry needs the row swap; the pivoted result matches LAPACK's bit for bit
    in the ordering of operations up to rounding."""
    A = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [3.0, 0.0, 1.0]], dtype=torch.float64, device=device)
    B = torch.eye(3, dtype=torch.float64, device=device)
    assert_like_torch(metalcore.linalg.solve(A, B), torch.linalg.inv, A)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_solve_gradients_run_the_kernel(left, device, executions):
    A = general("well", (2,), 5, 5, torch.float64).to(device).requires_grad_()
    B = torch.randn(2, *((5, 3) if left else (3, 5)), dtype=torch.float64, device=device, requires_grad=True)
    X = metalcore.linalg.solve(A, B, left=left)
    g = torch.randn_like(X)
    ours = torch.autograd.grad(X, (A, B), g)
    assert_like_torch(ours, vjp(lambda A, B: torch.linalg.solve(A, B, left=left)), A, B, g)
    assert [e for e in executions if e[0] == "solve_ex"] == [("solve_ex", "triton")] * 2


@pytest.mark.usefixtures("triton_backend")
def test_solve_really_runs_the_interpreted_kernel():
    k = solve_module()._lu_solve_kernel
    k.interpreted = None
    metalcore.linalg.solve(torch.randn(3, 3) + 3 * torch.eye(3), torch.randn(3, 1))
    assert k.interpreted is not None and k.compiled is None


@pytest.mark.usefixtures("triton_backend")
def test_solve_is_automatic_at_every_size_the_kernel_takes(monkeypatch):
    """Faster than torch on the H100 up to n = 128 (the register limit), so CUDA inputs get the kernel
    without a request; larger ones go to the reference. CPU tensors stand in for CUDA ones: the
    automatic backend is patched to triton."""
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    with metalcore.use_backend("auto"):
        for n, chosen in ((3, "triton"), (65, "triton"), (128, "triton"), (129, "reference")):
            assert solve_ex_op.backend_for(torch.eye(n), torch.ones(n, 1), True, False) == chosen, n


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("batch,n,k", [((1000,), 32, 1), ((1000,), 32, 32), ((64,), 128, 200), ((10000,), 3, 1),
                                       ((100,), 64, 64), ((4096,), 8, 8)], ids=str)
def test_gpu_solve_full_size(batch, n, k, dtype, device):
    for kind in ("random", "ill", "graded", "tiny", "huge"):
        A = general(kind, batch, n, n, dtype).to(device)
        B = torch.randn(*batch, n, k, dtype=dtype, device=device) * scale_of(kind, dtype)
        check_solve(A, B, True, f"solve {kind}", scale_of(kind, dtype))
    # A and B are the last family's ("huge"): the ratio needs its scale, or its norms overflow.
    check_solve(A, B.mT.contiguous(), False, "solve right", scale_of(kind, dtype))


@pytest.mark.usefixtures("triton_backend")
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
