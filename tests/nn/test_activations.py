import pytest
import torch

from backends import expected_backend
import torch.nn.functional as F

import metalcore
from cases import noncontiguous
from metalcore.nn import MetalGELU, MetalSiLU, metal_gelu, metal_silu
from metalcore.nn.activations import silu_bwd
from metalcore.nn.activations import gelu_bwd, gelu_fwd, metal_gelu as metal_gelu_triton, metal_silu as metal_silu_triton, silu_fwd
from metalcore.nn.swiglu import swiglu, swiglu_bwd, swiglu_fwd
from oracle import assert_close, assert_unary_matches_oracle, float64


DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ROWS = (1, 31, 33, 4097)
# (id, metalcore function, float64 oracle)
ACTIVATIONS = (
    ("gelu", lambda x: metal_gelu(x), lambda x: F.gelu(x)),
    ("gelu_tanh", lambda x: metal_gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    ("silu", metal_silu, F.silu),
)
IDS = [a[0] for a in ACTIVATIONS]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ROWS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("name,fn,oracle", ACTIVATIONS, ids=IDS)
def test_forward_backward(name, fn, oracle, n, dtype):
    # Scale 3 reaches both tails, where the erf/tanh forms and their derivatives differ most.
    assert_unary_matches_oracle(fn, oracle, (3 * torch.randn(3, n)).to(dtype))


@pytest.mark.parametrize("name,fn,oracle", ACTIVATIONS, ids=IDS)
def test_noncontiguous_and_empty(name, fn, oracle):
    x = torch.randn(33, 31, requires_grad=True)
    xt = noncontiguous(x.detach()).requires_grad_()
    y, yt = fn(x), fn(xt)
    assert yt.is_contiguous() and yt.stride() != xt.stride()
    torch.testing.assert_close(yt, y, rtol=0, atol=0)
    dy = noncontiguous(torch.randn(33, 31))
    torch.testing.assert_close(torch.autograd.grad(yt, xt, dy)[0], torch.autograd.grad(y, x, dy)[0], rtol=0, atol=0)
    empty = torch.randn(0, 7, requires_grad=True)
    out = fn(empty)
    assert out.shape == (0, 7)
    out.sum().backward()
    assert empty.grad.shape == (0, 7)


@pytest.mark.parametrize("name,fn,oracle", ACTIVATIONS, ids=IDS)
def test_gradcheck(name, fn, oracle):
    x = (3 * torch.randn(4, 5, dtype=torch.float64)).requires_grad_()
    torch.autograd.gradcheck(fn, (x,))


def test_modules_are_drop_ins():
    x = torch.randn(4, 6, 10, dtype=torch.float64)
    for approximate in ("none", "tanh"):
        ours, theirs = MetalGELU(approximate), torch.nn.GELU(approximate)
        torch.testing.assert_close(ours(x), theirs(x))
        assert repr(ours) == f"MetalGELU(approximate={approximate!r})"
    torch.testing.assert_close(MetalSiLU()(x), torch.nn.SiLU()(x))
    assert repr(MetalSiLU()) == "MetalSiLU()"


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"metalcore\.metal_gelu: approximate must be one of 'none', 'tanh'; got 'erf'"):
        metal_gelu(torch.randn(3), approximate="erf")
    with pytest.raises(ValueError, match="MetalGELU: approximate"):
        MetalGELU("fast")
    with pytest.raises(TypeError, match=r"metalcore\.metal_silu: input must have dtype"):
        metal_silu(torch.arange(3))
    with pytest.raises(TypeError, match=r"metalcore\.metal_gelu: input must be a torch.Tensor"):
        metal_gelu([1.0, 2.0])


@pytest.mark.parametrize("name,fn,oracle", ACTIVATIONS, ids=IDS)
def test_compiles_fullgraph(name, fn, oracle):
    x = torch.randn(8, 33, requires_grad=True)
    compiled = torch.compile(fn, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, fn(x))
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.autograd.grad(fn(x).sum(), x)[0])


# --- Triton kernels (interpreter in CI) -----------------------------------------------------------
# GELU (exact, tanh), SiLU and SwiGLU Triton kernels against the float64 oracle: outputs and
# every gradient, each dtype, sizes 1, 31, 33, 4097 and a transposed (non-contiguous) input.


# σ(x) = 1/(1 + e^(-x)) overflows e^(-x) to inf for very negative x, which gives the right limit
# (σ = 0); numpy, running the interpreted kernels, warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES_triton = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1,), (31,), (3, 11), (4097,), (5, 33, 7))
ACTIVATIONS_triton = {
    "gelu": (lambda x: metal_gelu_triton(x), lambda x: F.gelu(x)),
    "gelu_tanh": (lambda x: metal_gelu_triton(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "silu": (metal_silu_triton, F.silu),
}


def shape_id(shape):
    return "x".join(map(str, shape))


def inputs(shape, dtype, device, transposed=False):
    """Values over [-8, 8]: both tails and the curved middle of each function."""
    x = torch.randn(shape, device=device) * 3
    if transposed:
        x = x.mT.contiguous().mT
    return x.to(dtype)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", ACTIVATIONS_triton)
def test_activation_forward_backward(name, shape, dtype, device):
    ours, theirs = ACTIVATIONS_triton[name]
    assert_unary_matches_oracle(ours, theirs, inputs(shape, dtype, device, transposed=len(shape) > 1))


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_swiglu_forward_backward(shape, dtype, device):
    gate = inputs(shape, dtype, device, transposed=len(shape) > 1).requires_grad_()
    up = inputs(shape, dtype, device).requires_grad_()
    assert swiglu_fwd.backend_for(gate, up) == expected_backend("triton", gate, up)
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


@pytest.mark.usefixtures("triton_backend")
def test_extreme_inputs_stay_finite(device):
    """Large |x|: the sigmoid form of tanh-GELU saturates cleanly instead of overflowing."""
    x = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], device=device)
    for approximate in ("none", "tanh"):
        y = gelu_fwd(x, approximate)
        assert_close(y, F.gelu(x.double(), approximate=approximate), torch.float32)
        dx = gelu_bwd(torch.ones_like(x), x, approximate)
        assert torch.isfinite(dx).all()
    assert_close(silu_fwd(x), F.silu(x.double()), torch.float32)


@pytest.mark.usefixtures("triton_backend")
def test_empty_inputs(device):
    x = torch.randn(0, 5, device=device)
    assert gelu_fwd(x, "none").shape == (0, 5)
    assert swiglu_bwd(x, x, x)[0].shape == (0, 5)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("op", ["gelu_fwd", "gelu_bwd", "silu_fwd", "silu_bwd", "swiglu_fwd", "swiglu_bwd"])
def test_opcheck_on_the_triton_backend(op, device):
    from metalcore._op import registered_ops
    x = torch.randn(4, 33, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    args = {"gelu_fwd": (x, "tanh"), "gelu_bwd": (dy, x.detach(), "none"), "silu_fwd": (x,),
            "silu_bwd": (dy, x.detach()), "swiglu_fwd": (x, torch.randn_like(x, requires_grad=True)),
            "swiglu_bwd": (dy, x.detach(), torch.randn_like(x))}[op]
    torch.library.opcheck(registered_ops()[op].custom_op, args)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("name", [*ACTIVATIONS_triton, "swiglu"])
def test_gpu_full_size(name, dtype, device):
    shape = (4096, 11008)
    if name == "swiglu":
        test_swiglu_forward_backward(shape, dtype, device)
    else:
        test_activation_forward_backward(name, shape, dtype, device)


# --- Metal shaders (executor in CI) ---------------------------------------------------------------
# shaders/activations.metal and shaders/swiglu.metal through the metal backend on CPU tensors (the
# shader executor), against the float64 oracle (each op's reference run in float64) within
# TOL[dtype], as the Triton kernels are: forward and backward, every dtype, odd sizes.


DTYPES_metal = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 31, 33, 4097, 8193)


def _inputs(n, dtype, count):
    return [(torch.randn(n) * 3).to(dtype) for _ in range(count)]


def _compare(op, *args):
    with metalcore.use_backend("metal"):
        assert op.backend_for(*args) == expected_backend("metal", *args)
        got = op(*args)
    want = op.reference(*map(float64, args))
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for a, b in zip(got, want):
        assert a.dtype == args[0].dtype and a.shape == b.shape and a.is_contiguous()
        assert_close(a, b, a.dtype)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_forward_backward(executor, n, dtype, approximate):
    x, dy = _inputs(n, dtype, 2)
    _compare(gelu_fwd, x, approximate)
    _compare(gelu_bwd, dy, x, approximate)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
def test_silu_forward_backward(executor, n, dtype):
    x, dy = _inputs(n, dtype, 2)
    _compare(silu_fwd, x)
    _compare(silu_bwd, dy, x)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
def test_swiglu_forward_backward_metal(executor, n, dtype):
    gate, up, dy = _inputs(n, dtype, 3)
    _compare(swiglu_fwd, gate, up)
    _compare(swiglu_bwd, dy, gate, up)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
def test_many_rows_noncontiguous_and_autograd(executor, dtype):
    x = (torch.randn(65, 300) * 2).to(dtype).T  # a transposed view: kernels see a contiguous copy
    gate = torch.randn(257, 33).to(dtype).requires_grad_()
    up = torch.randn(257, 33).to(dtype).requires_grad_()
    _compare(gelu_fwd, x, "tanh")
    _compare(silu_fwd, x)
    dy = torch.randn(257, 33).to(dtype)
    with metalcore.use_backend("metal"):
        y = metalcore.nn.swiglu(gate, up)
        grads = torch.autograd.grad(y, (gate, up), dy)
    gate64, up64 = (float64(t).requires_grad_() for t in (gate, up))
    y64 = swiglu_fwd.reference(gate64, up64)
    assert_close(y, y64, dtype)
    for g, g64 in zip(grads, torch.autograd.grad(y64, (gate64, up64), dy.double())):
        assert_close(g, g64, dtype)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned")
def test_float64_stays_on_the_reference(executor):
    x = torch.randn(5, dtype=torch.float64)
    with metalcore.use_backend("metal"):
        assert gelu_fwd.backend_for(x, "none") == "reference"
        assert swiglu_fwd.backend_for(x, x) == "reference"
