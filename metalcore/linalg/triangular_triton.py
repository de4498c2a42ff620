"""Triangular solve (``trsm``) and ``cholesky_solve`` in Triton: one program per matrix and block of
right-hand sides.

Layers: ``_trsm_kernel`` → :func:`solve_triangular_launch` / :func:`cholesky_solve_launch` → the
``triton`` implementations of ``metalcore::solve_triangular`` (:mod:`metalcore.linalg.triangular`)
and ``metalcore::cholesky_solve`` (:mod:`metalcore.linalg.cholesky_solve`).

The kernel solves ``M X = B`` from the left with ``M`` lower (forward substitution) or upper
(backward substitution), column by column: ``x_j = b_j / M[j, j]``, then ``b_i -= M[i, j] x_j`` for
the rows below (above) ``j``. A right-sided solve ``X A = B`` is the left solve ``Aᵀ Xᵀ = Bᵀ``; the
launcher passes transposed strides, so no operand is copied and ``Aᵀ`` swaps lower for upper. Only
the triangle that is read is loaded (strictly, when the diagonal is implicit), so the other may
hold anything. ``cholesky_solve`` runs the same substitution twice in one program (``L`` then
``Lᵀ``, the second pass reading the same triangle through swapped strides), so ``Y = L⁻¹ B`` never
leaves registers.

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
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from metalcore.linalg.triangular import solve_triangular_op
from metalcore.nn._jit_triton import helper, jit

# Right-hand-side columns per program: 64 columns of a 128-row system is an 8192-element tile.
MAX_BK = 64


@helper
def _substitute(b, a_base, s_r, s_c, live, r3, c3, n,
                LOWER: tl.constexpr, UNIT: tl.constexpr, A_REGS: tl.constexpr):
    """``b`` (``[G, BN, BK]``) overwritten by ``M⁻¹ b``, ``M`` the lower (upper) triangle of the matrices
    at ``a_base`` (``[G]`` pointers) with row/column strides ``s_r``/``s_c``; only that triangle
    (strictly, when ``UNIT``) is read.

    ``A_REGS``: ``M`` is held as a ``[G, BN, BN]`` register tile and column ``j`` read out of it by a
    masked reduction each step; otherwise column ``j`` is loaded from memory (an L1/L2 hit after the
    first program), one step ahead so that the load's latency overlaps the step before it, and the
    program holds only ``b``: a step costs ``O(BN·BK)`` instead of ``O(BN² + BN·BK)`` and one
    reduction instead of three. Which is faster depends on the card (the sweep decides)."""
    live3 = live[:, None, None]
    base3 = a_base[:, None, None]
    if A_REGS:
        if LOWER:
            tri = (r3 > c3) if UNIT else (r3 >= c3)
        else:
            tri = (r3 < c3) if UNIT else (r3 <= c3)
        a = tl.load(base3 + r3 * s_r + c3 * s_c, mask=live3 & (r3 < n) & (c3 < n) & tri, other=0.0)
        for t in range(n):
            j = t if LOWER else n - 1 - t
            below = (r3 > j) if LOWER else (r3 < j)   # rows still to be updated by x_j
            x = tl.sum(tl.where(r3 == j, b, 0.0), axis=1)                       # [G, BK]: b_j
            col = tl.sum(tl.where(c3 == j, a, 0.0), axis=2)[:, :, None]         # [G, BN, 1]: M[:, j]
            if not UNIT:
                piv = tl.sum(tl.where(r3 == j, col, 0.0), axis=1)               # [G, 1]
                x = x / tl.where(live[:, None], piv, 1.0)   # padding matrices: no 0/0
            b = tl.where(r3 == j, x[:, None, :], tl.where(below, b - col * x[:, None, :], b))
    else:
        j = 0 if LOWER else n - 1
        below = (r3 > j) if LOWER else (r3 < j)
        col = tl.load(base3 + r3 * s_r + j * s_c, mask=live3 & below & (r3 < n), other=0.0)
        piv = tl.load(a_base + j * (s_r + s_c), mask=live, other=1.0)
        for t in range(n):
            j = t if LOWER else n - 1 - t
            below = (r3 > j) if LOWER else (r3 < j)
            # Next step's column and pivot (masked off past the last step).
            j_next = j + 1 if LOWER else j - 1
            below_next = (r3 > j_next) if LOWER else (r3 < j_next)
            col_next = tl.load(base3 + r3 * s_r + j_next * s_c, mask=live3 & below_next & (r3 < n), other=0.0)
            piv_next = tl.load(a_base + j_next * (s_r + s_c), mask=live & (t + 1 < n), other=1.0)
            x = tl.sum(tl.where(r3 == j, b, 0.0), axis=1)                       # [G, BK]: b_j
            if not UNIT:
                x = x / piv[:, None]
            b = tl.where(r3 == j, x[:, None, :], tl.where(below, b - col * x[:, None, :], b))
            col = col_next
            piv = piv_next
    return b


@jit
def _trsm_kernel(A, B, X, batch, n, k, s_ab, s_ar, s_ac, s_bb, s_br, s_bc, s_xb, s_xr, s_xc,
                 G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, LOWER: tl.constexpr,
                 UNIT: tl.constexpr, CHOL: tl.constexpr, A_REGS: tl.constexpr):
    g = tl.program_id(0) * G + tl.arange(0, G)
    r = tl.arange(0, BN)
    q = tl.program_id(1) * BK + tl.arange(0, BK)
    r3 = r[None, :, None]
    c3 = r[None, None, :]
    q3 = q[None, None, :]
    live = g < batch
    g64 = g.to(tl.int64)
    in_b = live[:, None, None] & (r3 < n) & (q3 < k)
    b = tl.load(B + g64[:, None, None] * s_bb + r3 * s_br + q3 * s_bc, mask=in_b, other=0.0)
    a_base = A + g64 * s_ab
    b = _substitute(b, a_base, s_ar, s_ac, live, r3, c3, n, LOWER, UNIT, A_REGS)
    if CHOL:
        # cholesky_solve: the first pass solved with the lower factor; the second solves with its
        # transpose (same memory, swapped strides), an upper non-unit triangle.
        b = _substitute(b, a_base, s_ac, s_ar, live, r3, c3, n, False, False, A_REGS)
    tl.store(X + g64[:, None, None] * s_xb + r3 * s_xr + q3 * s_xc, b, mask=in_b)


def _launch(A3: Tensor, B3: Tensor, X3: Tensor, k: int, sa: list, sb: list, sx: list, lower: bool,
            unit: bool, chol: bool, num_warps: int | None, group_size: int | None, block_k: int | None,
            a_in_registers: bool) -> None:
    n = A3.shape[-1]
    nb = A3.shape[0]
    BN = block(n)
    BK = block_k or min(block(k), MAX_BK)
    # Register tile per matrix: A and the block of B, or the block of B alone.
    elements = BN * (max(BN, BK) if a_in_registers else BK)
    G = group_size or group(nb, elements, A3.device)
    grid = (triton.cdiv(nb, G), triton.cdiv(k, BK))
    _trsm_kernel[grid](A3, B3, X3, nb, n, k, *sa, *sb, *sx,
                       G=G, BN=BN, BK=BK, LOWER=lower, UNIT=unit, CHOL=chol, A_REGS=a_in_registers,
                       num_warps=num_warps or warps(G * elements))


def solve_triangular_launch(A: Tensor, B: Tensor, upper: bool, left: bool, unitriangular: bool, *,
                            num_warps: int | None = None, group_size: int | None = None,
                            block_k: int | None = None, a_in_registers: bool = True) -> Tensor:
    """``X`` with ``A X = B`` (``X A = B`` when not ``left``); ``A`` ``(*, n, n)``, ``B`` ``(*, n, k)``
    (``(*, k, n)``) with the same batch shape, float32/float64, ``n ≤ MAX_N``; ``X`` contiguous.

    The keywords override the launch shape (for sweeps): warps per program, matrices per program
    (a power of two), right-hand-side columns per program (a power of two), and whether ``A`` is
    held in registers or its columns are re-read from memory each step."""
    X = torch.empty(B.shape, dtype=B.dtype, device=B.device)
    A3, B3, X3 = batched(A), batched(B), X.view(-1, *B.shape[-2:])
    if A3.shape[0] == 0 or B.numel() == 0:
        return X
    sa, sb, sx = list(A3.stride()), list(B3.stride()), list(X3.stride())
    lower = not upper
    if not left:
        # X A = B  ⇔  Aᵀ Xᵀ = Bᵀ: transpose every operand through its strides; Aᵀ flips the triangle.
        for s in (sa, sb, sx):
            s[1], s[2] = s[2], s[1]
        lower = not lower
    k = B.shape[-1] if left else B.shape[-2]
    _launch(A3, B3, X3, k, sa, sb, sx, lower, unitriangular, False,
            num_warps, group_size, block_k, a_in_registers)
    return X


def cholesky_solve_launch(B: Tensor, L: Tensor, upper: bool, *, num_warps: int | None = None,
                          group_size: int | None = None, block_k: int | None = None,
                          a_in_registers: bool = True) -> Tensor:
    """``X`` with ``L Lᵀ X = B`` (``Uᵀ U X = B`` when ``upper``); ``L`` ``(*, n, n)``, ``B``
    ``(*, n, k)`` with the same batch shape, float32/float64, ``n ≤ MAX_N``; ``X`` contiguous.
    Keywords as in :func:`solve_triangular_launch`."""
    X = torch.empty(B.shape, dtype=B.dtype, device=B.device)
    L3, B3, X3 = batched(L), batched(B), X.view(-1, *B.shape[-2:])
    if L3.shape[0] == 0 or B.numel() == 0:
        return X
    sa = list(L3.stride())
    if upper:
        sa[1], sa[2] = sa[2], sa[1]   # the first pass solves with Uᵀ, a lower triangle
    _launch(L3, B3, X3, B.shape[-1], sa, list(B3.stride()), list(X3.stride()), True, False, True,
            num_warps, group_size, block_k, a_in_registers)
    return X


# Not chosen automatically: 0.17-0.58x torch.linalg.solve_triangular on the H100
# (bench/linalg_triton.md v1) until tuned.
@solve_triangular_op.implement("triton", supports=lambda A, B, upper, left, unitriangular:
                               fits(A) and B.dtype == A.dtype, automatic=False)
def _solve_triangular_triton(A, B, upper, left, unitriangular):
    return solve_triangular_launch(A, B, upper, left, unitriangular)


# Not chosen automatically until timed on the GPU (bench/scripts/small_linalg_sweep.py).
@cholesky_solve_op.implement("triton", supports=lambda B, L, upper: fits(L) and B.dtype == L.dtype,
                             automatic=False)
def _cholesky_solve_triton(B, L, upper):
    return cholesky_solve_launch(B, L, upper)
