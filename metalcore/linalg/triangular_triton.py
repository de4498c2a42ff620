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

Grid: ``(batch / G, k / BK)``: right-hand sides are split into ``BK``-column blocks. A program holds
only its ``[G, BN, BK]`` block of ``B``; column ``j`` of ``M`` is loaded from memory each step (an
L1/L2 hit after the first program), one step ahead so that the load overlaps the step before it.
Holding ``M`` in registers instead and reading its columns by a masked reduction was never faster
on the H100 (level at 500×16, slower elsewhere: trsm 64×128 233 vs 125 µs, cholesky_solve 100×64 60
vs 23 µs; bench/linalg_triton.md v3), so it was removed. Work per program: ``n`` steps of ``O(BN·BK)``, ``n² k`` multiply-adds for
``n² k`` in the algorithm; bytes: ``A`` (``4 n²/2``) plus ``B`` and ``X`` (``8 n k``) in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore.linalg._small_triton import GROUP_ELEMENTS, MAX_N, batched, block, fits, group, stack_strides
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from metalcore.linalg.triangular import solve_triangular_op
from metalcore._triton import cdiv, helper, jit

# Launch shape, fitted to the H100 sweep (fp32, GPU µs; trsm with n right-hand sides, cholesky_solve
# with one; bench/linalg_triton.md v3):
# - right-hand-side columns per program: at most 32 up to BN = 64, so that 100 matrices of 64 still
#   make 200 programs (100×64: 32 columns 25.6 µs, 64 34.4, 16 52.9); at most 64 at BN = 128
#   (64×128: 64 columns on 8 warps 125 µs, 16 on 4 warps 146, 32 on 4 warps 188).
# - matrices per program (trsm): tiny ones (BN ≤ 8) packed to GROUP_ELEMENTS (4096×8: 8 a program
#   4.5 µs, 2 a program 5.0; 10000×3: 32 a program 3.2-3.8, 8 3.6); from BN = 16 one matrix a program
#   (500×16: 5.3 µs alone, 6.3-7.0 two to a program).
# - matrices per program (cholesky_solve, twice the steps of trsm on a 2-column block): ~128 tile
#   elements at every size (500×16: 4 a program 7.2 µs, 16 9.3; 1000×32: 2 13.3, 8 16.4; 100×64: 1
#   22.7, 4 30.8; 4096×8: 8 4.9, 32 6.2; 10000×3: 16 3.4, 64 3.8).
# - warps: one per 512 tile elements, at most 8 (1000×32: 2 warps 18.7 µs, 1 31.8, 4 30.8; 100×64
#   at 32 columns: 4 warps; 64×128: 8 warps 125 µs, 16 190, 4 278).
# fp64 (not timed) takes the same shape: ptxas (sm_90) fits 128×64 on 8 warps in 255 registers with
# no spill, 64×32 on 4 warps in 168 with 16 bytes a thread spilled.
ELEMENTS_PER_WARP = 512
MAX_WARPS = 8
PACK_MAX_BN = 8
CHOL_GROUP_ELEMENTS = 128


def launch_shape(n: int, k: int, batch: int, device: torch.device, cholesky_solve: bool = False) -> dict:
    """Default ``group_size``, ``block_k`` and ``num_warps`` of :func:`solve_triangular_launch`
    (:func:`cholesky_solve_launch` with ``cholesky_solve``) for ``batch`` systems of side ``n`` with
    ``k`` right-hand sides (the rule above)."""
    BN = block(n)
    BK = min(block(k), 32 if BN <= 64 else 64)
    if cholesky_solve:
        budget = CHOL_GROUP_ELEMENTS
    else:
        budget = GROUP_ELEMENTS if BN <= PACK_MAX_BN else 1
    G = group(batch, BN * BK, device, budget)
    return {"group_size": G, "block_k": BK,
            "num_warps": min(MAX_WARPS, max(1, G * BN * BK // ELEMENTS_PER_WARP))}


@helper
def _substitute(b, a_base, s_r, s_c, live, r3, n, LOWER: tl.constexpr, UNIT: tl.constexpr):
    """``b`` (``[G, BN, BK]``) overwritten by ``M⁻¹ b``, ``M`` the lower (upper) triangle of the matrices
    at ``a_base`` (``[G]`` pointers) with row/column strides ``s_r``/``s_c``; only that triangle
    (strictly, when ``UNIT``) is read, one column a step, loaded a step ahead."""
    live3 = live[:, None, None]
    base3 = a_base[:, None, None]
    j = 0 if LOWER else n - 1
    below = (r3 > j) if LOWER else (r3 < j)
    col = tl.load(base3 + r3 * s_r + j * s_c, mask=live3 & below & (r3 < n), other=0.0)
    piv = tl.load(a_base + j * (s_r + s_c), mask=live, other=1.0)
    for t in range(n):
        j = t if LOWER else n - 1 - t
        below = (r3 > j) if LOWER else (r3 < j)   # rows still to be updated by x_j
        # Next step's column and pivot (masked off past the last step).
        j_next = j + 1 if LOWER else j - 1
        below_next = (r3 > j_next) if LOWER else (r3 < j_next)
        col_next = tl.load(base3 + r3 * s_r + j_next * s_c, mask=live3 & below_next & (r3 < n), other=0.0)
        # A tensor mask selected by the scalar test: ``live & (t + 1 < n)`` is an integer tensor
        # under Triton 3.9's interpreter, which refuses it as a mask.
        piv_next = tl.load(a_base + j_next * (s_r + s_c), mask=tl.where(t + 1 < n, live, False), other=1.0)
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
                 UNIT: tl.constexpr, CHOL: tl.constexpr):
    g = tl.program_id(0) * G + tl.arange(0, G)
    r = tl.arange(0, BN)
    q = tl.program_id(1) * BK + tl.arange(0, BK)
    r3 = r[None, :, None]
    q3 = q[None, None, :]
    live = g < batch
    g64 = g.to(tl.int64)
    in_b = live[:, None, None] & (r3 < n) & (q3 < k)
    b = tl.load(B + g64[:, None, None] * s_bb + r3 * s_br + q3 * s_bc, mask=in_b, other=0.0)
    a_base = A + g64 * s_ab
    b = _substitute(b, a_base, s_ar, s_ac, live, r3, n, LOWER, UNIT)
    if CHOL:
        # cholesky_solve: the first pass solved with the lower factor; the second solves with its
        # transpose (same memory, swapped strides), an upper non-unit triangle.
        b = _substitute(b, a_base, s_ac, s_ar, live, r3, n, False, False)
    tl.store(X + g64[:, None, None] * s_xb + r3 * s_xr + q3 * s_xc, b, mask=in_b)


def trsm_launcher(A: Tensor, B: Tensor, upper: bool, left: bool, unitriangular: bool, *,
                  cholesky_solve: bool = False, num_warps: int | None = None, group_size: int | None = None,
                  block_k: int | None = None) -> Callable[..., Tensor]:
    """``run(A, B) -> X`` for tensors of ``A``'s and ``B``'s shapes, strides, dtype and device:
    :func:`solve_triangular_launch` (with ``cholesky_solve``: :func:`cholesky_solve_launch`, ``A``
    the factor) with the strides, launch shape and grid worked out here, once per call signature
    (the op's plan keeps ``run``), so that a call only allocates ``X`` and launches."""
    shape, dtype, device = B.shape, B.dtype, B.device
    n, nb = A.shape[-1], math.prod(shape[:-2])
    if B.numel() == 0:
        return lambda A, B, *_: torch.empty(shape, dtype=dtype, device=device)
    sa, copy_a = stack_strides(A)
    sb, copy_b = stack_strides(B)
    sx = [shape[-2] * shape[-1], shape[-1], 1]
    lower = not upper
    if cholesky_solve:
        k = shape[-1]
        if upper:
            sa[1], sa[2] = sa[2], sa[1]   # the first pass solves with Uᵀ, a lower triangle
        lower = True
    else:
        k = shape[-1] if left else shape[-2]
        if not left:
            # X A = B  ⇔  Aᵀ Xᵀ = Bᵀ: transpose every operand through its strides; Aᵀ flips the triangle.
            for s in (sa, sb, sx):
                s[1], s[2] = s[2], s[1]
            lower = not lower
    default = launch_shape(n, k, nb, device, cholesky_solve)
    G = group_size or default["group_size"]
    BK = block_k or default["block_k"]
    launch = _trsm_kernel.bind((cdiv(nb, G), cdiv(k, BK)), None, None, None, nb, n, k, *sa, *sb, *sx,
                               G=G, BN=block(n), BK=BK, LOWER=lower, UNIT=unitriangular, CHOL=cholesky_solve,
                               num_warps=num_warps or default["num_warps"])

    def run(A: Tensor, B: Tensor, *_: object) -> Tensor:
        X = torch.empty(shape, dtype=dtype, device=device)
        launch(batched(A) if copy_a else A, batched(B) if copy_b else B, X)
        return X

    return run


def solve_triangular_launch(A: Tensor, B: Tensor, upper: bool, left: bool, unitriangular: bool, *,
                            num_warps: int | None = None, group_size: int | None = None,
                            block_k: int | None = None) -> Tensor:
    """``X`` with ``A X = B`` (``X A = B`` when not ``left``); ``A`` ``(*, n, n)``, ``B`` ``(*, n, k)``
    (``(*, k, n)``) with the same batch shape, float32/float64, ``n ≤ MAX_N``; ``X`` contiguous.

    The keywords override :func:`launch_shape` (for sweeps): warps per program, matrices per program
    and right-hand-side columns per program (powers of two)."""
    return trsm_launcher(A, B, upper, left, unitriangular, num_warps=num_warps, group_size=group_size,
                         block_k=block_k)(A, B)


def cholesky_solve_launch(B: Tensor, L: Tensor, upper: bool, *, num_warps: int | None = None,
                          group_size: int | None = None, block_k: int | None = None) -> Tensor:
    """``X`` with ``L Lᵀ X = B`` (``Uᵀ U X = B`` when ``upper``); ``L`` ``(*, n, n)``, ``B``
    ``(*, n, k)`` with the same batch shape, float32/float64, ``n ≤ MAX_N``; ``X`` contiguous.
    Keywords as in :func:`solve_triangular_launch`."""
    return trsm_launcher(L, B, upper, True, False, cholesky_solve=True, num_warps=num_warps,
                         group_size=group_size, block_k=block_k)(L, B)


# Chosen automatically where the GPU time beat torch's on the H100 (fp32, bench/linalg_triton.md v3).
# trsm (n right-hand sides) up to n = 64: 10000×3 3.2 vs 17.0 µs, 4096×8 4.5 vs 13.6, 500×16 5.3 vs
# 12.5, 1000×32 18.7 vs 34.6, 100×64 25.6 vs 32.9; at 64×128 it loses (125 vs 76: 128 dependent steps
# on 128 programs). cholesky_solve (1 right-hand side) at every size the kernel takes, n ≤ 128:
# 10000×3 3.4 vs 132 µs, 4096×8 4.9 vs 88, 500×16 7.2 vs 62, 1000×32 13.3 vs 76, 100×64 22.7 vs 84,
# 64×128 52 vs 123. What remains for tiny batches is host time: ~40-55 µs to issue a call against
# torch's ~30 (trsm), so from an idle GPU a single small trsm is ~0.5-0.8x torch's. fp64 (not timed)
# follows the same rule: the time is the chain of dependent steps, not the FMA rate.
TRSM_AUTO_MAX_N = 64
CHOLESKY_SOLVE_AUTO_MAX_N = MAX_N


def _trsm_automatic(A, B, upper, left, unitriangular):
    return A.shape[-1] <= TRSM_AUTO_MAX_N


def _cholesky_solve_automatic(B, L, upper):
    return L.shape[-1] <= CHOLESKY_SOLVE_AUTO_MAX_N


@solve_triangular_op.implement("triton", supports=lambda A, B, upper, left, unitriangular:
                               fits(A) and B.dtype == A.dtype, automatic=_trsm_automatic,
                               specialize=trsm_launcher)
def _solve_triangular_triton(A, B, upper, left, unitriangular):
    return solve_triangular_launch(A, B, upper, left, unitriangular)


def _cholesky_solve_specialized(B: Tensor, L: Tensor, upper: bool) -> Callable[..., Tensor]:
    run = trsm_launcher(L, B, upper, True, False, cholesky_solve=True)
    return lambda B, L, upper: run(L, B)


@cholesky_solve_op.implement("triton", supports=lambda B, L, upper: fits(L) and B.dtype == L.dtype,
                             automatic=_cholesky_solve_automatic, specialize=_cholesky_solve_specialized)
def _cholesky_solve_triton(B, L, upper):
    return cholesky_solve_launch(B, L, upper)
