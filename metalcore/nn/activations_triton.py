"""GELU (exact and tanh) and SiLU in Triton: one forward and one backward kernel for all three.

Layers: ``_activation_{fwd,bwd}_kernel`` → ``activation_{fwd,bwd}_launch`` (plain tensors) → the
registered ``triton`` implementations of the ops in :mod:`metalcore.nn.activations`.

Elementwise and memory-bound: the forward reads ``x`` and writes ``y`` (4 bytes an element in
bf16), the backward reads ``dy`` and ``x`` and writes ``dx`` (6 bytes), so the floor is a copy of
the same bytes. The function is a ``tl.constexpr`` (``ACT``), so each variant compiles to straight-
line code with no branch. Math in fp32; ``x`` fp32/bf16/fp16 (fp64 stays on the reference).

tanh-GELU is written through the logistic function, which is exact algebra, not an approximation:
``½(1 + tanh(z)) = σ(2z)``, so ``y = x·σ(2z)`` and ``½x(1 − tanh²z) = 2x·σ(2z)(1 − σ(2z))``. This
avoids the cancellation of ``1 + tanh(z)`` for very negative ``x`` and needs no ``tanh`` intrinsic.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import cdiv, jit
from metalcore.nn.activations import gelu_bwd, gelu_fwd, silu_bwd, silu_fwd

# ACT codes (constexpr): which function the kernels compute.
GELU_EXACT = 0
GELU_TANH = 1
SILU = 2
_GELU = {"none": GELU_EXACT, "tanh": GELU_TANH}

# Elements per program; 16 per thread at 8 warps (two 16-byte loads of bf16 per input).
BLOCK = 4096
NUM_WARPS = 8

_INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_TANH_CUBIC = tl.constexpr(0.044715)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@jit
def _activation_fwd_kernel(X, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))
    elif ACT == 1:
        y = x * tl.sigmoid(2.0 * _SQRT_2_OVER_PI * (x + _TANH_CUBIC * x * x * x))
    else:
        y = x * tl.sigmoid(x)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@jit
def _activation_bwd_kernel(DY, X, DX, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        grad = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2)) + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    elif ACT == 1:
        x2 = x * x
        s = tl.sigmoid(2.0 * _SQRT_2_OVER_PI * x * (1.0 + _TANH_CUBIC * x2))
        grad = s + 2.0 * x * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * x2)
    else:
        s = tl.sigmoid(x)
        grad = s * (1.0 + x * (1.0 - s))
    tl.store(DX + offs, (dy * grad).to(DX.dtype.element_ty), mask=mask)


def activation_fwd_launch(x: Tensor, act: int) -> Tensor:
    """``act(x)``: contiguous, ``x``'s shape and dtype."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _activation_fwd_kernel[(cdiv(n, BLOCK),)](x, y, n, ACT=act, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def activation_bwd_launch(dy: Tensor, x: Tensor, act: int) -> Tensor:
    """``dy · act'(x)``: contiguous, ``x``'s shape and dtype."""
    x, dy = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        _activation_bwd_kernel[(cdiv(n, BLOCK),)](dy, x, dx, n, ACT=act, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx


def _ok(x: Tensor, approximate: str = "none") -> bool:
    return x.dtype in _DTYPES and approximate in _GELU


@gelu_fwd.implement("triton", supports=lambda x, approximate: _ok(x, approximate))
def _gelu_fwd_triton(x, approximate):
    return activation_fwd_launch(x, _GELU[approximate])


@gelu_bwd.implement("triton", supports=lambda dy, x, approximate: _ok(x, approximate) and dy.shape == x.shape)
def _gelu_bwd_triton(dy, x, approximate):
    return activation_bwd_launch(dy, x, _GELU[approximate])


@silu_fwd.implement("triton", supports=lambda x: _ok(x))
def _silu_fwd_triton(x):
    return activation_fwd_launch(x, SILU)


@silu_bwd.implement("triton", supports=lambda dy, x: _ok(x) and dy.shape == x.shape)
def _silu_bwd_triton(dy, x):
    return activation_bwd_launch(dy, x, SILU)
