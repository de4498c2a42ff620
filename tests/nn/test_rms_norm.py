import importlib

import pytest
import torch

from backends import expected_backend
import torch.nn.functional as F

import metalcore
from cases import noncontiguous
from metalcore.nn.rms_norm import fused_add_rms_norm_fwd, rms_norm_bwd, rms_norm_fwd
from oracle import assert_close, assert_within_torch_error, float64


DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ROWS = (1, 31, 33, 4097)


def oracle(x, w, eps, offset=0.0, residual=None):
    h = x.double() if residual is None else (x + residual).double()
    y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    return y if w is None else y * (w.double() + offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ROWS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["plain", "gemma"])
def test_rms_norm_forward_backward(n, dtype, offset):
    x = torch.randn(3, 5, n, dtype=dtype, requires_grad=True)
    w = torch.randn(n, dtype=torch.float32, requires_grad=True)
    y = metalcore.rms_norm(x, (n,), w, 1e-6, offset=offset)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, oracle(x.detach(), w.detach(), 1e-6, offset), dtype)

    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ex, ew = torch.autograd.grad(oracle(x64, w64, 1e-6, offset), (x64, w64), gy.double())
    assert_close(gx, ex, dtype)
    assert_dw(gw, gy, x.detach(), w.detach(), offset, ew)


def test_rms_norm_matches_torch_functional_and_module():
    x = torch.randn(4, 6, 8, 10, dtype=torch.float64)
    w = torch.randn(8, 10, dtype=torch.float64)
    torch.testing.assert_close(metalcore.rms_norm(x, (8, 10), w), F.rms_norm(x, (8, 10), w))
    torch.testing.assert_close(metalcore.rms_norm(noncontiguous(x), (8, 10)), F.rms_norm(x, (8, 10)))
    module = metalcore.MetalRMSNorm(10, eps=1e-5, dtype=torch.float64)
    reference = torch.nn.RMSNorm(10, eps=1e-5, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(x))
    assert "eps=1e-05" in repr(module)


def test_rms_norm_without_weight_and_gradcheck():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: metalcore.rms_norm(x, (7,)), (x,))
    torch.autograd.gradcheck(lambda x, w: metalcore.rms_norm(x, (7,), w, offset=1.0), (x, w))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_fused_add_rms_norm(dtype):
    x = torch.randn(2, 9, 33, dtype=dtype, requires_grad=True)
    r = torch.randn(2, 9, 33, dtype=dtype, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    y, h = metalcore.fused_add_rms_norm(x, r, w, 1e-6)
    assert_close(h, (x + r).double(), dtype)
    assert_close(y, oracle(x.detach(), w.detach(), 1e-6, residual=r.detach()), dtype)
    # The residual stream feeds the next block: its gradient must reach both inputs.
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y, h), (x, r, w), (gy, gh))
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    h64 = x64 + r64
    y64 = oracle(h64, w64, 1e-6)
    expected = torch.autograd.grad((y64, h64), (x64, r64, w64), (gy.double(), gh.double()))
    assert_close(grads[0], expected[0], dtype)
    assert_close(grads[1], expected[1], dtype)


def test_rms_norm_compiles_fullgraph():
    x = torch.randn(4, 64)
    norm = metalcore.MetalRMSNorm(64)
    compiled = torch.compile(norm, fullgraph=True)
    torch.testing.assert_close(compiled(x), norm(x))


# --- Triton kernels (interpreter in CI) -----------------------------------------------------------
# RMSNorm's Triton kernels (metalcore/nn/rms_norm_triton.py) against the float64 oracle: output,
# rstd and every gradient, for each dtype, odd row counts and row lengths 1, 31, 33, 4097, the
# looped long-row path, the fused residual add and Gemma's offset.


DTYPES_triton = (torch.float32, torch.bfloat16, torch.float16)
LENGTHS = (1, 31, 33, 4097)
EPS = 1e-6


def kernels():
    return importlib.import_module("metalcore.nn.rms_norm_triton")


def oracle_triton(h, w, eps, offset):
    h = h.double()
    y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    return y if w is None else y * (w.double() + offset)


def assert_dw(dw, dy, x, w, offset, dw64):
    """dweight sums one product per row: a reduction, judged by the suite's rule for reductions (at
    most 2x the error of the reference run in the inputs' dtypes, both against float64)."""
    assert dw.dtype == w.dtype
    _, rstd = rms_norm_fwd.reference(x, w, EPS, offset)
    _, torch_dw = rms_norm_bwd.reference(dy, x, w, rstd, offset)
    assert_within_torch_error(dw, torch_dw, dw64)


def check_rms_norm(x, w, offset):
    """Forward and backward through the public function against autograd on the float64 oracle_triton."""
    n = x.shape[-1]
    x = x.detach().requires_grad_()
    leaves = (x,) if w is None else (x, w.detach().requires_grad_())
    y = metalcore.rms_norm(x, (n,), leaves[1] if w is not None else None, EPS, offset=offset)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, oracle_triton(x.detach(), w, EPS, offset), x.dtype)

    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = torch.autograd.grad(oracle_triton(leaves64[0], leaves64[1] if w is not None else None, EPS, offset),
                                   leaves64, dy.double())
    assert_close(grads[0], expected[0], x.dtype)
    if w is not None:
        assert_dw(grads[1], dy, x.detach(), w, offset, expected[1])


def case_id(n, rows):
    return f"R{rows}-N{n}"


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["plain", "gemma"])
def test_rms_norm_fp32_weight(n, dtype, offset, device):
    rows = 15 if n < 4097 else 5
    x = torch.randn(rows, n, dtype=dtype, device=device) * 3
    w = torch.randn(n, device=device)
    assert rms_norm_fwd.backend_for(x, w, EPS, offset) == expected_backend("triton", x, w, EPS, offset)
    check_rms_norm(x, w, offset)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
def test_rms_norm_without_weight(n, dtype, device):
    check_rms_norm(torch.randn(1, 3, n, dtype=dtype, device=device), None, 0.0)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("n", (31, 4097), ids=lambda n: f"N{n}")
def test_rms_norm_weight_in_activation_dtype(n, device):
    x = torch.randn(7, n, dtype=torch.bfloat16, device=device)
    check_rms_norm(x, torch.randn(n, dtype=torch.bfloat16, device=device), 1.0)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
def test_fused_add_rms_norm_triton(n, dtype, device):
    offset = 1.0 if n % 2 else 0.0
    rows = 9 if n < 4097 else 3
    x = torch.randn(rows, n, dtype=dtype, device=device, requires_grad=True)
    r = torch.randn(rows, n, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(n, device=device, requires_grad=True)
    assert fused_add_rms_norm_fwd.backend_for(x, r, w, EPS, offset) == expected_backend("triton", x, r, w, EPS, offset)
    check_fused_add_rms_norm(x, r, w, offset)


def check_fused_add_rms_norm(x, r, w, offset):
    """The public function's outputs and gradients against the float64 oracle (dweight by the rule)."""
    dtype = x.dtype
    y, h = metalcore.fused_add_rms_norm(x, r, w, EPS, offset=offset)
    # h is rounded to the activation dtype, exactly as `x + r` is in an unfused model.
    assert_close(h, (x + r).double(), dtype)
    assert_close(y, oracle_triton(h.detach(), w.detach(), EPS, offset), dtype)

    gy, gh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y, h), (x, r, w), (gy, gh))
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    h64 = x64 + r64
    h64 = h64 + (h.detach().double() - h64).detach()  # the rounded h's value, the sum's gradient
    expected = torch.autograd.grad((oracle_triton(h64, w64, EPS, offset), h64), (x64, r64, w64), (gy.double(), gh.double()))
    assert_close(grads[0], expected[0], dtype)
    assert_close(grads[1], expected[1], dtype)
    assert_dw(grads[2], gy, h.detach(), w.detach(), offset, expected[2])


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n", (33, 100, 4097), ids=lambda n: f"N{n}")
def test_looped_path_with_small_chunks(n, dtype, device, monkeypatch):
    """The long-row kernels, made to loop over many chunks (and a ragged last one) at small n."""
    monkeypatch.setattr(kernels(), "MAX_FUSED_N", 16)
    monkeypatch.setattr(kernels(), "LOOP_BLOCK_N", 16 if n < 4097 else 1024)
    x = torch.randn(7, n, dtype=dtype, device=device)
    check_rms_norm(x, torch.randn(n, device=device), 1.0)
    check_rms_norm(x, None, 0.0)
    r = torch.randn_like(x)
    w = torch.randn(n, device=device)
    y, h, rstd = fused_add_rms_norm_fwd(x, r, w, EPS, 0.0)
    assert_close(h, (x + r).double(), dtype)
    assert_close(y, oracle_triton(h, w, EPS, 0.0), dtype)
    assert_close(rstd, torch.rsqrt(h.double().square().mean(-1) + EPS), torch.float32)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
def test_longest_rows(device):
    """n = 65,536 (the looped path at its real chunk size), with an odd number of rows."""
    n = 65536
    x = torch.randn(3, n, dtype=torch.bfloat16, device=device)
    w = torch.randn(n, device=device)
    check_rms_norm(x, w, 0.0)
    y, h, _ = fused_add_rms_norm_fwd(x, x, w, EPS, 0.0)
    assert_close(y, oracle_triton(h, w, EPS, 0.0), torch.bfloat16)


@pytest.mark.usefixtures("triton_backend")
def test_no_rows(device):
    x = torch.randn(0, 33, device=device, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    y = metalcore.rms_norm(x, (33,), w, EPS)
    gx, gw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert y.shape == gx.shape == (0, 33)
    assert torch.equal(gw, torch.zeros_like(w))


@pytest.mark.usefixtures("triton_backend")
def test_cpu_tensors_really_run_the_interpreted_kernels():
    """The kernels on CPU tensors are Triton's interpreted twins, not the reference in disguise."""
    k = kernels()
    x, w = torch.randn(3, 8), torch.randn(8)
    assert rms_norm_fwd.backend_for(x, w, EPS, 0.0) == expected_backend("triton", x, w, EPS, 0.0)
    k._rms_norm_fwd_kernel.interpreted = None
    y, rstd = rms_norm_fwd(x, w, EPS, 0.0)
    assert k._rms_norm_fwd_kernel.interpreted is not None
    assert k._rms_norm_fwd_kernel.compiled is None


@pytest.mark.usefixtures("triton_backend")
def test_float64_stays_on_the_reference():
    x = torch.randn(3, 8, dtype=torch.float64)
    assert rms_norm_fwd.backend_for(x, None, EPS, 0.0) == "reference"


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("op", ["rms_norm_fwd", "rms_norm_bwd", "fused_add_rms_norm_fwd"])
def test_opcheck_on_the_triton_backend(op, device):
    x = torch.randn(5, 33, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    if op == "rms_norm_fwd":
        args = (x, w, EPS, 1.0)
    elif op == "fused_add_rms_norm_fwd":
        args = (x, torch.randn_like(x, requires_grad=True), w, EPS, 0.0)
    else:
        args = (torch.randn_like(x), x.detach(), w.detach(), torch.rand(5, device=device) + 0.5, 0.0)
    torch.library.opcheck(metalcore._op.registered_ops()[op].custom_op, args)


# --------------------------------------------------------------------------------------------
# On the GPU: full sizes, and run-to-run reproducibility of dw (no atomics).
# --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (8191, 5120), (257, 65536), (16384, 128)],
                         ids=lambda s: case_id(s[1], s[0]))
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
def test_gpu_full_size(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    check_rms_norm(x, torch.randn(shape[1], device=device), 0.0)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
def test_gpu_weight_gradient_is_reproducible(device):
    x = torch.randn(8192, 4096, dtype=torch.bfloat16, device=device)
    dy = torch.randn_like(x)
    w = torch.randn(4096, device=device)
    _, rstd = rms_norm_fwd(x, w, EPS, 0.0)
    runs = [rms_norm_bwd(dy, x, w, rstd, 0.0) for _ in range(3)]
    for dx, dw in runs[1:]:
        assert torch.equal(dx, runs[0][0]) and torch.equal(dw, runs[0][1])


# --- Metal shaders (executor in CI) ---------------------------------------------------------------
# shaders/rms_norm.metal through the metal backend on CPU tensors (the shader executor), judged as the
# Triton kernels are: y, rstd and dx against the float64 oracle within TOL, dweight by the rule for
# reductions (assert_dw); forward, fused residual add, backward.


DTYPES_metal = (torch.float32, torch.float16, torch.bfloat16)
ROW_LENGTHS = (1, 31, 33, 4097, 8193)


def _inputs(rows, n, dtype, with_weight):
    x = torch.randn(rows, n).to(dtype)
    w = torch.randn(n, dtype=torch.float32) if with_weight else None
    return x, w


def _fwd_bwd(x, w, offset):
    with metalcore.use_backend("metal"):
        assert rms_norm_fwd.backend_for(x, w, EPS, offset) == expected_backend("metal", x, w, EPS, offset)
        y, rstd = rms_norm_fwd(x, w, EPS, offset)
        dy = torch.randn_like(x)
        dx, dw = rms_norm_bwd(dy, x, w, rstd, offset)
    y64, rstd64 = rms_norm_fwd.reference(float64(x), float64(w), EPS, offset)
    dx64, dw64 = rms_norm_bwd.reference(float64(dy), float64(x), float64(w), rstd64, offset)
    assert y.dtype == x.dtype and rstd.dtype == torch.float32
    assert_close(y, y64, x.dtype)
    assert_close(rstd, rstd64, torch.float32)
    assert_close(dx, dx64, x.dtype)
    if w is None:
        assert dw.numel() == 0
    else:
        assert_dw(dw, dy, x, w, offset, dw64)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
@pytest.mark.parametrize("n", ROW_LENGTHS, ids=lambda n: f"N{n}")
def test_rms_norm_forward_backward_metal(executor, n, dtype):
    _fwd_bwd(*_inputs(3, n, dtype, True), offset=0.0)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
@pytest.mark.parametrize("n", (33, 4097), ids=lambda n: f"N{n}")
@pytest.mark.parametrize("variant", ["gemma", "no_weight"])
def test_rms_norm_offset_and_no_weight(executor, n, dtype, variant):
    x, w = _inputs(4, n, dtype, variant == "gemma")
    _fwd_bwd(x, w, offset=1.0 if variant == "gemma" else 0.0)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
@pytest.mark.parametrize("rows,n", [(300, 33), (130, 256)], ids=lambda v: str(v))
def test_rms_norm_many_rows(executor, rows, n, dtype):
    # 300 rows: five dweight chunks of 64 rows, the last one partial.
    _fwd_bwd(*_inputs(rows, n, dtype, True), offset=0.0)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
@pytest.mark.parametrize("n", ROW_LENGTHS, ids=lambda n: f"N{n}")
def test_fused_add_rms_norm_forward(executor, n, dtype):
    x, w = _inputs(3, n, dtype, True)
    r = torch.randn(3, n).to(dtype)
    with metalcore.use_backend("metal"):
        assert fused_add_rms_norm_fwd.backend_for(x, r, w, 1e-6, 0.5) == expected_backend("metal", x, r, w, 1e-6, 0.5)
        y, h, rstd = fused_add_rms_norm_fwd(x, r, w, 1e-6, 0.5)
    assert torch.equal(h, x + r)  # the sum is rounded to the dtype exactly as torch rounds x + residual
    y64, rstd64 = rms_norm_fwd.reference(float64(h), float64(w), 1e-6, 0.5)
    assert_close(y, y64, dtype)
    assert_close(rstd, rstd64, torch.float32)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
def test_public_functions_and_autograd_on_metal(executor, dtype):
    x = torch.randn(2, 5, 40).to(dtype).requires_grad_()
    r = torch.randn(2, 5, 40).to(dtype).requires_grad_()
    w = torch.randn(40, requires_grad=True)
    with metalcore.use_backend("metal"):
        assert fused_add_rms_norm_fwd.backend_for(x, r, w, EPS, 0.0) == "metal"
        check_fused_add_rms_norm(x, r, w, 0.0)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
def test_float64_stays_on_the_reference_metal(executor):
    x = torch.randn(3, 8, dtype=torch.float64)
    with metalcore.use_backend("metal"):
        assert rms_norm_fwd.backend_for(x, None, 1e-6, 0.0) == "reference"
