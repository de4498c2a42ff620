"""RoPE in Triton: forward and backward, q and k together in one launch each.

Layers: ``_rope_kernel`` (one kernel, ``BACKWARD`` a constexpr) → ``rope_launch`` (plain tensors)
→ the registered ``triton`` implementations of ``rope_fwd``/``rope_bwd`` in :mod:`metalcore.nn.rope`.

Hugging Face's half-split convention, with ``x₁ = x[:D/2]``, ``x₂ = x[D/2:]`` and the same split of
``cos`` (``c₁``, ``c₂``) and ``sin`` (``s₁``, ``s₂``):

* forward ``x·cos + rotate_half(x)·sin``:  ``o₁ = x₁c₁ − x₂s₁``,  ``o₂ = x₂c₂ + x₁s₂``;
* backward (the adjoint) ``dy·cos − rotate_half(dy·sin)``:  ``dx₁ = dy₁c₁ + dy₂s₂``,
  ``dx₂ = dy₂c₂ − dy₁s₁``

— both exact for any ``cos``/``sin``, not only for Hugging Face's equal halves.

Each program takes ``BLOCK_S`` consecutive ``(batch, position)`` pairs (one for Llama-sized heads,
32 × 128): it loads their ``cos``/``sin`` rows once and rotates every head of ``q`` and then of
``k`` (head counts may differ: GQA), ``BLOCK_H`` heads at a time. So the launch reads ``q``, ``k``,
``cos`` and ``sin`` once and writes ``q_out``, ``k_out`` once: the byte floor. bf16 (4, 32, 2048, 128)
with Hk = 32: 2·(2·64 MiB) for q, k and their outputs plus 2·2 MiB for a ``(4, S, D)`` cos/sin =
260 MiB (272.6 MB) a pass, 90 us at 3030 GB/s (see bench/training_triton.md).

Every tensor is addressed through its strides (the ``(B, S, H, D)`` layout arrives as a transposed
view; outputs have the inputs' memory layout, from ``empty_like``), so nothing is copied; a unit
stride on ``D`` is specialised by Triton, giving 16-byte vector loads along a head (``ld.global.v4``
in an offline sm_90 build, 64 registers a thread). Math in
fp32; inputs fp32/bf16/fp16 (fp64 stays on the reference).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import cdiv, helper, jit, next_power_of_2
from metalcore.nn.rope import rope_bwd, rope_fwd

# Elements of one half (D/2) of a [BLOCK_S, BLOCK_H, BLOCK_HALF] tile: two 2048-element halves,
# 16 values a thread each at 4 warps (Liger's rule, metalcore/_triton.py:warps_for).
TILE_HALF_ELEMENTS = 2048
NUM_WARPS = 4
# Widest head dimension held in registers: one head's half (2048 fp32 values) per tile.
MAX_HEAD_DIM = 2 * TILE_HALF_ELEMENTS

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@helper
def _rope_heads(X, O, x_pos, o_pos, pos_mask, stride_xh, stride_xd, stride_oh, stride_od, n_heads, half,
                c1, c2, s1, s2, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    """Rotate heads ``0 … n_heads−1`` at a block of positions. ``x_pos``/``o_pos``: the positions'
    int64 offsets, ``[BLOCK_S, 1, 1]``; ``c1 … s2``: their cos/sin halves, ``[BLOCK_S, 1, BLOCK_HALF]``."""
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    # int64, so that a head-dim stride above 2^31 / D (a permuted view) cannot overflow.
    cols = tl.arange(0, BLOCK_HALF)[None, None, :].to(tl.int64)
    for h0 in range(0, n_heads, BLOCK_H):
        h = (h0 + heads).to(tl.int64)
        mask = pos_mask & (h < n_heads) & (cols < half)
        x_row = x_pos + h * stride_xh
        o_row = o_pos + h * stride_oh
        x1 = tl.load(X + x_row + cols * stride_xd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_row + (cols + half) * stride_xd, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(O + o_row + cols * stride_od, o1.to(O.dtype.element_ty), mask=mask)
        tl.store(O + o_row + (cols + half) * stride_od, o2.to(O.dtype.element_ty), mask=mask)


@jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, n_pos, seq_len, half, n_q_heads, n_k_heads,
                 stride_qb, stride_qh, stride_qs, stride_qd,
                 stride_kb, stride_kh, stride_ks, stride_kd,
                 stride_qob, stride_qoh, stride_qos, stride_qod,
                 stride_kob, stride_koh, stride_kos, stride_kod,
                 stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,
                 BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BACKWARD: tl.constexpr):
    """Program ``p`` takes the flat positions ``p·BLOCK_S …`` of the ``B·S`` (batch, position)
    pairs; ``stride_cb``/``stride_sb`` are 0 for a shared (1, S, D) cos/sin."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None, None]
    pos_mask = pos < n_pos
    b = pos // seq_len
    s = pos % seq_len
    cols = tl.arange(0, BLOCK_HALF)[None, None, :].to(tl.int64)
    cs_mask = pos_mask & (cols < half)
    c_row = COS + b * stride_cb + s * stride_cs
    s_row = SIN + b * stride_sb + s * stride_ss
    c1 = tl.load(c_row + cols * stride_cd, mask=cs_mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (cols + half) * stride_cd, mask=cs_mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + cols * stride_sd, mask=cs_mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + (cols + half) * stride_sd, mask=cs_mask, other=0.0).to(tl.float32)
    _rope_heads(Q, QO, b * stride_qb + s * stride_qs, b * stride_qob + s * stride_qos, pos_mask,
                stride_qh, stride_qd, stride_qoh, stride_qod, n_q_heads, half, c1, c2, s1, s2,
                BLOCK_H, BLOCK_HALF, BACKWARD)
    _rope_heads(K, KO, b * stride_kb + s * stride_ks, b * stride_kob + s * stride_kos, pos_mask,
                stride_kh, stride_kd, stride_koh, stride_kod, n_k_heads, half, c1, c2, s1, s2,
                BLOCK_H, BLOCK_HALF, BACKWARD)


def rope_launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, backward: bool) -> tuple[Tensor, Tensor]:
    """``q`` (B, Hq, S, D), ``k`` (B, Hk, S, D), ``cos``/``sin`` (B or 1, S, D), any strides.

    Returns ``(q_out, k_out)`` shaped and laid out like ``q``/``k`` with dtype
    ``promote_types(x.dtype, cos.dtype)``: the forward rotation, or its adjoint when ``backward``.
    """
    q_out = torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype))
    k_out = torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype))
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    if B * S == 0 or D == 0 or Hq + Hk == 0:
        return q_out, k_out
    half = D // 2
    # Tile [BLOCK_S, BLOCK_H, BLOCK_HALF] of about TILE_HALF_ELEMENTS: all heads of one position
    # for Llama-sized heads (32 heads × 64 half-dims), several positions a program for few or
    # narrow heads.
    block_half = next_power_of_2(half)
    block_h = min(max(1, TILE_HALF_ELEMENTS // block_half), next_power_of_2(max(Hq, Hk)))
    block_s = min(max(1, TILE_HALF_ELEMENTS // (block_half * block_h)), next_power_of_2(S))
    # A (1, S, D) cos/sin is shared by every batch entry: stride 0 over the batch.
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    _rope_kernel[(cdiv(B * S, block_s),)](
        q, k, q_out, k_out, cos, sin, B * S, S, half, Hq, Hk,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        cb, cos.stride(1), cos.stride(2), sb, sin.stride(1), sin.stride(2),
        BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=NUM_WARPS)
    return q_out, k_out


def _supports(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """The Hugging Face shapes in fp32/bf16/fp16 with an even head dim up to MAX_HEAD_DIM; anything
    else (fp64, odd D, shapes that only broadcast) runs on the reference."""
    if not all(t.dtype in _DTYPES for t in (q, k, cos, sin)) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return False
    B, _, S, D = q.shape
    return (k.shape[0] == B and tuple(k.shape[2:]) == (S, D) and D % 2 == 0 and D <= MAX_HEAD_DIM
            and sin.shape == cos.shape and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (S, D))


# Chosen automatically on CUDA: correct at full size on the H100 (tests/triton/test_rope.py, gpu-marked)
# and, for q (4, 32, 2048, 128) with k (4, 8, ·) in bf16, forward 61 µs (116% of the 32 MiB copy
# rate; 9.0x HF's eager rotate_half, 2.9x Liger) and forward+backward 124 µs (8.9x HF, 2.9x Liger).
@rope_fwd.implement("triton", supports=_supports)
def _rope_fwd_triton(q, k, cos, sin):
    return rope_launch(q, k, cos, sin, backward=False)


@rope_bwd.implement("triton", supports=_supports)
def _rope_bwd_triton(dq_out, dk_out, cos, sin):
    return rope_launch(dq_out, dk_out, cos, sin, backward=True)
