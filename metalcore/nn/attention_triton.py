"""Flash attention in Triton: ``sdpa_fwd`` and ``sdpa_bwd``.

Layers: ``_sdpa_fwd_kernel`` / ``_sdpa_bwd_dkdv_kernel`` + ``_sdpa_bwd_dq_kernel`` →
``sdpa_fwd_launch`` / ``sdpa_bwd_launch`` (plain tensors) → the registered ``triton``
implementations in :mod:`metalcore.nn.attention`.

**Forward.** One program per ``BLOCK_M`` query rows of one ``(batch, head)``: it streams key/value
blocks of ``BLOCK_N`` rows through an online softmax (running max ``m``, running sum ``l``, in base
2: ``exp2((z − m)·log2 e)``), so the ``L × S`` scores are never stored, and writes ``out`` and
``lse = ln Σ exp(z)`` (natural log, float32) for the backward. Grouped-query attention indexes key/
value head ``h // (H / Hkv)``; ``is_causal`` (top-left aligned, key ``j`` for query ``i`` iff
``j ≤ i``) stops each program's loop at its last attended key block. Key blocks that every row of
the program attends run without masks; only the blocks crossing ``S`` or the diagonal are masked.

**Backward** (formulas in :mod:`metalcore.nn.attention`), two kernels and no atomics, so the
result is deterministic: ``δ = rowsum(dO ∘ O)`` first (one torch reduction); then one program per
``BLOCK_N`` keys of a key/value head accumulates ``dK`` and ``dV`` over every query block of every
query head in its group (GQA sums there, in registers); one program per ``BLOCK_M`` queries
accumulates ``dQ`` over the key blocks. Both recompute ``P = exp2(z·log2 e − lse·log2 e)`` from the
saved ``lse``. Rows past ``L`` or keys past ``S`` need no masks in the backward: their ``q``/``dO``
or ``k``/``v`` load as zeros, so every term they add is zero or lands in a row that is not stored
(the ``dQ`` kernel still drops keys past ``S``, in case ``exp2(−lse)`` overflowed).

**attn_mask**: 4-D, each dimension 1 or full, bool (True = attend) or float (added to the scores),
read through strides (0 on broadcast dimensions), one tile per score tile. With a mask a row may
attend nothing: the forward then keeps ``m = −inf`` safe (exponents taken against 0) and writes
``out = 0``, ``lse = −inf``, and the backward turns ``lse = −inf`` into ``P = 0`` — torch's "safe
softmax" contract. A finite float mask is clamped at ``−3·10³⁸`` after the ``log2 e`` scaling, so
that ``finfo.min`` padding masks (Hugging Face's) stay finite as in torch and do not become ``−inf``:
a query row whose every key is masked that way gets torch's output (the plain average of ``V``), but
its ``lse`` (about ``−2·10³⁸``) has no digits left for ``ln l``, so its gradients are not those of
that average (torch's fp32 ``lse`` has the same limit). Rows with at least one key not masked so —
every real token's row — are exact.

Scope (``supports=``): q/k/v bf16/fp16 in one dtype, head dims ``E`` and ``Ev`` of 64 or 128; fp32
and fp64 and other head dims run on the reference. Dots take 16-bit operands and accumulate in
fp32; ``P`` and ``dS`` are rounded to the inputs' dtype before their dots, as in flash attention.
Inputs are addressed through their strides; outputs are contiguous (the ops' fakes say so).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from metalcore._backend import triton_interpreting
from metalcore._triton import cdiv, helper, jit
from metalcore.nn.attention import sdpa_bwd, sdpa_fwd

# Forward: 128 query rows (two warpgroups of 64 rows for Hopper's wgmma) against 64-key blocks,
# 3 stages: the Triton tutorial's Hopper forward shape. Compiled offline for sm_90 with the
# runtime's divisibility hints: wgmma, no spills, 115-120 registers a thread at E = 64 (64 KB
# shared memory), 180-229 at E = 128 (128 KB).
BLOCK_M = 128
BLOCK_N = 64
assert BLOCK_M % BLOCK_N == 0, "the causal loop's unmasked part ends on a BLOCK_M boundary"
NUM_WARPS = 8
NUM_STAGES = 3
# Forward operands through Hopper's tensor memory accelerator (host-built descriptors) when their
# strides allow. Default off; FWD_BY_HEAD_DIM overrides (TMA, BLOCK_N) per head dim where the H100
# sweep found better (bench/training_triton.md v4): at E = 128, TMA with 128-key blocks ran 467
# TFLOP/s against 421 (non-causal) and 373 against 355 (causal); at E = 64 neither helped.
FWD_TMA = False
FWD_BY_HEAD_DIM = {128: (True, 128)}
# Backward: the dK/dV program holds BWD_KV keys (two fp32 accumulators of BWD_KV × E) and streams
# BWD_Q queries at a time; the dQ program the other way round. Causal loops split at the diagonal
# on these blocks, so each must divide the other's partner (asserted below).
BWD_KV = 128
BWD_Q = 32
BWD_DQ_Q = 128
BWD_DQ_KV = 32
# Per head dim, as FWD_BY_HEAD_DIM: 64-key blocks in the dQ kernel at E = 128 (H100, fwd+bwd 319 vs
# 298 TFLOP/s non-causal, 243 vs 235 causal; at E = 64 causal they lost 4%).
BWD_DQ_KV_BY_HEAD_DIM = {128: 64}
assert BWD_KV % BWD_Q == 0 and BWD_DQ_Q % BWD_DQ_KV == 0
BWD_WARPS = 8
BWD_STAGES = 3  # 2 → 3: 244 → 297 TFLOP/s fwd+bwd at (4, 32, 2048, 128) on the H100, no spills

HEAD_DIMS = (64, 128)
# fp32 stays on the reference: IEEE fp32 dots have no tensor-core path, and compiled offline for
# sm_90 they spill 1-10 KB a thread at every tile shape tried (16×32 to 128×128), where the
# reference's cuBLAS fp32 matmuls do not.
_DTYPES = (torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634


@helper
def _masked_scores(z, M, q_idx, k_idx, seq_q, seq_k, stride_ml, stride_ms, MASK_BOOL: tl.constexpr):
    """``z`` (base-2 scores) with the user's mask tile applied; ``q_idx``/``k_idx`` broadcast to
    ``z``'s shape (either orientation)."""
    inside = (q_idx < seq_q) & (k_idx < seq_k)
    ptrs = M + q_idx.to(tl.int64) * stride_ml + k_idx.to(tl.int64) * stride_ms
    if MASK_BOOL:
        keep = tl.load(ptrs, mask=inside, other=0) != 0
        return tl.where(keep, z, float("-inf"))
    add = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    return z + tl.where(add == float("-inf"), add, tl.maximum(add * 1.4426950408889634, -3.0e38))


@helper
def _attend(acc, l_i, m_i, q, k_base, v_base, m_base, b, kv_h, rows, start, seq_q, seq_k, scale_log2, stride_ks,
            stride_ke, stride_vs, stride_ve, stride_ml, stride_ms, BLOCK_N: tl.constexpr, E: tl.constexpr,
            EV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
            MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, TMA: tl.constexpr):
    """One key/value block ``start … start + BLOCK_N − 1`` into the online softmax. ``MASKED``: the
    block crosses ``seq_k`` or (``CAUSAL``) the diagonal; interior blocks skip those masks (the
    user's ``attn_mask``, when there is one, applies to every block). ``TMA``: ``k_base``/``v_base``
    are tensor descriptors of the whole ``(B, Hkv, S, ·)`` tensors (rows past ``S`` load as zeros)."""
    cols = start + tl.arange(0, BLOCK_N)
    if MASKED:
        col_mask = cols < seq_k
    if TMA:
        k = tl.trans(k_base.load([b, kv_h, start, 0]).reshape(BLOCK_N, E))
    else:
        k_ptrs = k_base + cols.to(tl.int64)[None, :] * stride_ks + tl.arange(0, E)[:, None] * stride_ke
        if MASKED:
            k = tl.load(k_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
    if DOT_FP32:
        k = k.to(tl.float32)
    z = tl.dot(q, k, input_precision=PRECISION) * scale_log2
    if HAS_MASK:
        z = _masked_scores(z, m_base, rows[:, None], cols[None, :], seq_q, seq_k, stride_ml, stride_ms, MASK_BOOL)
    if MASKED:
        keep = col_mask[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        z = tl.where(keep, z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    if HAS_MASK:
        # A row may have attended nothing so far (m = −inf): exponents against 0 keep p = 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new  # key 0 is in the first block and every row attends it: m is finite
    p = tl.exp2(z - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if TMA:
        v = v_base.load([b, kv_h, start, 0]).reshape(BLOCK_N, EV)
    else:
        v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vs + tl.arange(0, EV)[None, :] * stride_ve
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
def _sdpa_fwd_kernel(Q, K, V, M, O, LSE, n_heads, group, seq_q, seq_k, scale_log2,
                     stride_qb, stride_qh, stride_ql, stride_qe,
                     stride_kb, stride_kh, stride_ks, stride_ke,
                     stride_vb, stride_vh, stride_vs, stride_ve,
                     stride_mb, stride_mh, stride_ml, stride_ms,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E: tl.constexpr, EV: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                     PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, TMA: tl.constexpr):
    """Grid ``(cdiv(L, BLOCK_M), B·H)``. ``O`` is contiguous ``(B, H, L, EV)``, ``LSE`` ``(B, H, L)``.
    ``DOT_FP32``: feed the dots fp32 copies of the (bf16-exact) operands, for the interpreter.
    ``TMA``: ``Q``, ``K``, ``V``, ``O`` are tensor descriptors (Hopper's bulk tensor copies: no
    per-thread address arithmetic, no masks on loads) instead of pointers."""
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kv_h = h // group
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_q
    offs_ev = tl.arange(0, EV)

    if TMA:
        q = Q.load([b, h, m_block * BLOCK_M, 0]).reshape(BLOCK_M, E)
        k_base = K
        v_base = V
    else:
        q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh \
            + rows.to(tl.int64)[:, None] * stride_ql + tl.arange(0, E)[None, :] * stride_qe
        q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)
        k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    if DOT_FP32:
        q = q.to(tl.float32)
    m_base = M + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh

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
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, m_base, b, kv_h, rows, start, seq_q, seq_k,
                                scale_log2, stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms, BLOCK_N,
                                E, EV, False, CAUSAL, HAS_MASK, MASK_BOOL, PRECISION, DOT_FP32, TMA)
    for start in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, m_base, b, kv_h, rows, start, seq_q, seq_k,
                                scale_log2, stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms, BLOCK_N,
                                E, EV, True, CAUSAL, HAS_MASK, MASK_BOOL, PRECISION, DOT_FP32, TMA)

    if HAS_MASK:
        out = tl.where(l_i[:, None] > 0.0, acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None], 0.0)
    else:
        out = acc / l_i[:, None]
    o_rows = bh.to(tl.int64) * seq_q + rows.to(tl.int64)
    if TMA:  # rows past L are clipped by the copy
        O.store([b, h, m_block * BLOCK_M, 0], out.to(O.dtype).reshape(1, 1, BLOCK_M, EV))
    else:
        tl.store(O + o_rows[:, None] * EV + offs_ev[None, :], out.to(O.dtype.element_ty), mask=row_mask[:, None])
    # l = 0 (nothing attended) gives log2(0) = −inf: lse = −inf, as the contract says.
    tl.store(LSE + o_rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_mask)


@helper
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, m_base, q_start, keys, seq_q, seq_k,
                scale_log2, stride_ql, stride_qe, stride_dl, stride_ml, stride_ms,
                BLOCK_Q: tl.constexpr, E: tl.constexpr, EV: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Queries ``q_start … + BLOCK_Q − 1`` into this program's ``dK``/``dV`` (tiles transposed:
    keys down, queries across)."""
    qs = q_start + tl.arange(0, BLOCK_Q)
    q_in = qs < seq_q
    q = tl.load(q_base + qs.to(tl.int64)[:, None] * stride_ql + tl.arange(0, E)[None, :] * stride_qe,
                mask=q_in[:, None], other=0.0)
    do = tl.load(do_base + qs.to(tl.int64)[:, None] * stride_dl + tl.arange(0, EV)[None, :],
                 mask=q_in[:, None], other=0.0)
    lse = tl.load(lse_base + qs, mask=q_in, other=0.0)
    delta = tl.load(delta_base + qs, mask=q_in, other=0.0)
    # lse = −inf (a row that attends nothing): +inf makes its P exactly 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    zT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2          # [keys, queries]
    if HAS_MASK:
        zT = _masked_scores(zT, m_base, qs[None, :], keys[:, None], seq_q, seq_k, stride_ml, stride_ms, MASK_BOOL)
    pT = tl.exp2(zT - lse2[None, :])
    if CAUSAL_MASK:
        pT = tl.where(qs[None, :] >= keys[:, None], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@jit
def _sdpa_bwd_dkdv_kernel(Q, K, V, M, DO, LSE, DELTA, DK, DV, n_heads, group, seq_q, seq_k, scale_log2, scale,
                          stride_qb, stride_qh, stride_ql, stride_qe,
                          stride_kb, stride_kh, stride_ks, stride_ke,
                          stride_vb, stride_vh, stride_vs, stride_ve,
                          stride_mb, stride_mh, stride_ml, stride_ms,
                          BLOCK_KV: tl.constexpr, BLOCK_Q: tl.constexpr, E: tl.constexpr, EV: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                          PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid ``(cdiv(S, BLOCK_KV), B·Hkv)``. ``DO`` is contiguous ``(B, H, L, EV)``; ``LSE``/``DELTA``
    ``(B, H, L)``; ``DK``/``DV`` contiguous ``(B, Hkv, S, ·)``."""
    kv_block = tl.program_id(0)
    bkv = tl.program_id(1)
    n_kv = n_heads // group
    b = (bkv // n_kv).to(tl.int64)
    kv_h = (bkv % n_kv).to(tl.int64)
    keys = kv_block * BLOCK_KV + tl.arange(0, BLOCK_KV)
    k_in = keys < seq_k
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + keys.to(tl.int64)[:, None] * stride_ks
                + tl.arange(0, E)[None, :] * stride_ke, mask=k_in[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + keys.to(tl.int64)[:, None] * stride_vs
                + tl.arange(0, EV)[None, :] * stride_ve, mask=k_in[:, None], other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_KV, E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_KV, EV], dtype=tl.float32)
    # Causal: queries before this block's first key attend none of it; the BLOCK_KV queries from
    # that key on cross the diagonal (masked); later ones attend every key here (unmasked).
    if CAUSAL:
        q_lo = kv_block * BLOCK_KV
        q_mid = tl.minimum(q_lo + BLOCK_KV, seq_q)
    else:
        q_lo = 0
        q_mid = 0
    for gi in range(group):
        h = (kv_h * group + gi).to(tl.int64)
        bh = b * n_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + bh * seq_q * EV
        m_base = M + b * stride_mb + h * stride_mh
        for q_start in range(q_lo, q_mid, BLOCK_Q):
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, LSE + bh * seq_q, DELTA + bh * seq_q, m_base,
                                 q_start, keys, seq_q, seq_k, scale_log2, stride_ql, stride_qe, EV,
                                 stride_ml, stride_ms, BLOCK_Q, E, EV, True, HAS_MASK, MASK_BOOL, PRECISION, DOT_FP32)
        for q_start in range(q_mid, seq_q, BLOCK_Q):
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, LSE + bh * seq_q, DELTA + bh * seq_q, m_base,
                                 q_start, keys, seq_q, seq_k, scale_log2, stride_ql, stride_qe, EV,
                                 stride_ml, stride_ms, BLOCK_Q, E, EV, False, HAS_MASK, MASK_BOOL, PRECISION, DOT_FP32)
    out_rows = bkv.to(tl.int64) * seq_k + keys.to(tl.int64)
    tl.store(DK + out_rows[:, None] * E + tl.arange(0, E)[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=k_in[:, None])
    tl.store(DV + out_rows[:, None] * EV + tl.arange(0, EV)[None, :], dv.to(DV.dtype.element_ty), mask=k_in[:, None])


@helper
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, m_base, rows, start, seq_q, seq_k, scale_log2,
              stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
              BLOCK_KV: tl.constexpr, E: tl.constexpr, EV: tl.constexpr, CAUSAL_MASK: tl.constexpr,
              HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Keys ``start … + BLOCK_KV − 1`` into this program's ``dQ``."""
    cols = start + tl.arange(0, BLOCK_KV)
    c_in = cols < seq_k
    kT = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_ks + tl.arange(0, E)[:, None] * stride_ke,
                 mask=c_in[None, :], other=0.0)
    vT = tl.load(v_base + cols.to(tl.int64)[None, :] * stride_vs + tl.arange(0, EV)[:, None] * stride_ve,
                 mask=c_in[None, :], other=0.0)
    if DOT_FP32:
        kT = kT.to(tl.float32)
        vT = vT.to(tl.float32)
    z = tl.dot(q, kT, input_precision=PRECISION) * scale_log2
    if HAS_MASK:
        z = _masked_scores(z, m_base, rows[:, None], cols[None, :], seq_q, seq_k, stride_ml, stride_ms, MASK_BOOL)
    # Keys past S (zero rows of K) would still give p = exp2(−lse); ×0 below unless p overflowed, so
    # drop them here, where it costs one select.
    p = tl.where(c_in[None, :], tl.exp2(z - lse2[:, None]), 0.0)
    if CAUSAL_MASK:
        p = tl.where(cols[None, :] <= rows[:, None], p, 0.0)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    return dq


@jit
def _sdpa_bwd_dq_kernel(Q, K, V, M, DO, LSE, DELTA, DQ, n_heads, group, seq_q, seq_k, scale_log2, scale,
                        stride_qb, stride_qh, stride_ql, stride_qe,
                        stride_kb, stride_kh, stride_ks, stride_ke,
                        stride_vb, stride_vh, stride_vs, stride_ve,
                        stride_mb, stride_mh, stride_ml, stride_ms,
                        BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, E: tl.constexpr, EV: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid ``(cdiv(L, BLOCK_Q), B·H)``; ``DQ`` contiguous ``(B, H, L, E)``."""
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    kv_h = h // group
    rows = m_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    r_in = rows < seq_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_ql
                + tl.arange(0, E)[None, :] * stride_qe, mask=r_in[:, None], other=0.0)
    row_off = bh.to(tl.int64) * seq_q + rows.to(tl.int64)
    do = tl.load(DO + row_off[:, None] * EV + tl.arange(0, EV)[None, :], mask=r_in[:, None], other=0.0)
    lse = tl.load(LSE + row_off, mask=r_in, other=0.0)
    delta = tl.load(DELTA + row_off, mask=r_in, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    m_base = M + b * stride_mb + h * stride_mh
    dq = tl.zeros([BLOCK_Q, E], dtype=tl.float32)
    # Causal: keys before this block's first query are attended by every row (unmasked); the
    # BLOCK_Q keys from there cross the diagonal (masked); later keys are attended by none.
    if CAUSAL:
        mid = tl.minimum(m_block * BLOCK_Q, seq_k)
        hi = tl.minimum((m_block + 1) * BLOCK_Q, seq_k)
    else:
        mid = seq_k
        hi = seq_k
    for start in range(0, mid, BLOCK_KV):
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, m_base, rows, start, seq_q, seq_k, scale_log2,
                       stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
                       BLOCK_KV, E, EV, False, HAS_MASK, MASK_BOOL, PRECISION, DOT_FP32)
    for start in range(mid, hi, BLOCK_KV):
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, m_base, rows, start, seq_q, seq_k, scale_log2,
                       stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
                       BLOCK_KV, E, EV, True, HAS_MASK, MASK_BOOL, PRECISION, DOT_FP32)
    tl.store(DQ + row_off[:, None] * E + tl.arange(0, E)[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=r_in[:, None])


def _mask_args(attn_mask: Optional[Tensor], like: Tensor) -> tuple[Tensor, list[int], bool, bool]:
    """Pointer, strides (0 on broadcast dimensions) and flags for an optional 4-D mask."""
    if attn_mask is None:
        return like, [0, 0, 0, 0], False, False
    strides = [0 if size == 1 else stride for size, stride in zip(attn_mask.shape, attn_mask.stride())]
    return attn_mask, strides, True, attn_mask.dtype == torch.bool


def _dot_mode(q: Tensor) -> tuple[bool, str]:
    # Triton 3.6's interpreter multiplies bf16 operands of tl.dot as raw 16-bit integers (errors of
    # ~1e9 seen here); their fp32 copies are exact and give the same products.
    dot_fp32 = q.dtype == torch.bfloat16 and triton_interpreting()
    return dot_fp32, "ieee" if dot_fp32 else "tf32"  # "tf32" is the default and unused for 16-bit operands


def _tma_ready(t: Tensor) -> bool:
    """A tensor descriptor needs a 16-byte-aligned base and 16-byte multiples for every stride
    but the last, which must be 1."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(stride * size % 16 == 0 for stride in t.stride()[:-1]))


def _descriptor(t: Tensor, rows: int) -> TensorDescriptor:
    """Descriptor of a ``(B, H, L, E)`` tensor read or written ``rows × E`` at a time."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


def sdpa_fwd_launch(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                    scale: float) -> tuple[Tensor, Tensor]:
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
    mask, mask_strides, has_mask, mask_bool = _mask_args(attn_mask, q)
    dot_fp32, precision = _dot_mode(q)
    tma, block_n = FWD_BY_HEAD_DIM.get(E if E == Ev else None, (FWD_TMA, BLOCK_N))
    tma = tma and all(_tma_ready(t) for t in (q, k, v))
    if tma:
        operands = (_descriptor(q, BLOCK_M), _descriptor(k, block_n), _descriptor(v, block_n))
        target = _descriptor(out, BLOCK_M)
    else:
        operands, target = (q, k, v), out
    _sdpa_fwd_kernel[(cdiv(L, BLOCK_M), B * H)](
        *operands, mask, target, lse, H, H // Hkv, L, S, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, E=E, EV=Ev, CAUSAL=is_causal, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
        PRECISION=precision, DOT_FP32=dot_fp32, TMA=tma, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out, lse


def sdpa_bwd_launch(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    attn_mask: Optional[Tensor], is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)``, contiguous, in the inputs' dtypes; shapes as :func:`sdpa_fwd_launch`."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty(B, H, L, E, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, S, E, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, Hkv, S, Ev, dtype=v.dtype, device=v.device)
    if B * H * L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)    # rowsum(dO ∘ O) = rowsum(P ∘ dP), (B, H, L)
    mask, mask_strides, has_mask, mask_bool = _mask_args(attn_mask, q)
    dot_fp32, precision = _dot_mode(q)
    common = dict(E=E, EV=Ev, CAUSAL=is_causal, HAS_MASK=has_mask, MASK_BOOL=mask_bool, PRECISION=precision,
                  DOT_FP32=dot_fp32, num_warps=BWD_WARPS, num_stages=BWD_STAGES)
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides)
    _sdpa_bwd_dkdv_kernel[(cdiv(S, BWD_KV), B * Hkv)](
        q, k, v, mask, dout, lse, delta, dk, dv, H, H // Hkv, L, S, scale * _LOG2E, scale, *strides,
        BLOCK_KV=BWD_KV, BLOCK_Q=BWD_Q, **common)
    _sdpa_bwd_dq_kernel[(cdiv(L, BWD_DQ_Q), B * H)](
        q, k, v, mask, dout, lse, delta, dq, H, H // Hkv, L, S, scale * _LOG2E, scale, *strides,
        BLOCK_Q=BWD_DQ_Q, BLOCK_KV=BWD_DQ_KV_BY_HEAD_DIM.get(E if E == Ev else None, BWD_DQ_KV), **common)
    return dq, dk, dv


def _supports(q: Tensor, k: Tensor, v: Tensor, *_) -> bool:
    """Dtypes and head dims the kernels take (any mask and causality are served)."""
    return (q.dtype in _DTYPES and k.dtype == v.dtype == q.dtype
            and q.dim() == k.dim() == v.dim() == 4 and q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS
            and k.shape[-1] == q.shape[-1] and k.shape[:3] == v.shape[:3] and k.shape[0] == q.shape[0]
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0)


# Not chosen automatically: correct on the H100 (tests/nn/test_attention.py, gpu-marked) but
# slower than torch's flash SDPA there: forward 0.64-0.86x, forward+backward 0.46-0.55x
# (bench/training_triton.md v3).
@sdpa_fwd.implement("triton", supports=_supports, automatic=False)
def _sdpa_fwd_triton(q, k, v, attn_mask, is_causal, scale):
    return sdpa_fwd_launch(q, k, v, attn_mask, is_causal, scale)


@sdpa_bwd.implement("triton", supports=lambda dout, q, k, v, out, lse, attn_mask, is_causal, scale:
                    _supports(q, k, v), automatic=False)
def _sdpa_bwd_triton(dout, q, k, v, out, lse, attn_mask, is_causal, scale):
    return sdpa_bwd_launch(dout, q, k, v, out, lse, attn_mask, is_causal, scale)
