import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from cases import noncontiguous
from metalcore.nn import MetalSwiGLUMLP, swiglu
from oracle import assert_close

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ROWS = (1, 31, 33, 4097)


def oracle(gate, up):
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ROWS, ids=lambda n: f"N{n}")
def test_swiglu_forward_backward(n, dtype):
    gate = (3 * torch.randn(2, 3, n)).to(dtype).requires_grad_()
    up = torch.randn(2, 3, n, dtype=dtype, requires_grad=True)
    y = swiglu(gate, up)
    assert y.dtype == dtype and y.shape == gate.shape and y.is_contiguous()
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    y64 = oracle(g64, u64)
    assert_close(y, y64, dtype)
    dy = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    e_gate, e_up = torch.autograd.grad(y64, (g64, u64), dy.double())
    assert dgate.dtype == dup.dtype == dtype
    assert_close(dgate, e_gate, dtype)
    assert_close(dup, e_up, dtype)


def test_swiglu_noncontiguous_empty_and_gradcheck():
    gate, up = torch.randn(33, 31, dtype=torch.float64), torch.randn(33, 31, dtype=torch.float64)
    torch.testing.assert_close(swiglu(noncontiguous(gate), noncontiguous(up)), oracle(gate, up))
    assert swiglu(torch.randn(0, 5), torch.randn(0, 5)).shape == (0, 5)
    g, u = gate[:3, :5].clone().requires_grad_(), up[:3, :5].clone().requires_grad_()
    torch.autograd.gradcheck(swiglu, (g, u))


def test_swiglu_bad_inputs():
    with pytest.raises(ValueError, match=r"metalcore\.swiglu: gate and up must have the same shape"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match=r"metalcore\.swiglu: expected all tensors to have the same dtype; got gate"):
        swiglu(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"metalcore\.swiglu: up must have dtype"):
        swiglu(torch.randn(3), torch.arange(3))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_mlp_loads_llama_weights_one_to_one(bias):
    config = LlamaConfig(hidden_size=32, intermediate_size=88, mlp_bias=bias, hidden_act="silu")
    hf = LlamaMLP(config).double()
    ours = MetalSwiGLUMLP(32, 88, bias=bias, dtype=torch.float64)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    y = ours(x)
    torch.testing.assert_close(y, hf(x))
    dy = torch.randn_like(y)
    y.backward(dy)
    hf(x).backward(dy)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf.get_parameter(name).grad, msg=name)
    assert repr(ours).startswith(f"MetalSwiGLUMLP(\n  hidden_size=32, intermediate_size=88, bias={bias}")


def test_swiglu_compiles_fullgraph():
    mlp = MetalSwiGLUMLP(16, 40)
    x = torch.randn(3, 16, requires_grad=True)
    compiled = torch.compile(mlp, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, mlp(x))
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.autograd.grad(mlp(x).sum(), x)[0])
