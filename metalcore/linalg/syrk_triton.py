r"""``alpha·A Aᵀ + beta·C`` in Triton, computing only the upper tiles (BLAS ``syrk``, batched).

Layers: ``_syrk_kernel`` → :func:`syrk_launch` → the ``triton`` implementation of
``metalcore::gram_poly`` (declared in :mod:`metalcore.linalg.syrk`), which launches it twice:
``G = syrk(X)``, then ``syrk(G, C=G, alpha=c, beta=b) = b·G + c·G Gᵀ``.

The output ``(m, m)`` is cut into ``T × T`` square tiles of ``BLOCK`` rows. One program per upper
tile pair ``(i, j)``, ``i ≤ j``, per batch element, all in one launch: ``T(T+1)/2 · batch``
programs. Each accumulates ``P = A[rows_i] · A[rows_j]ᵀ`` over ``k`` in ``BLOCK_K`` steps with
``tl.dot`` in fp32 and writes it twice: to tile ``(i, j)``, and transposed to tile ``(j, i)``, each
copy with its own ``beta·C`` tile added (so ``C`` need not be symmetric). On a diagonal tile the
direct copy keeps the upper triangle and the transposed one the strict lower, so the Gram part of
the result is exactly symmetric (no two programs write one element, and no program writes one
element twice).

Work: ``2·BLOCK²·k`` FLOP per tile pair, ``T(T+1)·BLOCK²·k`` in all against ``2m²k`` for a general
product: 0.52× at ``m = 4096`` (``T = 32``), 0.56× at ``m = 1024`` (``T = 8``). A program loads
``2·BLOCK·k`` elements for its ``2·BLOCK²·k`` FLOP (64 FLOP a byte at ``BLOCK = 128`` in bf16), so
it leans on L2: consecutive programs share a column tile ``j`` (hence ``A[rows_j]``), and a 4096²
bf16 operand (32 MB) fits the H100's 50 MB L2. Floors at ``m = k = 4096``, bf16: 70.9 GFLOP →
94 µs at cuBLAS's ~750 TFLOP/s; HBM 32 MB in + 32 MB out → 21 µs at 3 TB/s. FLOP-bound.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from metalcore._backend import triton_interpreting
from metalcore.linalg.syrk import gram_poly_op
from metalcore._triton import cdiv, jit, next_power_of_2

# 16-bit operands: 128×128 output tiles, 64-deep k steps, 8 warps, 3 stages — the Triton matmul
# tutorial's Hopper shape (two warpgroups over 128 rows for wgmma), square because a tile and its
# mirror cover the same rows and columns. Compiled offline for sm_90 with the runtime's divisibility
# hints: wgmma, 96 KB shared memory, no spills (118 registers a thread for A Aᵀ, 231 with the C
# tiles of the epilogue). Not yet swept on the H100.
BLOCK = 128
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 3
# fp32 operands take IEEE FMAs (no tensor cores) unless TF32 is allowed: 128×128 tiles then need 255
# registers and a stack frame; 64×64 at 8 warps need 100 (same offline build).
BLOCK_FP32 = 64
BLOCK_K_FP32 = 32
# tl.dot needs every dimension of a tile to be at least 16.
MIN_BLOCK = 16

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@jit
def _syrk_kernel(A, C, Out, m, k, pairs, alpha, beta,
                 s_ab, s_ar, s_ac, s_cb, s_cr, s_cc, s_ob, s_or, s_oc,
                 BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, HAS_C: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid ``(pairs · batch,)``; ``Out`` is ``(batch, m, m)``. ``DOT_FP32``: feed the dots fp32
    copies of 16-bit operands (exact), for the interpreter."""
    pid = tl.program_id(0)
    b = (pid // pairs).to(tl.int64)
    p = pid % pairs
    # Upper tile pairs column by column: p = j(j+1)/2 + i, 0 ≤ i ≤ j. tl.sqrt is the approximate
    # square root (a few ulps), which can land j one off where 8p + 1 is near a perfect square; the
    # two integer corrections put it back.
    j = ((tl.sqrt(8.0 * p.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > p, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= p, j + 1, j)
    i = p - j * (j + 1) // 2

    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = A + b * s_ab + rows[:, None] * s_ar + kk[None, :] * s_ac      # A[rows_i, k-step]
    bt_ptrs = A + b * s_ab + cols[None, :] * s_ar + kk[:, None] * s_ac     # A[rows_j, k-step]ᵀ
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        in_k = k0 + kk < k
        a = tl.load(a_ptrs, mask=(rows[:, None] < m) & in_k[None, :], other=0.0)
        bt = tl.load(bt_ptrs, mask=(cols[None, :] < m) & in_k[:, None], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * s_ac
        bt_ptrs += BLOCK_K * s_ac
    acc = acc * alpha

    # Tile (i, j) where row ≤ col: off the diagonal that is the whole tile.
    r = rows[:, None]
    c = cols[None, :]
    upper = (c < m) & (r <= c)
    top = acc
    if HAS_C:
        top += beta * tl.load(C + b * s_cb + r * s_cr + c * s_cc, mask=upper, other=0.0).to(tl.float32)
    tl.store(Out + b * s_ob + r * s_or + c * s_oc, top.to(Out.dtype.element_ty), mask=upper)
    # Its mirror, tile (j, i) where row > col: Out[c, r] = P[r, c] (+ beta·C[c, r]).
    rt = cols[:, None]
    ct = rows[None, :]
    lower = (rt < m) & (rt > ct)
    bottom = tl.trans(acc)
    if HAS_C:
        bottom += beta * tl.load(C + b * s_cb + rt * s_cr + ct * s_cc, mask=lower, other=0.0).to(tl.float32)
    tl.store(Out + b * s_ob + rt * s_or + ct * s_oc, bottom.to(Out.dtype.element_ty), mask=lower)


def syrk_launch(A: Tensor, C: Tensor | None, alpha: float, beta: float) -> Tensor:
    """``alpha·A Aᵀ + beta·C`` for ``A`` ``(batch, m, k)`` (any strides), ``C`` ``(batch, m, m)`` or
    ``None``; bf16/fp16/fp32. Returns ``(batch, m, m)`` contiguous in ``A``'s dtype."""
    batch, m, k = A.shape
    interpreting = triton_interpreting()
    # Triton 3.6's interpreter gets bf16 wrong twice: tl.dot multiplies bf16 operands as raw 16-bit
    # integers (their fp32 copies are exact; metalcore/nn/attention_triton.py found the same), and
    # an fp32 → bf16 cast truncates where the compiled cvt.rn rounds to nearest even. There the
    # kernel gets fp32 copies and writes fp32, and torch rounds the result.
    interpreted_bf16 = interpreting and A.dtype == torch.bfloat16
    out = torch.empty(batch, m, m, dtype=torch.float32 if interpreted_bf16 else A.dtype, device=A.device)
    if out.numel() == 0:
        return out.to(A.dtype)
    has_c = C is not None and beta != 0.0  # torch.baddbmm's rule: beta = 0 ignores C, NaN included
    fp32 = A.dtype == torch.float32
    block = min(BLOCK_FP32 if fp32 else BLOCK, max(MIN_BLOCK, next_power_of_2(m)))
    block_k = min(BLOCK_K_FP32 if fp32 else BLOCK_K, max(MIN_BLOCK, next_power_of_2(k)))
    # fp32 follows torch's switch for cuBLAS (off by default): IEEE products unless TF32 is allowed.
    precision = "tf32" if fp32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting else "ieee"
    tiles = cdiv(m, block)
    pairs = tiles * (tiles + 1) // 2
    cs = C.stride() if has_c else (0, 0, 0)
    _syrk_kernel[(pairs * batch,)](
        A, C if has_c else A, out, m, k, pairs, float(alpha), float(beta),
        *A.stride(), *cs, *out.stride(),
        BLOCK=block, BLOCK_K=block_k, HAS_C=has_c, PRECISION=precision, DOT_FP32=interpreted_bf16,
        num_warps=NUM_WARPS if block >= 64 else 4, num_stages=NUM_STAGES)
    return out.to(A.dtype)


def _supports(X: Tensor, b: float, c: float) -> bool:
    # Offsets inside one matrix are 32-bit (batch offsets are 64-bit).
    return X.dtype in _DTYPES and X.dim() == 3 and X.shape[1] * max(X.shape[1], X.shape[2]) < 2**31


# automatic=False until timed on a GPU: the interpreter checks the algorithm only, and whether half
# the FLOPs beats cuBLAS's full product (~750 TFLOP/s bf16 on the H100) depends on this kernel
# reaching ≥ 55% of that, which only bench/scripts/muon_check.py on the H100 can tell.
@gram_poly_op.implement("triton", supports=_supports, automatic=False)
def _gram_poly_triton(X, b, c):
    G = syrk_launch(X, None, 1.0, 0.0)
    return syrk_launch(G, G, c, b)  # G is symmetric (exactly: see above), so G² = G Gᵀ
