import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from cases import noncontiguous
from metalcore.nn import MetalSwiGLUMLP, swiglu
from metalcore.nn.swiglu import swiglu_linear
from oracle import assert_close, assert_within_torch_error
from tolerances import TOL

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


def _saved_storages(fn, *args):
    """Storages (by pointer) that autograd saves while ``fn(*args)`` runs."""
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_swiglu_linear_gradients_and_what_it_saves(bias, dtype):
    gate = (3 * torch.randn(2, 5, 33)).to(dtype).requires_grad_()
    up = torch.randn(2, 5, 33).to(dtype).requires_grad_()
    weight = torch.randn(17, 33).to(dtype).requires_grad_()
    b = torch.randn(17).to(dtype).requires_grad_() if bias else None
    out, saved = _saved_storages(swiglu_linear, gate, up, weight, b)
    # gate, up and the weight: never the (tokens, intermediate) product.
    assert saved == {t.untyped_storage().data_ptr() for t in (gate, up, weight)}
    leaves = [t for t in (gate, up, weight, b) if t is not None]
    d_out = torch.randn_like(out)
    ours = (out, *torch.autograd.grad(out, leaves, d_out))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    b64 = leaves64[3] if bias else None
    y64 = F.linear(oracle(leaves64[0], leaves64[1]), leaves64[2], b64)
    expected = (y64, *torch.autograd.grad(y64, leaves64, d_out.double()))
    y = F.linear(oracle(gate, up), weight, b)
    theirs = (y, *torch.autograd.grad(y, leaves, d_out))
    for a, t, e in zip(ours, theirs, expected):
        assert a.dtype == dtype
        assert_within_torch_error(a, t, e)


def test_swiglu_linear_under_autocast_and_bad_weight():
    gate, up = torch.randn(4, 12, requires_grad=True), torch.randn(4, 12, requires_grad=True)
    weight = torch.randn(6, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = swiglu_linear(gate, up, weight)
        ref = F.linear(oracle(gate, up), weight)
    assert out.dtype == ref.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), (gate, up, weight))
    expected = torch.autograd.grad(ref.float().sum(), (gate, up, weight))
    for a, e in zip(grads, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, **TOL[torch.bfloat16])
    with pytest.raises(ValueError, match=r"metalcore\.swiglu_linear: weight must have shape \(out, 12\)"):
        swiglu_linear(gate, up, weight[:, :5])
