"""shaders/rms_norm.metal through the metal backend on CPU tensors (the shader executor), against
the reference implementation of each op: forward, fused residual add, backward (dx and dweight)."""

import pytest
import torch

import metalcore
from metalcore.nn.rms_norm import fused_add_rms_norm_fwd, rms_norm_bwd, rms_norm_fwd
from tolerances import TOL

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROW_LENGTHS = (1, 31, 33, 4097, 8193)


def _close(actual, expected, dtype=None):
    torch.testing.assert_close(actual, expected, **TOL[dtype or actual.dtype])


def _check_dw(dw, expected, rows):
    # dweight sums `rows` products in float32, in another order than the reference.
    torch.testing.assert_close(dw.float(), expected.float(), rtol=1e-4, atol=1e-5 * rows ** 0.5)


def _inputs(rows, n, dtype, with_weight):
    x = torch.randn(rows, n).to(dtype)
    w = torch.randn(n, dtype=torch.float32) if with_weight else None
    return x, w


def _fwd_bwd(x, w, offset):
    eps = 1e-6
    with metalcore.use_backend("metal"):
        assert rms_norm_fwd.backend_for(x, w, eps, offset) == "metal"
        y, rstd = rms_norm_fwd(x, w, eps, offset)
        dy = torch.randn_like(x)
        dx, dw = rms_norm_bwd(dy, x, w, rstd, offset)
    y0, rstd0 = rms_norm_fwd.reference(x, w, eps, offset)
    dx0, dw0 = rms_norm_bwd.reference(dy, x, w, rstd0, offset)
    assert y.dtype == x.dtype and rstd.dtype == torch.float32
    _close(y, y0)
    _close(rstd, rstd0)
    _close(dx, dx0)
    if w is None:
        assert dw.numel() == 0
    else:
        assert dw.dtype == w.dtype
        _check_dw(dw, dw0, x.shape[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ROW_LENGTHS, ids=lambda n: f"N{n}")
def test_rms_norm_forward_backward(executor, n, dtype):
    _fwd_bwd(*_inputs(3, n, dtype, True), offset=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", (33, 4097), ids=lambda n: f"N{n}")
@pytest.mark.parametrize("variant", ["gemma", "no_weight"])
def test_rms_norm_offset_and_no_weight(executor, n, dtype, variant):
    x, w = _inputs(4, n, dtype, variant == "gemma")
    _fwd_bwd(x, w, offset=1.0 if variant == "gemma" else 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", [(300, 33), (130, 256)], ids=lambda v: str(v))
def test_rms_norm_many_rows(executor, rows, n, dtype):
    # 300 rows: five dweight chunks of 64 rows, the last one partial.
    _fwd_bwd(*_inputs(rows, n, dtype, True), offset=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ROW_LENGTHS, ids=lambda n: f"N{n}")
def test_fused_add_rms_norm_forward(executor, n, dtype):
    x, w = _inputs(3, n, dtype, True)
    r = torch.randn(3, n).to(dtype)
    with metalcore.use_backend("metal"):
        assert fused_add_rms_norm_fwd.backend_for(x, r, w, 1e-6, 0.5) == "metal"
        y, h, rstd = fused_add_rms_norm_fwd(x, r, w, 1e-6, 0.5)
    y0, h0, rstd0 = fused_add_rms_norm_fwd.reference(x, r, w, 1e-6, 0.5)
    assert torch.equal(h, h0)  # the sum is rounded to the dtype exactly as torch rounds x + residual
    _close(y, y0)
    _close(rstd, rstd0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_functions_and_autograd_on_metal(executor, dtype):
    x = torch.randn(2, 5, 40).to(dtype).requires_grad_()
    r = torch.randn(2, 5, 40).to(dtype).requires_grad_()
    w = torch.randn(40, requires_grad=True)
    with metalcore.use_backend("metal"):
        y, h = metalcore.fused_add_rms_norm(x, r, w, 1e-6)
        grads = torch.autograd.grad((y.float().square().sum() + h.float().sum()), (x, r, w))
    with metalcore.use_backend("reference"):
        y0, h0 = metalcore.fused_add_rms_norm(x, r, w, 1e-6)
        grads0 = torch.autograd.grad((y0.float().square().sum() + h0.float().sum()), (x, r, w))
    _close(y, y0)
    for g, g0 in zip(grads[:2], grads0[:2]):
        _close(g, g0)
    _check_dw(grads[2], grads0[2], 10)


def test_float64_stays_on_the_reference(executor):
    x = torch.randn(3, 8, dtype=torch.float64)
    with metalcore.use_backend("metal"):
        assert rms_norm_fwd.backend_for(x, None, 1e-6, 0.0) == "reference"
