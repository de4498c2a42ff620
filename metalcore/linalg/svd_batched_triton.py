"""One-sided Jacobi SVD of many small matrices held in registers.

Layers: ``_register_svd_kernel`` → :func:`jacobi_registers` (a drop-in for ``svd_triton._jacobi``:
``S`` and ``W = A V`` sorted, and ``V``), used by ``svd_triton.svd_launch(..., registers=True)``.

The scratch kernel of ``svd_triton`` keeps each matrix's columns in global memory with a block
barrier per round; this one keeps ``G`` matrices per program as a ``[G, BN, BM]`` register tile
(row ``j`` = column ``j`` of ``A``) and rotates every pair of a round at once: the partner column
``a_π(j)`` comes from ``tl.gather`` along the column axis (``_jacobi_triton.round_partner``),
``α_j = ‖a_j‖²``, ``γ_j = a_jᵀ a_π(j)`` are row reductions (identical for both members of a pair:
the same products summed in the same order), ``β = α_π(j)`` a gather, and
``a_j ← c a_j + σ_j s a_π(j)`` (``σ = −1`` on the pair's smaller index) for ``A`` and ``Vᵀ``.
Thresholds (``|γ| > m·ε·‖a_p‖‖a_q‖``), scaling, in-band NaN and the descending sort are those of
``svd_triton._jacobi_svd_kernel``.

No global scratch and no explicit barrier, and launched without FMA contraction
(``_jacobi_triton.FP_FUSION``): ``α``, ``β``, ``γ`` are butterfly reductions, and with contraction the
lanes sharing a row got values one bit apart, so the rotation decision and the loop's exit could
differ between lanes — the scratch kernel's hang on the H100 at n ≤ 8.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from metalcore.linalg import _jacobi_triton as jac
from metalcore.linalg._jacobi_triton import descending_rank, one_sided_sweeps, row_norms, scaled
from metalcore.linalg._small_triton import block, group, warps
from metalcore._triton import jit


@jit
def _register_svd_kernel(A, W, S, V, SW, nb, m, n, s_ab, s_ar, s_ac, tol, tiny, max_sweeps,
                         G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WANT_V: tl.constexpr,
                         WANT_SWEEPS: tl.constexpr, IEEE32: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    live = g < nb
    rj = tl.arange(0, BN)
    ri = tl.arange(0, BM)
    g3 = g[:, None, None]
    j3 = rj[None, :, None]                      # column of A (tile row)
    i3 = ri[None, None, :]                      # row of A (tile column)
    l3 = rj[None, None, :]                      # column index of Vᵀ's rows
    j2 = rj[None, :]
    inside = live[:, None, None] & (j3 < n) & (i3 < m)
    a = tl.load(A + g3 * s_ab + i3 * s_ar + j3 * s_ac, mask=inside, other=0.0)
    a, scale, bad_input = scaled(a)
    vt = tl.where((j3 == l3) & (g3 >= 0), 1.0, 0.0).to(a.dtype)      # row j = column j of V
    # Entries are at most 1 after scaling, so α, β ≤ m: no overflow.
    a, vt, sweep, rotated = one_sided_sweeps(a, vt, n, live, tol, tiny, max_sweeps, WANT_V, IEEE32)

    sv = row_norms(a)                                                                      # ‖a_j‖
    # Non-convergence is known per program, not per matrix: a per-matrix count carried out of the loop
    # crashed Triton's TritonGPURemoveLayoutConversions pass on sm_90 (H100 run 2026-12-06). So a matrix
    # that misses the sweep bound turns the G − 1 others of its program NaN too (NaN input stays
    # per matrix: bad_input is known before the loop).
    bad = (rotated > 0) | bad_input | (tl.max((sv != sv).to(tl.int32), axis=1) > 0)
    # NaN-free keys: ranks stay a permutation.
    rank = descending_rank(tl.where((j2 < n) & (sv == sv), sv, -1.0), rj)                 # [G, BN]
    tl.store(S + g[:, None] * n + rank, tl.where(bad[:, None], float("nan"), sv * scale[:, None]),
             mask=live[:, None] & (j2 < n))
    if WANT_V:
        # Row j of the tiles goes to column rank[j] of W = A V and of V.
        tl.store(W + g3 * m * n + i3 * n + rank[:, :, None], tl.where(bad[:, None, None], float("nan"), a),
                 mask=inside)
        tl.store(V + g3 * n * n + l3 * n + rank[:, :, None], tl.where(bad[:, None, None], float("nan"), vt),
                 mask=live[:, None, None] & (j3 < n) & (l3 < n))
    if WANT_SWEEPS:
        tl.store(SW + g, sweep + tl.zeros([G], dtype=tl.int32), mask=live)


# A (m×n) and Vᵀ (n×n) in registers: 32×32 twice is 2048 values, 16 a thread at 4 warps.
REGISTER_MAX_N = 32


def jacobi_registers(X: Tensor, compute_uv: bool, *, matrices_per_program: int | None = None,
                     num_warps: int | None = None, sweeps: Tensor | None = None):
    """One-sided Jacobi on the columns of ``X`` ``(*, m, n)``, ``n ≤ m ≤ REGISTER_MAX_N``: ``S``
    sorted descending and, with ``compute_uv``, ``W = X V`` (scaled by ``1/max|x|``) and ``V`` in
    the same order — the outputs of ``svd_triton._jacobi``."""
    m, n = X.shape[-2:]
    dev, dt = X.device, X.dtype
    S, W, V, X3 = jac.svd_outputs(X, compute_uv)
    nb = X3.shape[0]
    if nb and n:
        finfo = torch.finfo(dt)
        BM, BN = block(m), block(n)
        elements = BN * BM + (BN * BN if compute_uv else 0)
        G = matrices_per_program or group(nb, elements, dev)
        _register_svd_kernel[(-(-nb // G),)](
            X3, W, S, V, S if sweeps is None else sweeps, nb, m, n,
            X3.stride(0), X3.stride(1), X3.stride(2), m * finfo.eps, finfo.tiny / finfo.eps, jac.MAX_SWEEPS,
            G=G, BM=BM, BN=BN, WANT_V=compute_uv, WANT_SWEEPS=sweeps is not None,
            IEEE32=dt == torch.float32, num_warps=num_warps or warps(G * elements), enable_fp_fusion=jac.FP_FUSION)
    return S, W, V
