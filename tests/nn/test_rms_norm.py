import pytest
import torch
import torch.nn.functional as F

import metalcore
from cases import noncontiguous
from oracle import assert_close

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
    # dweight sums n_rows products: allow the row count's growth of rounding error.
    torch.testing.assert_close(gw.double(), ew, rtol=1e-4 if dtype != torch.float64 else 1e-10,
                               atol=1e-3 * 15 if dtype in (torch.bfloat16, torch.float16) else 1e-4)


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
