import pytest
import torch
import torch.nn.functional as F

from cases import noncontiguous
from metalcore.nn import MetalGELU, MetalSiLU, metal_gelu, metal_silu
from oracle import assert_unary_matches_oracle

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
