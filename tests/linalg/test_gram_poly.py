"""``metalcore::gram_poly`` (``b·G + c·G²`` with ``G = A Aᵀ``, the step of polar's Newton–Schulz and
Polar Express iterations) and its symmetric-product launcher ``syrk_launch``, on every backend that has
a kernel: Triton (metalcore/linalg/syrk_triton.py; interpreter in CI) and Metal (shaders/gram.metal;
executor in CI), against float64 torch."""

import importlib

import pytest
import torch

from backends import expected_backend

import metalcore
from cases import noncontiguous
from linalg_matrices import case_id
from metalcore.linalg import syrk_metal
from metalcore.linalg.polar import NS_STEPS, POLAR_EXPRESS_STEPS, polar
from metalcore.linalg.syrk import gram_poly_op
from metalcore.linalg.syrk_metal import syrk_launch
from oracle import assert_like_torch, assert_within_torch_error, vjp


DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (batch, m, k): square and rectangular A (k < m, k > m), sizes below, at and past a 16-row tile.
SHAPES = [(1, 1, 1), (3, 3, 3), (2, 17, 5), (1, 33, 70), (2, 69, 33), (1, 69, 69)]


def kernels():
    return importlib.import_module("metalcore.linalg.syrk_triton")


def syrk(A, C, alpha, beta):
    return kernels().syrk_launch(A, C, alpha, beta)


@pytest.fixture(params=[16, 128], ids=lambda b: f"tile{b}")
def tile(request, monkeypatch):
    """16-row tiles turn m = 69 into 5 × 5 tiles (15 upper pairs, a ragged last row and column);
    the default 128 covers every size here with one diagonal tile."""
    monkeypatch.setattr(kernels(), "BLOCK", request.param)
    monkeypatch.setattr(kernels(), "BLOCK_FP32", request.param)
    return request.param


def oracle(A, C, alpha, beta):
    A64 = A.double()
    out = alpha * A64 @ A64.mT
    return out if C is None else out + beta * C.double()


def gram_poly_formula(X):
    """``b·G + c·G²`` with ``G = X Xᵀ`` in plain torch (what metalcore::gram_poly's backward differentiates)."""
    G = X @ X.mT
    return -4.775 * G + 2.0315 * G @ G


def torch_same_dtype(A, C, alpha, beta):
    out = alpha * torch.bmm(A, A.mT) if C is None else torch.baddbmm(C, A, A.mT, beta=beta, alpha=alpha)
    return out.to(A.dtype)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("with_c", [False, True], ids=["gram", "with_c"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,k", SHAPES, ids=[case_id((b,), m, k) for b, m, k in SHAPES])
def test_syrk_within_torch_error(batch, m, k, dtype, with_c, tile, device):
    A = torch.randn(batch, m, k, dtype=dtype, device=device)
    # A non-symmetric C: the kernel must add C's lower tiles to the mirrored half, not C's upper ones.
    C = torch.randn(batch, m, m, dtype=dtype, device=device) if with_c else None
    alpha, beta = (-0.75, 1.5) if with_c else (1.0, 0.0)
    out = syrk(A, C, alpha, beta)
    assert out.shape == (batch, m, m) and out.dtype == dtype and out.is_contiguous()
    assert_within_torch_error(out, torch_same_dtype(A, C, alpha, beta), oracle(A, C, alpha, beta))


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_syrk_is_exactly_symmetric(dtype, tile, device):
    """The Gram part is computed once per element pair, so A Aᵀ, and A Aᵀ + C for symmetric C, are
    symmetric to the bit — polar relies on it (G² is computed as G Gᵀ)."""
    A = torch.randn(2, 45, 37, dtype=dtype, device=device)
    G = syrk(A, None, 1.0, 0.0)
    assert torch.equal(G, G.mT)
    S = syrk(G, G, 2.0315, -4.775)
    assert torch.equal(S, S.mT)


@pytest.mark.usefixtures("triton_backend")
def test_syrk_strided_inputs(tile, device):
    """Any strides: column-major A and C, and a transposed view (polar's tall case)."""
    A = torch.randn(3, 21, 40, device=device)
    C = torch.randn(3, 21, 21, device=device)
    tall = torch.randn(3, 40, 21, device=device)
    for a, c in [(noncontiguous(A), C), (A, noncontiguous(C)), (tall.mT, None)]:
        assert_within_torch_error(syrk(a, c, 0.5, 2.0), torch_same_dtype(a, c, 0.5, 2.0), oracle(a, c, 0.5, 2.0))


@pytest.mark.usefixtures("triton_backend")
def test_syrk_edges(device):
    """Empty batch and k = 0 (the product is zero: the result is beta·C); beta = 0 ignores NaN in C
    as torch.baddbmm does; NaN in a row of A poisons exactly that row and column of A Aᵀ."""
    assert syrk(torch.randn(0, 5, 3, device=device), None, 1.0, 0.0).shape == (0, 5, 5)
    C = torch.randn(2, 4, 4, device=device)
    torch.testing.assert_close(syrk(torch.randn(2, 4, 0, device=device), C, 1.0, 3.0), 3.0 * C)
    nan_c = torch.full((2, 4, 4), float("nan"), device=device)
    A = torch.randn(2, 4, 6, device=device)
    assert_like_torch(syrk(A, nan_c, 1.0, 0.0), lambda A: A @ A.mT, A)
    A[1, 2, 3] = float("nan")
    poisoned = syrk(A, None, 1.0, 0.0).isnan()
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[1, 2, :] = expected[1, :, 2] = True
    assert torch.equal(poisoned.cpu(), expected)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_poly_within_torch_error(dtype, tile, device):
    """The op: b·G + c·G², G = X Xᵀ rounded to the dtype, as two kernel launches."""
    X = torch.randn(2, 37, 50, dtype=dtype, device=device) / 50 ** 0.5
    assert gram_poly_op.backend_for(X, -4.775, 2.0315) == expected_backend("triton", X, -4.775, 2.0315)
    out = gram_poly_op(X, -4.775, 2.0315)
    assert out.shape == (2, 37, 37) and out.dtype == dtype and torch.equal(out, out.mT)
    G = (X @ X.mT).double()  # the rounded G of both implementations: each rounds X Xᵀ to dtype once
    expected = -4.775 * G + 2.0315 * G @ G
    with metalcore.use_backend("reference"):
        theirs = gram_poly_op(X, -4.775, 2.0315)
    assert_within_torch_error(out, theirs, expected)


@pytest.mark.usefixtures("triton_backend")
def test_gram_poly_float64_goes_to_the_reference(device):
    X = torch.randn(2, 5, 3, dtype=torch.float64, device=device)
    assert gram_poly_op.backend_for(X, 1.0, 1.0) == "reference"
    assert gram_poly_op.backend_for(X.float(), 1.0, 1.0) == expected_backend("triton", X.float(), 1.0, 1.0)


@pytest.mark.usefixtures("triton_backend")
def test_gram_poly_gradient(device):
    """The registered backward (plain torch) behind the kernel's forward, against autograd through
    the float64 formula."""
    X = torch.randn(2, 9, 13, device=device, requires_grad=True)
    g = torch.randn(2, 9, 9, device=device)
    ours, = torch.autograd.grad(gram_poly_op(X, -4.775, 2.0315), X, g)
    assert_like_torch(ours, vjp(gram_poly_formula), X, g)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
@pytest.mark.parametrize("m,n", [(33, 70), (70, 33), (48, 48)], ids=str)
def test_polar_iterations_run_on_the_kernel(method, m, n, device, launches):
    """polar's iteration in bf16 on the kernel: two launches a step, and its distance to the same
    iteration in float64 at most twice that of the reference iteration in bf16 (cuBLAS/CPU bmm)."""
    calls = launches(kernels(), "syrk_launch")
    A = torch.randn(3, m, n, device=device)
    ours = polar(A, method=method)
    assert len(calls) == 2 * (NS_STEPS if method == "newton_schulz" else POLAR_EXPRESS_STEPS)
    with metalcore.use_backend("reference"):
        ref_bf16 = polar(A, method=method)
        exact = polar(A.double(), method=method, dtype=torch.float64)
    assert ours.dtype == A.dtype and ours.shape == A.shape
    ours_err = (ours.double() - exact).norm() / exact.norm()
    ref_err = (ref_bf16.double() - exact).norm() / exact.norm()
    assert ours_err <= 2 * ref_err + 1e-3, (ours_err.item(), ref_err.item())


# --- full size, on the GPU -----------------------------------------------------------------------

@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("batch,m,k,dtype", [(32, 1024, 1024, torch.bfloat16), (1, 4096, 4096, torch.bfloat16),
                                             (4, 1000, 3000, torch.float16), (2, 1024, 777, torch.float32)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_syrk_full_size(batch, m, k, dtype, device):
    A = torch.randn(batch, m, k, dtype=dtype, device=device) / k ** 0.5
    C = torch.randn(batch, m, m, dtype=dtype, device=device)
    C = C + C.mT
    for c, alpha, beta in [(None, 1.0, 0.0), (C, 2.0315, -4.775)]:
        out = syrk(A, c, alpha, beta)
        assert_within_torch_error(out, torch_same_dtype(A, c, alpha, beta), oracle(A, c, alpha, beta))
        assert torch.equal(out, out.mT)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
def test_polar_full_size_on_the_kernel(method, device):
    A = torch.randn(8, 1024, 2048, device=device)
    ours = polar(A, method=method)
    with metalcore.use_backend("reference"):
        ref_bf16 = polar(A, method=method)
        exact = polar(A.double(), method=method, dtype=torch.float64)
    ours_err = (ours.double() - exact).norm() / exact.norm()
    ref_err = (ref_bf16.double() - exact).norm() / exact.norm()
    assert ours_err <= 2 * ref_err + 1e-3, (ours_err.item(), ref_err.item())


# --- Metal shader (executor in CI) ----------------------------------------------------------------
# shaders/gram.metal through the metal backend on CPU tensors (the shader executor): its launcher
# ``syrk_launch`` (``alpha·A Aᵀ + beta·C``, upper tiles only) directly, the op ``metalcore::gram_poly``
# built on it (``b·G + c·G²``), and polar's Newton–Schulz / Polar Express iterations running on it —
# against float64 with the 2×-torch rule, in float32, float16 and bfloat16.
#
# The shader's tiles are 64 rows (a compile-time constant): m = 69 and 130 give 2 and 3 tiles a side
# (3 and 6 upper tile pairs, ragged last tiles), k = 33 and 70 ragged 16-deep k steps.


DTYPES_metal = (torch.bfloat16, torch.float16, torch.float32)
# (batch, m, k): square and rectangular A (k < m, k > m), one tile, and past one and two tiles.
SHAPES_metal = [(1, 1, 1), (3, 3, 3), (2, 17, 5), (1, 33, 70), (2, 69, 33), (1, 130, 17)]


def oracle_metal(A, C, alpha, beta):
    A64 = A.double()
    out = alpha * A64 @ A64.mT
    return out if C is None else out + beta * C.double()


def torch_same_dtype_metal(A, C, alpha, beta):
    out = alpha * torch.bmm(A, A.mT) if C is None else torch.baddbmm(C, A, A.mT, beta=beta, alpha=alpha)
    return out.to(A.dtype)


@pytest.fixture
def _executor(executor):
    yield


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_executor")
@pytest.mark.parametrize("with_c", [False, True], ids=["gram", "with_c"])
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
@pytest.mark.parametrize("batch,m,k", SHAPES_metal, ids=[case_id((b,), m, k) for b, m, k in SHAPES_metal])
def test_syrk_within_torch_error_metal(batch, m, k, dtype, with_c):
    A = torch.randn(batch, m, k, dtype=dtype)
    # A non-symmetric C: the kernel must add C's lower tiles to the mirrored half, not C's upper ones.
    C = torch.randn(batch, m, m, dtype=dtype) if with_c else None
    alpha, beta = (-0.75, 1.5) if with_c else (1.0, 0.0)
    out = syrk_launch(A, C, alpha, beta)
    assert out.shape == (batch, m, m) and out.dtype == dtype and out.is_contiguous()
    assert_within_torch_error(out, torch_same_dtype_metal(A, C, alpha, beta), oracle_metal(A, C, alpha, beta))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_executor")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
def test_syrk_is_exactly_symmetric_metal(dtype):
    """The Gram part is computed once per element pair, so A Aᵀ, and A Aᵀ + C for symmetric C, are
    symmetric to the bit: gram_poly relies on it (G² is computed as G Gᵀ)."""
    A = torch.randn(2, 75, 37, dtype=dtype)
    G = syrk_launch(A, None, 1.0, 0.0)
    assert torch.equal(G, G.mT)
    S = syrk_launch(G, G, 2.0315, -4.775)
    assert torch.equal(S, S.mT)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_executor")
def test_syrk_strided_inputs_metal():
    """Any strides: column-major A and C, and a transposed view (polar's tall case)."""
    A = torch.randn(3, 21, 40)
    C = torch.randn(3, 21, 21)
    tall = torch.randn(3, 40, 21)
    for a, c in [(noncontiguous(A), C), (A, noncontiguous(C)), (tall.mT, None)]:
        assert_within_torch_error(syrk_launch(a, c, 0.5, 2.0), torch_same_dtype_metal(a, c, 0.5, 2.0),
                                  oracle_metal(a, c, 0.5, 2.0))


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_executor")
def test_syrk_edges_metal():
    """Empty batch and k = 0 (the product is zero: the result is beta·C); beta = 0 ignores NaN in C
    as torch.baddbmm does; NaN in a row of A poisons exactly that row and column of A Aᵀ."""
    assert syrk_launch(torch.randn(0, 5, 3), None, 1.0, 0.0).shape == (0, 5, 5)
    C = torch.randn(2, 4, 4)
    torch.testing.assert_close(syrk_launch(torch.randn(2, 4, 0), C, 1.0, 3.0), 3.0 * C)
    nan_c = torch.full((2, 4, 4), float("nan"))
    A = torch.randn(2, 4, 6)
    assert_like_torch(syrk_launch(A, nan_c, 1.0, 0.0), lambda A: A @ A.mT, A)
    A[1, 2, 3] = float("nan")
    poisoned = syrk_launch(A, None, 1.0, 0.0).isnan()
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[1, 2, :] = expected[1, :, 2] = True
    assert torch.equal(poisoned, expected)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_executor")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
def test_gram_poly_within_torch_error_metal(dtype):
    """The op: b·G + c·G², G = X Xᵀ rounded to the dtype, as two kernel launches."""
    X = torch.randn(2, 69, 50, dtype=dtype) / 50 ** 0.5
    with metalcore.use_backend("metal"):
        assert gram_poly_op.backend_for(X, -4.775, 2.0315) == expected_backend("metal", X, -4.775, 2.0315)
        out = gram_poly_op(X, -4.775, 2.0315)
    assert out.shape == (2, 69, 69) and out.dtype == dtype and torch.equal(out, out.mT)
    G = (X @ X.mT).double()  # the rounded G of both implementations: each rounds X Xᵀ to dtype once
    expected = -4.775 * G + 2.0315 * G @ G
    theirs = gram_poly_op.reference(X, -4.775, 2.0315)
    assert_within_torch_error(out, theirs, expected)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_executor")
def test_gram_poly_gradient_behind_the_shader():
    """The registered backward (plain torch) behind the shader's forward, against autograd through
    the float64 formula."""
    X = torch.randn(2, 9, 13, requires_grad=True)
    g = torch.randn(2, 9, 9)
    with metalcore.use_backend("metal"):
        ours, = torch.autograd.grad(gram_poly_op(X, -4.775, 2.0315), X, g)
    assert_like_torch(ours, vjp(gram_poly_formula), X, g)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_executor")
@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
@pytest.mark.parametrize("m,n", [(33, 70), (70, 33)], ids=str)
def test_polar_iterations_run_on_the_shader(method, m, n, monkeypatch):
    """polar's iteration in bf16 on the shader: two launches a step, and its distance to the same
    iteration in float64 at most twice that of the reference iteration in bf16."""
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return syrk_launch(*args)

    monkeypatch.setattr(syrk_metal, "syrk_launch", counted)
    A = torch.randn(3, m, n)
    with metalcore.use_backend("metal"):
        ours = polar(A, method=method)
    assert len(calls) == 2 * (NS_STEPS if method == "newton_schulz" else POLAR_EXPRESS_STEPS)
    with metalcore.use_backend("reference"):
        ref_bf16 = polar(A, method=method)
        exact = polar(A.double(), method=method, dtype=torch.float64)
    assert ours.dtype == A.dtype and ours.shape == A.shape
    ours_err = (ours.double() - exact).norm() / exact.norm()
    ref_err = (ref_bf16.double() - exact).norm() / exact.norm()
    assert ours_err <= 2 * ref_err + 1e-3, (ours_err.item(), ref_err.item())


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_executor")
def test_what_runs_where():
    """float64 stays on the reference; the shader runs only when asked for (not timed on a Mac)."""
    X = torch.randn(2, 5, 3, dtype=torch.float64)
    with metalcore.use_backend("metal"):
        assert gram_poly_op.backend_for(X, 1.0, 1.0) == "reference"
        assert gram_poly_op.backend_for(X.float(), 1.0, 1.0) == expected_backend("metal", X.float(), 1.0, 1.0)
    assert not gram_poly_op.kernels["metal"].automatic
