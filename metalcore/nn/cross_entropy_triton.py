"""Cross-entropy's fused chunk kernel in Triton (the math and the chunk loop are in cross_entropy.py).

One program per token row, two passes over the row in ``BLOCK`` columns:

1. an online log-sum-exp (running maximum and rescaled sum of exponentials, one reduction per
   block), and the sum of the (soft-capped) logits when label smoothing needs it; then the target
   logit is read and the row's loss stored;
2. the gradient ``grad_scale · d loss / d logits`` written over the logits, in place.

A row is read twice and written once: at 128,256 columns that is 0.75 MB of traffic per bf16 row,
against the ``2·H·V`` FLOPs of the row's share of each GEMM around it, so the kernel is a few
percent of the fused loss's time. Ignored rows skip both passes and only zero their gradient.
``tanh`` is written with ``exp`` (``libdevice.tanh`` has no interpreter twin in Triton 3.6).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import helper, jit, next_power_of_2, warps_for
from metalcore.nn.cross_entropy import (
    cross_entropy_chunk_,
    fused_linear_cross_entropy_bwd,
    fused_linear_cross_entropy_fwd,
)

# Columns per block: 8192 fp32 values over 16 warps (16 a thread) keep a row's loop at 16 trips for
# a 128k vocabulary while the block stays in registers.
MAX_BLOCK = 8192

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@helper
def _softcap(x, cap):
    """``cap · tanh(x / cap)`` as ``cap · sign(u)·(1 − e^{−2|u|}) / (1 + e^{−2|u|})``: no overflow for any x."""
    u = x / cap
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(u < 0, -t, t)


@jit
def _cross_entropy_kernel(LOGITS, TARGET, SCALE, LOSS, n_cols, stride_row, scale_stride, ignore_index,
                          smoothing, z_loss, cap, BLOCK: tl.constexpr, HAS_CAP: tl.constexpr,
                          HAS_SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_row
    target = tl.load(TARGET + row)
    cols = tl.arange(0, BLOCK)
    if target == ignore_index:
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK):
                c = start + cols
                tl.store(base + c, tl.zeros([BLOCK], dtype=tl.float32).to(LOGITS.dtype.element_ty),
                         mask=c < n_cols)
        tl.store(LOSS + row, 0.0)
    else:
        m = float("-inf")
        s = 0.0
        z_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            z = tl.load(base + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                z = _softcap(z, cap)
            if HAS_SMOOTH:
                z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        # Memory-safe for out-of-range targets (their loss is undefined, as in torch's CUDA kernel).
        in_range = (target >= 0) & (target < n_cols)
        z_t = tl.load(base + target, mask=in_range, other=0.0).to(tl.float32)
        if HAS_CAP:
            z_t = _softcap(z_t, cap)
        loss = lse - (1.0 - smoothing) * z_t + z_loss * lse * lse
        if HAS_SMOOTH:
            loss -= smoothing / n_cols * z_sum
        tl.store(LOSS + row, loss)
        if WRITE_GRAD:
            scale = tl.load(SCALE + row * scale_stride).to(tl.float32)
            # softmax as exp(z − m) / s: exp(z − lse) would carry lse's rounding (its ulp, ~2e-6 at
            # lse ≈ 20) into every probability as a relative error.
            p_scale = (1.0 + 2.0 * z_loss * lse) / s
            for start in range(0, n_cols, BLOCK):
                c = start + cols
                mask = c < n_cols
                z = tl.load(base + c, mask=mask, other=0.0).to(tl.float32)
                if HAS_CAP:
                    z = _softcap(z, cap)
                g = tl.exp(z - m) * p_scale
                if HAS_SMOOTH:
                    g -= smoothing / n_cols
                g = tl.where(c == target, g - (1.0 - smoothing), g)
                if HAS_CAP:
                    g = g * (1.0 - (z / cap) * (z / cap))
                tl.store(base + c, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


def cross_entropy_chunk_launch(logits: Tensor, target: Tensor, grad_scale: Tensor, ignore_index: int,
                               label_smoothing: float, z_loss: float, softcap: Optional[float],
                               write_grad: bool) -> Tensor:
    """Per-row losses (float32) of contiguous ``logits`` (rows, V); the gradient overwrites ``logits``."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = min(MAX_BLOCK, next_power_of_2(vocab))
    scale = grad_scale.to(torch.float32)
    _cross_entropy_kernel[(rows,)](
        logits, target.contiguous(), scale, loss, vocab, logits.stride(0), scale.stride(0) if scale.dim() else 0,
        ignore_index, label_smoothing, z_loss, 1.0 if softcap is None else softcap, BLOCK=block,
        HAS_CAP=softcap is not None, HAS_SMOOTH=label_smoothing > 0, WRITE_GRAD=write_grad,
        num_warps=warps_for(block))
    return loss


def _supported(logits: Tensor, target: Tensor, grad_scale: Tensor, *_options) -> bool:
    return (logits.dtype in _DTYPES and logits.dim() == 2 and logits.stride(1) == 1
            and target.dtype == torch.int64 and grad_scale.dim() <= 1)


@cross_entropy_chunk_.implement("triton", supports=_supported)
def _cross_entropy_chunk_triton(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
                                write_grad):
    return cross_entropy_chunk_launch(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
                                      write_grad)


# The chunk loop is the same on every backend (torch's GEMMs around the chunk kernel, which dispatches
# by itself), so an explicit request for this backend runs it as it is.
fused_linear_cross_entropy_fwd.implement("triton")(fused_linear_cross_entropy_fwd.reference)
fused_linear_cross_entropy_bwd.implement("triton")(fused_linear_cross_entropy_bwd.reference)
