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

import math

import torch
from torch import Tensor, nn

from metalcore._op import metalcore_op
from metalcore._validation import FLOAT_DTYPES, check_choice, check_tensor
from metalcore.nn.rms_norm import _acc

GELU_APPROXIMATIONS = ("none", "tanh")
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715  # Hendrycks & Gimpel's fit, the constant torch uses for approximate='tanh'


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
    xf = _load(x)
    if approximate == "tanh":
        y = 0.5 * xf * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (xf + _TANH_CUBIC * xf * xf * xf)))
    else:
        y = 0.5 * xf * (1.0 + torch.erf(xf * _INV_SQRT2))
    return y.to(x.dtype)


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
    xf, dyf = _load(x), dy.contiguous().to(_acc(x))
    if approximate == "tanh":
        x2 = xf * xf
        t = torch.tanh(_SQRT_2_OVER_PI * xf * (1.0 + _TANH_CUBIC * x2))
        grad = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * x2)
    else:
        grad = 0.5 * (1.0 + torch.erf(xf * _INV_SQRT2)) + xf * torch.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
    return (dyf * grad).to(x.dtype)


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
    """Reference forward: ``x·σ(x)`` in float32 (float64)."""
    xf = _load(x)
    return (xf * torch.sigmoid(xf)).to(x.dtype)


@silu_fwd.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@metalcore_op("silu_bwd")
def silu_bwd(dy: Tensor, x: Tensor) -> Tensor:
    """Reference backward: ``dx = dy·σ(x)·(1 + x·(1 − σ(x)))``."""
    xf, dyf = _load(x), dy.contiguous().to(_acc(x))
    s = torch.sigmoid(xf)
    return (dyf * s * (1.0 + xf * (1.0 - s))).to(x.dtype)


@silu_bwd.register_fake
def _(dy, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _silu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _silu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return silu_bwd(dy.contiguous(), x)


silu_fwd.register_autograd(_silu_backward, setup_context=_silu_setup)


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
    return gelu_fwd(input, approximate)


def metal_silu(input: Tensor) -> Tensor:
    """Same result as ``torch.nn.functional.silu``: ``input·σ(input)``.

    ``input``: any shape, fp32/bf16/fp16/fp64. Returns a contiguous tensor of ``input``'s shape
    and dtype.

    >>> y = metalcore.metal_silu(torch.randn(8, 4096))
    """
    check_tensor("metalcore.metal_silu", "input", input, dtypes=FLOAT_DTYPES)
    return silu_fwd(input)


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
