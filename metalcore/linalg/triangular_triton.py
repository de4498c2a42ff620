"""Triangular solve (``trsm``) in Triton: one program per matrix and block of right-hand sides.

Layers: ``_trsm_kernel`` → :func:`solve_triangular_launch` → the ``triton`` implementation of
``metalcore::solve_triangular`` (declared in :mod:`metalcore.linalg.triangular`).

The kernel solves ``M X = B`` from the left with ``M`` lower (forward substitution) or upper
(backward substitution), column by column: ``x_j = b_j / M[j, j]``, then ``b_i -= M[i, j] x_j`` for
the rows below (above) ``j``. A right-sided solve ``X A = B`` is the left solve ``Aᵀ Xᵀ = Bᵀ``; the
launcher passes transposed strides, so no operand is copied and ``Aᵀ`` swaps lower for upper. Only
the triangle that is read is loaded (strictly, when the diagonal is implicit), so the other may
hold anything.

Grid: ``(batch / G, k / BK)``: right-hand sides are split into ``BK``-column blocks, each program
reloading its (small) ``A``. Work per program: ``n`` steps over a ``[G, BN, BK]`` tile, i.e.
``n² k`` multiply-adds for ``n² k`` in the algorithm; bytes: ``A`` (``4 n²/2``) plus ``B`` and ``X``
(``8 n k``) in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from metalcore.linalg._small_triton import MAX_N, batched, block, fits, group, warps
from metalcore.linalg.triangular import solve_triangular_op
from metalcore.nn._jit_triton import jit

# Right-hand-side columns per program: 64 columns of a 128-row system is an 8192-element tile.
MAX_BK = 64


@jit
def _trsm_kernel(A, B, X, batch, n, k, s_ab, s_ar, s_ac, s_bb, s_br, s_bc, s_xb, s_xr, s_xc,
                 G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 LOWER: tl.constexpr, UNIT: tl.constexpr):
    g = tl.program_id(0) * G + tl.arange(0, G)
    r = tl.arange(0, BN)
    q = tl.program_id(1) * BK + tl.arange(0, BK)
    g3 = g[:, None, None].to(tl.int64)
    r3 = r[None, :, None]
    c3 = r[None, None, :]
    q3 = q[None, None, :]
    live = g3 < batch
    if LOWER:
        tri = (r3 > c3) if UNIT else (r3 >= c3)
    else:
        tri = (r3 < c3) if UNIT else (r3 <= c3)
    a = tl.load(A + g3 * s_ab + r3 * s_ar + c3 * s_ac, mask=live & (r3 < n) & (c3 < n) & tri, other=0.0)
    in_b = live & (r3 < n) & (q3 < k)
    b = tl.load(B + g3 * s_bb + r3 * s_br + q3 * s_bc, mask=in_b, other=0.0)

    for t in range(n):
        j = t if LOWER else n - 1 - t
        col = tl.sum(tl.where(c3 == j, a, 0.0), axis=2)                    # [G, BN]: M[:, j]
        x = tl.sum(tl.where(r3 == j, b, 0.0), axis=1)                      # [G, BK]: b_j
        if not UNIT:
            piv = tl.sum(tl.where(r[None, :] == j, col, 0.0), axis=1)
            x = x / tl.where(g < batch, piv, 1.0)[:, None]  # padding matrices: no 0/0
        below = (r3 > j) if LOWER else (r3 < j)
        b = tl.where(r3 == j, x[:, None, :], tl.where(below, b - col[:, :, None] * x[:, None, :], b))

    tl.store(X + g3 * s_xb + r3 * s_xr + q3 * s_xc, b, mask=in_b)


def solve_triangular_launch(A: Tensor, B: Tensor, upper: bool, left: bool, unitriangular: bool) -> Tensor:
    """``X`` with ``A X = B`` (``X A = B`` when not ``left``); ``A`` ``(*, n, n)``, ``B`` ``(*, n, k)``
    (``(*, k, n)``) with the same batch shape, float32/float64, ``n ≤ MAX_N``; ``X`` contiguous."""
    X = torch.empty(B.shape, dtype=B.dtype, device=B.device)
    A3, B3, X3 = batched(A), batched(B), X.view(-1, *B.shape[-2:])
    n = A.shape[-1]
    nb = A3.shape[0]
    if nb == 0 or B.numel() == 0:
        return X
    sa, sb, sx = list(A3.stride()), list(B3.stride()), list(X3.stride())
    lower = not upper
    if not left:
        # X A = B  ⇔  Aᵀ Xᵀ = Bᵀ: transpose every operand through its strides; Aᵀ flips the triangle.
        for s in (sa, sb, sx):
            s[1], s[2] = s[2], s[1]
        lower = not lower
    k = B.shape[-1] if left else B.shape[-2]
    BN = block(n)
    BK = min(block(k), MAX_BK)
    G = group(nb, BN * max(BN, BK), A.device)
    grid = (triton.cdiv(nb, G), triton.cdiv(k, BK))
    _trsm_kernel[grid](A3, B3, X3, nb, n, k, *sa, *sb, *sx,
                       G=G, BN=BN, BK=BK, LOWER=lower, UNIT=unitriangular,
                       num_warps=warps(G * BN * max(BN, BK)))
    return X


# Not chosen automatically: 0.17-0.58x torch.linalg.solve_triangular on the H100
# (bench/linalg_triton.md v1) until tuned.
@solve_triangular_op.implement("triton", supports=lambda A, B, upper, left, unitriangular:
                               fits(A) and B.dtype == A.dtype, automatic=False)
def _solve_triangular_triton(A, B, upper, left, unitriangular):
    return solve_triangular_launch(A, B, upper, left, unitriangular)
