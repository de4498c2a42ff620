"""SwiGLU: ``silu(gate) · up``, the gated activation of Llama-style MLPs, fused into one pass.

* ``metalcore::swiglu_fwd(gate, up) -> y``                 ``y = gate·σ(gate)·up``
* ``metalcore::swiglu_bwd(dy, gate, up) -> (dgate, dup)``  ``dup = dy·silu(gate)``,
  ``dgate = dy·up·σ(gate)·(1 + gate·(1 − σ(gate)))``

``gate`` and ``up`` have the same shape (any layout) and dtype (fp32/bf16/fp16/fp64); the math runs
in float32 (float64 for float64 input), outputs are contiguous in that dtype. Unfused, the MLP
writes and re-reads ``silu(gate)`` (one intermediate of ``intermediate_size`` per token) and keeps
it for the backward; fused, the backward recomputes ``σ(gate)`` from the saved inputs, so each
direction is one read of its inputs and one write of its outputs.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalcore._op import metalcore_op
from metalcore._validation import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from metalcore.nn.rms_norm import _acc


@metalcore_op("swiglu_fwd")
def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """Reference forward in float32 (float64 for float64 input)."""
    g, u = gate.contiguous().to(_acc(gate)), up.contiguous().to(_acc(gate))
    return (torch.nn.functional.silu(g) * u).to(gate.dtype)


@swiglu_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@metalcore_op("swiglu_bwd")
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Reference backward, recomputing ``σ(gate)``."""
    acc = _acc(gate)
    g, u, d = gate.contiguous().to(acc), up.contiguous().to(acc), dy.contiguous().to(acc)
    # dgate = dy·up·σ(g)(1 + g(1 − σ(g))) is silu's derivative applied to dy·up.
    dup = d * torch.nn.functional.silu(g)
    dgate = torch.ops.aten.silu_backward(d * u, g)
    return dgate.to(gate.dtype), dup.to(up.dtype)


@swiglu_bwd.register_fake
def _(dy, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return swiglu_bwd(dy.contiguous(), gate, up)


swiglu_fwd.register_autograd(_backward, setup_context=_setup)


def _swiglu_torch(gate: Tensor, up: Tensor) -> Tensor:
    """:func:`swiglu` on the torch route: ``F.silu(gate) * up``, contiguous as documented."""
    return F.silu(gate.contiguous()) * up.contiguous()


@swiglu_fwd.torch_route(_swiglu_torch)
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in one pass: the activation inside Llama/Mistral/Qwen MLPs.

    ``gate``, ``up``: the same shape ``(*, intermediate_size)`` and dtype (fp32/bf16/fp16/fp64), on
    the same device. Returns a contiguous tensor of that shape and dtype.

    >>> y = metalcore.swiglu(torch.randn(4, 128, 11008), torch.randn(4, 128, 11008))
    """
    _check_gate_up("metalcore.swiglu", gate, up)
    plan = swiglu_fwd.plan(gate, up)
    if plan.prefers_torch:
        return swiglu.by_torch(gate, up)
    return swiglu_fwd.call_planned(plan, gate, up)


def _check_gate_up(fn: str, gate: Tensor, up: Tensor) -> None:
    check_tensor(fn, "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor(fn, "up", up, dtypes=FLOAT_DTYPES)
    check_same_device(fn, gate=gate, up=up)
    check_same_dtype(fn, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"{fn}: gate and up must have the same shape; got gate {tuple(gate.shape)} "
                         f"and up {tuple(up.shape)}")


class _SwiGLULinear(torch.autograd.Function):
    """``F.linear(swiglu(gate, up), weight, bias)`` saving ``gate`` and ``up`` only: the product, which
    the down projection would otherwise keep for its weight gradient, is recomputed in the backward."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        # Under autocast the inputs are cast as the down projection's Linear would cast them, once,
        # here; the math below then runs with autocast off so that the backward sees the same dtypes.
        device = gate.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else gate.dtype
        gate, up = gate.to(dtype), up.to(dtype)
        with torch.autocast(device, enabled=False):
            out = torch.nn.functional.linear(swiglu_fwd(gate, up), weight.to(dtype),
                                             None if bias is None else bias.to(dtype))
        ctx.save_for_backward(gate, up, weight)
        ctx.dtypes = (dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out):
        gate, up, weight = ctx.saved_tensors
        dtype, bias_dtype = ctx.dtypes
        d_out = d_out.to(dtype)
        y = swiglu_fwd(gate, up)
        d_y = d_out @ weight.to(dtype)
        d_gate, d_up = swiglu_bwd(d_y, gate, up)
        rows = d_out.reshape(-1, d_out.shape[-1])
        d_weight = (rows.t() @ y.reshape(-1, y.shape[-1])).to(weight.dtype) if ctx.needs_input_grad[2] else None
        d_bias = rows.sum(0).to(bias_dtype) if bias_dtype is not None and ctx.needs_input_grad[3] else None
        return d_gate, d_up, d_weight, d_bias


def swiglu_linear(gate: Tensor, up: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(swiglu(gate, up), weight, bias)``, the down projection of a SwiGLU MLP, keeping one
    activation fewer for the backward.

    Unfused, the down projection saves its input ``silu(gate)·up`` for its weight gradient, beside
    the ``gate`` and ``up`` the SwiGLU backward needs: three ``(tokens, intermediate)`` tensors a
    layer. Here only ``gate`` and ``up`` are saved and the product is recomputed in the backward
    (one more elementwise pass): at 8192 tokens × 5632 in bf16, 92 MB less per layer
    (bench/training.md). ``weight``: ``(out, intermediate)``; ``bias``: ``(out,)`` or None.

    >>> y = swiglu_linear(mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj.weight, mlp.down_proj.bias)
    """
    fn = "metalcore.swiglu_linear"
    check_tensor(fn, "gate", gate, dtypes=FLOAT_DTYPES, min_dim=1)
    _check_gate_up(fn, gate, up)
    check_tensor(fn, "weight", weight, dtypes=FLOAT_DTYPES)
    check_same_device(fn, gate=gate, weight=weight)
    if weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        raise ValueError(f"{fn}: weight must have shape (out, {gate.shape[-1]}) to match gate {tuple(gate.shape)}; "
                         f"got {tuple(weight.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (gate, up, weight, bias)):
        return _SwiGLULinear.apply(gate, up, weight, bias)
    return torch.nn.functional.linear(swiglu_fwd(gate, up), weight, bias)


class MetalSwiGLUMLP(nn.Module):
    """The Llama MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the fused SwiGLU.

    Parameter names match Hugging Face's ``LlamaMLP`` (``gate_proj``, ``up_proj``, ``down_proj``), so
    its ``state_dict`` loads 1:1. ``x``: ``(*, hidden_size)``; returns ``(*, hidden_size)``.

    >>> mlp = MetalSwiGLUMLP(4096, 11008, dtype=torch.bfloat16)
    >>> mlp.load_state_dict(hf_model.model.layers[0].mlp.state_dict())
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        factory = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **factory)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("metalcore.nn.MetalSwiGLUMLP", "input", x, dtypes=FLOAT_DTYPES, min_dim=1)
        return swiglu_linear(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"bias={self.gate_proj.bias is not None}")
