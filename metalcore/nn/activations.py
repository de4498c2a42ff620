"""Activations: GELU (exact and tanh-approximated) and SiLU, one registered op per direction.

* ``metalcore::gelu_fwd(x, approximate) -> y``      ``y = x·Φ(x)`` (``approximate='none'``) or
  ``y = ½x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` (``'tanh'``), as ``torch.nn.functional.gelu``
* ``metalcore::gelu_bwd(dy, x, approximate) -> dx``
* ``metalcore::silu_fwd(x) -> y``                   ``y = x·σ(x)``
* ``metalcore::silu_bwd(dy, x) -> dx``

``x`` has any shape and layout, dtype fp32/bf16/fp16/fp64; the math runs in float32 (float64 for
float64 input) and outputs are contiguous, in ``x``'s dtype. The backward recomputes from ``x`` (it
saves ``x``, not ``y``): one read of ``x`` and ``dy``, one write of ``dx``, no saved activation
beyond the input the previous layer keeps anyway.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalcore._op import metalcore_op
from metalcore._validation import FLOAT_DTYPES, check_choice, check_tensor
from metalcore.nn.rms_norm import _acc

GELU_APPROXIMATIONS = ("none", "tanh")


def _load(x: Tensor) -> Tensor:
    """``x`` as a contiguous tensor of its accumulation dtype (outputs then come out contiguous)."""
    return x.contiguous().to(_acc(x))


def _check_approximate(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"metalcore gelu: approximate must be 'none' or 'tanh'; got {approximate!r}")


@metalcore_op("gelu_fwd")
def gelu_fwd(x: Tensor, approximate: str) -> Tensor:
    """Reference forward: the formulas of ``torch.nn.functional.gelu`` in float32 (float64)."""
    _check_approximate(approximate)
    # torch's fused kernel computes exactly these formulas (3.7x the composed ops on a 2-core CPU).
    return torch.nn.functional.gelu(_load(x), approximate=approximate).to(x.dtype)


@gelu_fwd.register_fake
def _(x, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@metalcore_op("gelu_bwd")
def gelu_bwd(dy: Tensor, x: Tensor, approximate: str) -> Tensor:
    """Reference backward.

    exact: ``dx = dy·(Φ(x) + x·φ(x))`` with ``Φ(x) = ½(1 + erf(x/√2))``, ``φ(x) = e^(−x²/2)/√(2π)``;
    tanh:  with ``t = tanh(√(2/π)(x + c·x³))``,
    ``dx = dy·(½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3c·x²))``.
    """
    _check_approximate(approximate)
    dx = torch.ops.aten.gelu_backward(dy.contiguous().to(_acc(x)), _load(x), approximate=approximate)
    return dx.to(x.dtype)


@gelu_bwd.register_fake
def _(dy, x, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gelu_setup(ctx, inputs, output):
    x, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x)


def _gelu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return gelu_bwd(dy.contiguous(), x, ctx.approximate), None


gelu_fwd.register_autograd(_gelu_backward, setup_context=_gelu_setup)


@metalcore_op("silu_fwd")
def silu_fwd(x: Tensor) -> Tensor:
    """Reference forward: ``x·σ(x)`` in float32 (float64), through torch's fused kernel."""
    return torch.nn.functional.silu(_load(x)).to(x.dtype)


@silu_fwd.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@metalcore_op("silu_bwd")
def silu_bwd(dy: Tensor, x: Tensor) -> Tensor:
    """Reference backward: ``dx = dy·σ(x)·(1 + x·(1 − σ(x)))``, through torch's fused kernel."""
    return torch.ops.aten.silu_backward(dy.contiguous().to(_acc(x)), _load(x)).to(x.dtype)


@silu_bwd.register_fake
def _(dy, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _silu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _silu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return silu_bwd(dy.contiguous(), x)


silu_fwd.register_autograd(_silu_backward, setup_context=_silu_setup)


def _gelu_torch(input: Tensor, approximate: str = "none") -> Tensor:
    """:func:`metal_gelu` on the torch route: ``F.gelu``, contiguous as documented. Its default
    ``approximate`` is not passed: parsing the keyword's string costs torch ~0.14 µs a call
    (development CPU; the route's whole cost is ~1 µs)."""
    x = input.contiguous()
    return F.gelu(x) if approximate == "none" else F.gelu(x, approximate=approximate)


def _silu_torch(input: Tensor) -> Tensor:
    """:func:`metal_silu` on the torch route: ``F.silu``, contiguous as documented."""
    return F.silu(input.contiguous())


@gelu_fwd.torch_route(_gelu_torch)
def metal_gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """Same signature and result as ``torch.nn.functional.gelu``.

    ``input``: any shape, fp32/bf16/fp16/fp64. ``approximate``: ``'none'`` (the exact ``x·Φ(x)``)
    or ``'tanh'``; anything else raises ``ValueError``. Returns a contiguous tensor of ``input``'s
    shape and dtype.

    >>> y = metalcore.metal_gelu(torch.randn(8, 4096), approximate="tanh")
    """
    fn = "metalcore.metal_gelu"
    check_tensor(fn, "input", input, dtypes=FLOAT_DTYPES)
    check_choice(fn, "approximate", approximate, GELU_APPROXIMATIONS)
    plan = gelu_fwd.plan(input, approximate)
    if plan.prefers_torch:
        return metal_gelu.by_torch(input, approximate)
    return gelu_fwd.call_planned(plan, input, approximate)


@silu_fwd.torch_route(_silu_torch)
def metal_silu(input: Tensor) -> Tensor:
    """Same result as ``torch.nn.functional.silu``: ``input·σ(input)``.

    ``input``: any shape, fp32/bf16/fp16/fp64. Returns a contiguous tensor of ``input``'s shape
    and dtype.

    >>> y = metalcore.metal_silu(torch.randn(8, 4096))
    """
    check_tensor("metalcore.metal_silu", "input", input, dtypes=FLOAT_DTYPES)
    plan = silu_fwd.plan(input)
    if plan.prefers_torch:
        return metal_silu.by_torch(input)
    return silu_fwd.call_planned(plan, input)


class MetalGELU(nn.Module):
    """Drop-in for ``torch.nn.GELU`` backed by metalcore's activation kernels.

    >>> act = MetalGELU(approximate="tanh")
    >>> y = act(torch.randn(4, 128))
    """

    def __init__(self, approximate: str = "none"):
        super().__init__()
        check_choice("metalcore.nn.MetalGELU", "approximate", approximate, GELU_APPROXIMATIONS)
        self.approximate = approximate

    def forward(self, input: Tensor) -> Tensor:
        return metal_gelu(input, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class MetalSiLU(nn.Module):
    """Drop-in for ``torch.nn.SiLU`` backed by metalcore's activation kernels (never in place).

    >>> y = MetalSiLU()(torch.randn(4, 128))
    """

    def forward(self, input: Tensor) -> Tensor:
        return metal_silu(input)
