"""SwiGLU ``silu(gate)·up`` in Triton, forward and backward.

Layers: ``_swiglu_{fwd,bwd}_kernel`` → ``swiglu_{fwd,bwd}_launch`` (plain tensors) → the registered
``triton`` implementations of the ops in :mod:`metalcore.nn.swiglu`.

Memory-bound: the forward reads gate and up and writes y (6 bytes an element in bf16); the backward
recomputes σ(gate) and reads dy, gate, up and writes dgate, dup (10 bytes). Math in fp32; inputs
fp32/bf16/fp16 (fp64 stays on the reference).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import cdiv, jit
from metalcore.nn.swiglu import swiglu_bwd, swiglu_fwd

# Elements per program (16 per thread at 8 warps), as for the activations.
BLOCK = 4096
NUM_WARPS = 8

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


def swiglu_fwd_launch(gate: Tensor, up: Tensor) -> Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def swiglu_bwd_launch(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, BLOCK),)](dy, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dgate, dup


def _ok(*tensors: Tensor) -> bool:
    return (tensors[0].dtype in _DTYPES and all(t.dtype == tensors[0].dtype for t in tensors)
            and all(t.shape == tensors[0].shape for t in tensors))


@swiglu_fwd.implement("triton", supports=lambda gate, up: _ok(gate, up))
def _swiglu_fwd_triton(gate, up):
    return swiglu_fwd_launch(gate, up)


@swiglu_bwd.implement("triton", supports=lambda dy, gate, up: _ok(gate, up, dy))
def _swiglu_bwd_triton(dy, gate, up):
    return swiglu_bwd_launch(dy, gate, up)
