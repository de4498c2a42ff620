"""Flash-attention forward in Triton for ``sdpa_fwd`` (the backward stays on the reference for now).

Layers: ``_sdpa_fwd_kernel`` → ``sdpa_fwd_launch`` (plain tensors) → the registered ``triton``
implementation of ``sdpa_fwd`` in :mod:`metalcore.nn.attention`.

One program per ``BLOCK_M`` query rows of one ``(batch, head)``: it streams key/value blocks of
``BLOCK_N`` rows through an online softmax (running max ``m``, running sum ``l``, in base 2:
``exp2((z − m)·log2 e)``), so the ``L × S`` scores are never stored, and writes ``out`` and
``lse = ln Σ exp(z)`` (natural log, float32) for the backward. Grouped-query attention indexes key/
value head ``h // (H / Hkv)``; ``is_causal`` (top-left aligned, key ``j`` for query ``i`` iff
``j ≤ i``) stops each program's loop at its last attended key block. Key blocks that every row of
the program attends run without masks; only the blocks crossing ``S`` or the diagonal are masked.

Scope (``supports=``): q/k/v bf16/fp16 in one dtype, head dims ``E`` and ``Ev`` of 64 or 128, no
``attn_mask``; anything else (fp32 and fp64, masks, other head dims) runs on the reference. Dots take
16-bit operands and accumulate in fp32; ``P`` is rounded to the inputs' dtype before ``P·V``, as in
flash attention. Inputs are addressed through their strides; ``out`` is contiguous (the op's fake
says so).
"""

from __future__ import annotations

import math

import torch
import triton.language as tl
from torch import Tensor

from metalcore._backend import triton_interpreting
from metalcore.nn._jit_triton import cdiv, helper, jit
from metalcore.nn.attention import sdpa_fwd

# 128 query rows (two warpgroups of 64 rows for Hopper's wgmma) against 64-key blocks, 3 stages:
# the Triton tutorial's Hopper forward shape. Not timed (no GPU this session); compiled offline for
# sm_90 with the runtime's divisibility hints: wgmma, no spills, 115-120 registers a thread at
# E = 64 (64 KB shared memory), 180-229 at E = 128 (128 KB).
BLOCK_M = 128
BLOCK_N = 64
assert BLOCK_M % BLOCK_N == 0, "the causal loop's unmasked part ends on a BLOCK_M boundary"
NUM_WARPS = 8
NUM_STAGES = 3

HEAD_DIMS = (64, 128)
# fp32 stays on the reference: IEEE fp32 dots have no tensor-core path, and compiled offline for
# sm_90 they spill 1-10 KB a thread at every tile shape tried (16×32 to 128×128), where the
# reference's cuBLAS fp32 matmuls do not.
_DTYPES = (torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634


@helper
def _attend(acc, l_i, m_i, q, k_base, v_base, rows, start, seq_k, scale_log2, stride_ks, stride_ke,
            stride_vs, stride_ve, BLOCK_N: tl.constexpr, E: tl.constexpr, EV: tl.constexpr,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """One key/value block ``start … start + BLOCK_N − 1`` into the online softmax. ``MASKED``: the
    block crosses ``seq_k`` or (``CAUSAL``) the diagonal; interior blocks skip every mask."""
    cols = start + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + cols.to(tl.int64)[None, :] * stride_ks + tl.arange(0, E)[:, None] * stride_ke
    v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vs + tl.arange(0, EV)[None, :] * stride_ve
    if MASKED:
        col_mask = cols < seq_k
        k = tl.load(k_ptrs, mask=col_mask[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if DOT_FP32:
        k = k.to(tl.float32)
    z = tl.dot(q, k, input_precision=PRECISION) * scale_log2
    if MASKED:
        keep = col_mask[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        z = tl.where(keep, z, float("-inf"))
    # Key 0 is in the first block and every row attends it, so m_new is finite from there on.
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    p = tl.exp2(z - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptrs, mask=col_mask[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    # P is rounded to the inputs' dtype for the second dot, as in flash attention.
    p = p.to(v.dtype)
    if DOT_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return acc, l_i, m_new


@jit
def _sdpa_fwd_kernel(Q, K, V, O, LSE, n_heads, group, seq_q, seq_k, scale_log2,
                     stride_qb, stride_qh, stride_ql, stride_qe,
                     stride_kb, stride_kh, stride_ks, stride_ke,
                     stride_vb, stride_vh, stride_vs, stride_ve,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E: tl.constexpr, EV: tl.constexpr,
                     CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid ``(cdiv(L, BLOCK_M), B·H)``. ``O`` is contiguous ``(B, H, L, EV)``, ``LSE`` ``(B, H, L)``.
    ``DOT_FP32``: feed the dots fp32 copies of the (bf16-exact) operands, for the interpreter."""
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kv_h = (h // group).to(tl.int64)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_q
    offs_ev = tl.arange(0, EV)

    q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + rows.to(tl.int64)[:, None] * stride_ql \
        + tl.arange(0, E)[None, :] * stride_qe
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, EV], dtype=tl.float32)
    # Keys [0, lo) come in whole blocks that every row of this block attends: no masks. Keys
    # [lo, hi) cross seq_k or (causal, top-left aligned) the diagonal: masked.
    full_blocks_end = (seq_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        lo = tl.minimum(m_block * BLOCK_M, full_blocks_end)  # BLOCK_M is a multiple of BLOCK_N
        hi = tl.minimum(seq_k, (m_block + 1) * BLOCK_M)
    else:
        lo = full_blocks_end
        hi = seq_k
    for start in range(0, lo, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, rows, start, seq_k, scale_log2,
                                stride_ks, stride_ke, stride_vs, stride_ve, BLOCK_N, E, EV,
                                False, CAUSAL, PRECISION, DOT_FP32)
    for start in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, rows, start, seq_k, scale_log2,
                                stride_ks, stride_ke, stride_vs, stride_ve, BLOCK_N, E, EV,
                                True, CAUSAL, PRECISION, DOT_FP32)

    out = acc / l_i[:, None]
    o_rows = bh.to(tl.int64) * seq_q + rows.to(tl.int64)
    tl.store(O + o_rows[:, None] * EV + offs_ev[None, :], out.to(O.dtype.element_ty), mask=row_mask[:, None])
    tl.store(LSE + o_rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_mask)


def sdpa_fwd_launch(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """``q`` (B, H, L, E), ``k`` (B, Hkv, S, E), ``v`` (B, Hkv, S, Ev), any strides; ``Hkv`` divides
    ``H``. Returns ``out`` (B, H, L, Ev) contiguous in q's dtype and ``lse`` (B, H, L) float32."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, L, Ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    if S == 0:  # nothing to attend: torch's safe softmax gives 0, and lse is −inf
        return out.zero_(), lse.fill_(-math.inf)
    # Triton 3.6's interpreter multiplies bf16 operands of tl.dot as raw 16-bit integers (errors of
    # ~1e9 seen here); their fp32 copies are exact and give the same products.
    dot_fp32 = q.dtype == torch.bfloat16 and triton_interpreting()
    precision = "ieee" if dot_fp32 else "tf32"  # "tf32" is the default and unused for 16-bit operands
    _sdpa_fwd_kernel[(cdiv(L, BLOCK_M), B * H)](
        q, k, v, out, lse, H, H // Hkv, L, S, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, E=E, EV=Ev, CAUSAL=is_causal, PRECISION=precision, DOT_FP32=dot_fp32,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out, lse


def _supports(q: Tensor, k: Tensor, v: Tensor, attn_mask, is_causal: bool, scale: float) -> bool:
    return (attn_mask is None and q.dtype in _DTYPES and k.dtype == v.dtype == q.dtype
            and q.dim() == k.dim() == v.dim() == 4 and q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS
            and k.shape[-1] == q.shape[-1] and k.shape[:3] == v.shape[:3] and k.shape[0] == q.shape[0]
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0)


# automatic=False until the kernel has run on a GPU: the interpreter checks the algorithm, but it
# computes the dots in fp32 (its bf16 tl.dot is wrong in Triton 3.6), so the compiled bf16/fp16
# tensor-core path is unverified.
@sdpa_fwd.implement("triton", supports=_supports, automatic=False)
def _sdpa_fwd_triton(q, k, v, attn_mask, is_causal, scale):
    return sdpa_fwd_launch(q, k, v, is_causal, scale)
