"""GELU (exact, tanh), SiLU and SwiGLU Triton kernels against the float64 oracle: outputs and
every gradient, each dtype, sizes 1, 31, 33, 4097 and a transposed (non-contiguous) input."""

import pytest
import torch
import torch.nn.functional as F

from metalcore.nn.activations import gelu_bwd, gelu_fwd, metal_gelu, metal_silu, silu_fwd
from metalcore.nn.swiglu import swiglu, swiglu_bwd, swiglu_fwd
from oracle import assert_close, assert_unary_matches_oracle

# σ(x) = 1/(1 + e^(-x)) overflows e^(-x) to inf for very negative x, which gives the right limit
# (σ = 0); numpy, running the interpreted kernels, warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1,), (31,), (3, 11), (4097,), (5, 33, 7))
ACTIVATIONS = {
    "gelu": (lambda x: metal_gelu(x), lambda x: F.gelu(x)),
    "gelu_tanh": (lambda x: metal_gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "silu": (metal_silu, F.silu),
}


def shape_id(shape):
    return "x".join(map(str, shape))


def inputs(shape, dtype, device, transposed=False):
    """Values over [-8, 8]: both tails and the curved middle of each function."""
    x = torch.randn(shape, device=device) * 3
    if transposed:
        x = x.mT.contiguous().mT
    return x.to(dtype)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_forward_backward(name, shape, dtype, device):
    ours, theirs = ACTIVATIONS[name]
    assert_unary_matches_oracle(ours, theirs, inputs(shape, dtype, device, transposed=len(shape) > 1))


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_swiglu_forward_backward(shape, dtype, device):
    gate = inputs(shape, dtype, device, transposed=len(shape) > 1).requires_grad_()
    up = inputs(shape, dtype, device).requires_grad_()
    assert swiglu_fwd.backend_for(gate, up) == "triton"
    y = swiglu(gate, up)
    assert y.dtype == dtype and y.shape == gate.shape and y.is_contiguous()
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    y64 = F.silu(g64) * u64
    assert_close(y, y64, dtype)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (gate, up), dy)
    expected = torch.autograd.grad(y64, (g64, u64), dy.double())
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        assert_close(got, want, dtype)


def test_extreme_inputs_stay_finite(device):
    """Large |x|: the sigmoid form of tanh-GELU saturates cleanly instead of overflowing."""
    x = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], device=device)
    for approximate in ("none", "tanh"):
        y = gelu_fwd(x, approximate)
        assert_close(y, F.gelu(x.double(), approximate=approximate), torch.float32)
        dx = gelu_bwd(torch.ones_like(x), x, approximate)
        assert torch.isfinite(dx).all()
    assert_close(silu_fwd(x), F.silu(x.double()), torch.float32)


def test_empty_inputs(device):
    x = torch.randn(0, 5, device=device)
    assert gelu_fwd(x, "none").shape == (0, 5)
    assert swiglu_bwd(x, x, x)[0].shape == (0, 5)


@pytest.mark.parametrize("op", ["gelu_fwd", "gelu_bwd", "silu_fwd", "silu_bwd", "swiglu_fwd", "swiglu_bwd"])
def test_opcheck_on_the_triton_backend(op, device):
    from metalcore._op import registered_ops
    x = torch.randn(4, 33, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    args = {"gelu_fwd": (x, "tanh"), "gelu_bwd": (dy, x.detach(), "none"), "silu_fwd": (x,),
            "silu_bwd": (dy, x.detach()), "swiglu_fwd": (x, torch.randn_like(x, requires_grad=True)),
            "swiglu_bwd": (dy, x.detach(), torch.randn_like(x))}[op]
    torch.library.opcheck(registered_ops()[op].custom_op, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [*ACTIVATIONS, "swiglu"])
def test_gpu_full_size(name, dtype, device):
    shape = (4096, 11008)
    if name == "swiglu":
        test_swiglu_forward_backward(shape, dtype, device)
    else:
        test_activation_forward_backward(name, shape, dtype, device)
