"""RMSNorm: ``y = x / sqrt(mean(x², -1) + eps) * (offset + w)``, with an optional fused residual add.

Two registered ops carry the math, forward and backward, so that each backend supplies one kernel
per direction and autograd is shared:

* ``metalcore::rms_norm_fwd(x, weight, eps, offset) -> (y, rstd)``
* ``metalcore::rms_norm_bwd(dy, x, weight, rstd, offset) -> (dx, dweight)``

``x`` is ``(rows, n)`` (callers flatten leading dims); statistics are accumulated in float32
(float64 for float64 input) and ``rstd`` (that dtype, one per row) is saved for the backward. ``y`` has ``x``'s dtype; the weight may
be float32 while ``x`` is bf16/fp16 (mixed-precision training). ``offset=1`` gives Gemma's
``(1 + w)`` scaling.
"""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from metalcore._op import metalcore_op
from metalcore._validation import FLOAT_DTYPES, check_same_device, check_tensor

_FN = "metalcore.rms_norm"


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@metalcore_op("rms_norm_fwd")
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float, offset: float) -> tuple[Tensor, Tensor]:
    """Reference forward in float32 arithmetic (float64 for float64 input)."""
    xf = x.to(_acc(x))
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    y = xf * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * (weight.to(xf.dtype) + offset)
    return y.to(x.dtype), rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps, offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=_acc(x))


@metalcore_op("rms_norm_bwd")
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, offset: float) -> tuple[Tensor, Tensor]:
    """Reference backward. With x̂ = x·rstd and g = dy·(offset + w):
    dx = rstd·(g − x̂·mean(g·x̂, -1)),  dw = Σ_rows dy·x̂ (empty when there is no weight)."""
    xf, dyf = x.to(_acc(x)), dy.to(_acc(x))
    xhat = xf * rstd.unsqueeze(-1)
    g = dyf if weight is None else dyf * (weight.to(xf.dtype) + offset)
    dx = rstd.unsqueeze(-1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if weight is None:
        dw = x.new_empty(0)
    else:
        dw = (dyf * xhat).reshape(math.prod(x.shape[:-1]), x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, offset):
    dw = x.new_empty(0) if weight is None else weight.new_empty(weight.shape)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw


def _fwd_setup(ctx, inputs, output):
    x, weight, _eps, offset = inputs
    ctx.offset = offset
    ctx.save_for_backward(x, weight, output[1])


def _fwd_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy.contiguous(), x, weight, rstd, ctx.offset)
    return dx, (dw if weight is not None else None), None, None


rms_norm_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _flatten(fn: str, x: Tensor, normalized_shape, weight: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Validate and view ``x`` as ``(rows, n)`` over its trailing ``normalized_shape``."""
    x = check_tensor(fn, "input", x, dtypes=FLOAT_DTYPES, min_dim=1)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 0 or len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{fn}: normalized_shape {shape} must be a non-empty suffix of input's shape "
                         f"{tuple(x.shape)}")
    n = 1
    for s in shape:
        n *= s
    if weight is not None:
        check_tensor(fn, "weight", weight, dtypes=FLOAT_DTYPES)
        check_same_device(fn, input=x, weight=weight)
        if tuple(weight.shape) != shape:
            raise ValueError(f"{fn}: weight must have shape {shape} (normalized_shape); got {tuple(weight.shape)}")
        weight = weight if weight.dim() == 1 else weight.reshape(n)
    # Already (rows, n) is the common case; a reshape to the same shape still costs ~1 µs a call.
    return (x if x.dim() == 2 and len(shape) == 1 else x.reshape(-1, n)), weight


def _rms_norm_torch(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None,
                    *, offset: float = 0.0) -> Tensor:
    """:func:`rms_norm` on the torch route (``offset`` 0, ``weight`` in ``input``'s dtype): torch's fused
    op with metalcore's default ``eps`` (torch's own default for bf16 input is float32's epsilon).
    ``torch.rms_norm`` is what ``F.rms_norm`` calls, without its Python frame (~0.3 µs)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    return torch.rms_norm(input, shape, weight, torch.finfo(input.dtype).eps if eps is None else float(eps))


@rms_norm_fwd.torch_route(_rms_norm_torch)
def rms_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None,
             *, offset: float = 0.0) -> Tensor:
    """Same signature and result as ``torch.nn.functional.rms_norm`` (plus Gemma's ``offset``).

    ``input``: ``(*, *normalized_shape)`` fp32/bf16/fp16/fp64; ``weight``: ``normalized_shape``, any
    float dtype. ``eps=None`` uses ``torch.finfo(input.dtype).eps`` as torch does.

    >>> y = metalcore.rms_norm(torch.randn(4, 128, 512), (512,), torch.ones(512), 1e-6)
    """
    x2d, w = _flatten(_FN, input, normalized_shape, weight)
    eps_value = torch.finfo(input.dtype).eps if eps is None else float(eps)
    args = (x2d, w, eps_value, float(offset))
    plan = rms_norm_fwd.plan(*args)
    if plan.prefers_torch and not offset and (weight is None or weight.dtype == input.dtype):
        return rms_norm.by_torch(input, normalized_shape, weight, eps)
    y, _ = rms_norm_fwd.call_planned(plan, *args)
    return y.view_as(input)   # view_as: ~0.9 µs, view(input.shape) ~2.5 (argument parsing)


def _fused_setup(ctx, inputs, output):
    _x, _residual, weight, _eps, offset = inputs
    ctx.offset = offset
    ctx.save_for_backward(output[1], weight, output[2])


def _fused_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy.contiguous(), h, weight, rstd, ctx.offset)
    if dh is not None:
        dx = dx + dh
    return dx, dx, (dw if weight is not None else None), None, None


@metalcore_op("fused_add_rms_norm_fwd")
def fused_add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float,
                           offset: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: ``h = x + residual`` (in x's dtype, as an unfused model computes it), then RMSNorm(h)."""
    h = x + residual
    y, rstd = rms_norm_fwd.reference(h, weight, eps, offset)
    return y, h, rstd


@fused_add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, offset):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=_acc(x)))


fused_add_rms_norm_fwd.register_autograd(_fused_backward, setup_context=_fused_setup)


def _fused_add_rms_norm_torch(input: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float = 1e-6,
                              *, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """:func:`fused_add_rms_norm` on the torch route: the sum, then torch's fused RMSNorm."""
    h = input + residual
    return torch.rms_norm(h, input.shape[-1:], weight, float(eps)), h


@fused_add_rms_norm_fwd.torch_route(_fused_add_rms_norm_torch)
def fused_add_rms_norm(input: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float = 1e-6,
                       *, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """The pre-norm transformer step: ``h = input + residual``; returns ``(rms_norm(h), h)``.

    ``h`` is the new residual stream. One pass over memory instead of two: the sum is normalised
    while it is still in registers. ``input`` and ``residual``: same shape ``(*, n)`` and dtype;
    ``weight``: ``(n,)``.
    """
    fn = "metalcore.fused_add_rms_norm"
    input = check_tensor(fn, "input", input, dtypes=FLOAT_DTYPES, min_dim=1)
    x2d, w = _flatten(fn, input, input.shape[-1:], weight)
    check_tensor(fn, "residual", residual, dtypes=(input.dtype,))
    check_same_device(fn, input=input, residual=residual)
    if residual.shape != input.shape:
        raise ValueError(f"{fn}: residual must have input's shape {tuple(input.shape)}; got {tuple(residual.shape)}")
    residual2d = residual if residual.dim() == 2 else residual.reshape(x2d.shape)
    args = (x2d, residual2d, w, float(eps), float(offset))
    plan = fused_add_rms_norm_fwd.plan(*args)
    if plan.prefers_torch and not offset and (weight is None or weight.dtype == input.dtype):
        return fused_add_rms_norm.by_torch(input, residual, weight, eps)
    y, h, _ = fused_add_rms_norm_fwd.call_planned(plan, *args)
    return y.view_as(input), h.view_as(input)


class MetalRMSNorm(nn.Module):
    """Drop-in for ``torch.nn.RMSNorm`` backed by metalcore's fused kernels.

    ``offset=1.0`` with a zero-initialised weight gives Gemma's ``(1 + w)`` norm.

    >>> norm = MetalRMSNorm(512, eps=1e-6)
    >>> y = norm(torch.randn(32, 128, 512))
    """

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, offset: float = 0.0):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset = float(offset)
        if elementwise_affine:
            init = torch.zeros if self.offset else torch.ones
            self.weight = nn.Parameter(init(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, offset=self.offset)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                + (f", offset={self.offset}" if self.offset else ""))
