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


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in one pass: the activation inside Llama/Mistral/Qwen MLPs.

    ``gate``, ``up``: the same shape ``(*, intermediate_size)`` and dtype (fp32/bf16/fp16/fp64), on
    the same device. Returns a contiguous tensor of that shape and dtype.

    >>> y = metalcore.swiglu(torch.randn(4, 128, 11008), torch.randn(4, 128, 11008))
    """
    fn = "metalcore.swiglu"
    check_tensor(fn, "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor(fn, "up", up, dtypes=FLOAT_DTYPES)
    check_same_device(fn, gate=gate, up=up)
    check_same_dtype(fn, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"{fn}: gate and up must have the same shape; got gate {tuple(gate.shape)} "
                         f"and up {tuple(up.shape)}")
    return swiglu_fwd(gate, up)


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
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"bias={self.gate_proj.bias is not None}")
