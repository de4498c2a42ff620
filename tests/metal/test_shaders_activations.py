"""shaders/activations.metal and shaders/swiglu.metal through the metal backend on CPU tensors (the
shader executor), against each op's reference: forward and backward, every dtype, odd sizes."""

import pytest
import torch

import metalcore
from metalcore.nn.activations import gelu_bwd, gelu_fwd, silu_bwd, silu_fwd
from metalcore.nn.swiglu import swiglu_bwd, swiglu_fwd
from tolerances import TOL

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 31, 33, 4097, 8193)


def _inputs(n, dtype, count):
    return [(torch.randn(n) * 3).to(dtype) for _ in range(count)]


def _compare(op, *args):
    with metalcore.use_backend("metal"):
        assert op.backend_for(*args) == "metal"
        got = op(*args)
    want = op.reference(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, **TOL[a.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_forward_backward(executor, n, dtype, approximate):
    x, dy = _inputs(n, dtype, 2)
    _compare(gelu_fwd, x, approximate)
    _compare(gelu_bwd, dy, x, approximate)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
def test_silu_forward_backward(executor, n, dtype):
    x, dy = _inputs(n, dtype, 2)
    _compare(silu_fwd, x)
    _compare(silu_bwd, dy, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
def test_swiglu_forward_backward(executor, n, dtype):
    gate, up, dy = _inputs(n, dtype, 3)
    _compare(swiglu_fwd, gate, up)
    _compare(swiglu_bwd, dy, gate, up)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_rows_noncontiguous_and_autograd(executor, dtype):
    x = (torch.randn(65, 300) * 2).to(dtype).T  # a transposed view: kernels see a contiguous copy
    gate = torch.randn(257, 33).to(dtype).requires_grad_()
    up = torch.randn(257, 33).to(dtype).requires_grad_()
    _compare(gelu_fwd, x, "tanh")
    _compare(silu_fwd, x)
    with metalcore.use_backend("metal"):
        y = metalcore.nn.swiglu(gate, up)
        grads = torch.autograd.grad(y.float().square().sum(), (gate, up))
    y0 = swiglu_fwd.reference(gate, up)
    grads0 = torch.autograd.grad(y0.float().square().sum(), (gate, up))
    torch.testing.assert_close(y, y0, **TOL[dtype])
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, **TOL[dtype])


def test_float64_stays_on_the_reference(executor):
    x = torch.randn(5, dtype=torch.float64)
    with metalcore.use_backend("metal"):
        assert gelu_fwd.backend_for(x, "none") == "reference"
        assert swiglu_fwd.backend_for(x, x) == "reference"
