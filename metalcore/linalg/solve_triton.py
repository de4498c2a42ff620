"""General solve by LU with partial pivoting in Triton: one program per matrix and block of
right-hand sides, in registers.

Layers: ``_lu_solve_kernel`` → :func:`solve_launch` → the ``triton`` implementation of
``metalcore::solve_ex`` (declared in :mod:`metalcore.linalg.solve`).

The kernel factors ``A = P L U`` exactly as LAPACK ``getf2`` does — pivot = the first row of
largest ``|a|`` in the column, rows swapped, multipliers ``l = a/pivot``, rank-1 update — while
applying the same row operations to ``B``, then back-substitutes with ``U``. ``info = j + 1``
for the first exactly-zero pivot (LAPACK's definition); the factorization goes on past it, as
LAPACK's does, and ``X`` then holds inf/NaN for that matrix only. ``X A = B`` is solved as
``Aᵀ Xᵀ = Bᵀ`` through transposed strides (no copies).

With ``IMPLICIT`` the rows are never swapped: each row remembers the step at which it became the
pivot row, elimination and back substitution follow that order, and ``X`` is stored through it.
That saves three of the eight tile reductions of a step and the swap's selects, which pays from
n = 64 on the H100; below, getf2's swaps are faster (:func:`launch_shape`).

Grid: ``(batch / G, k / BK)``. Programs that share ``A`` but not its right-hand-side block each
factor it again: for ``k ≤ 64`` (one block) nothing is repeated. Work per program:
``~2 n³/3 + 2 n² BK`` flops padded to the tile plus ``~10 n`` dependent reductions (pivot search,
two row reads for ``A`` and two for ``B`` per step); bytes ``4 (n² + 2 n k)`` in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore.linalg._small_triton import MAX_N, batched, block, fits, group, stack_strides
from metalcore.linalg.solve import solve_ex_op
from metalcore._triton import cdiv, jit

# Right-hand-side columns per program (a [128, 64] block is 8192 elements, as in trsm).
MAX_BK = 64
# Launch shape, fitted to the H100 sweep (fp32, one right-hand side, GPU µs; bench/linalg_triton.md
# v3):
# - matrices per program: ~128 tile elements (10000×3: 8 a program 4.5 µs, 32 4.9-6.6; 4096×8: 2 a
#   program 9.7, 8 10.3-12.7; 500×16: 1 a program 10.8, 2 11.0-12.8).
# - warps: one per 1024 tile elements, at most 8 (1000×32: 1 warp 42.3 µs, 2 66.0, 4 121; 100×64: 4
#   warps 106, 8 119, 2 156; 64×128: 8 warps 608, 16 651).
# - pivoting: getf2's row swaps up to BN = 32 (1000×32: 42.3 vs 57.6 µs implicit; 4096×8 9.7-10.3 vs
#   11.0-16.4), the row order (IMPLICIT) from BN = 64 (100×64: 106 vs 128; 64×128: 608 vs 720).
# fp64 (not timed): the same rule, except that A's tile is kept to 256 bytes a thread, which gives
# 128×128 16 warps: ptxas (sm_90) spills 728 bytes a thread there at 8 warps (255 registers) and 500
# at 16 (128 registers, all that 16 warps may have); fp32 at 8 warps fits 255 registers with no
# spill, fp64 64×64 at 4 warps too. The fp64 sweep (its half-warps variant) checks the choice.
SOLVE_GROUP_ELEMENTS = 128
ELEMENTS_PER_WARP = 1024
MAX_WARPS = 8
TILE_BYTES_PER_THREAD = 256
IMPLICIT_MIN_BN = 64


def launch_shape(n: int, k: int, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Default ``group_size``, ``block_k``, ``num_warps`` and ``implicit_pivoting`` of
    :func:`solve_launch` for ``batch`` systems of side ``n`` with ``k`` right-hand sides (the rule
    above)."""
    BN = block(n)
    BK = min(block(k), MAX_BK)
    G = group(batch, BN * max(BN, BK), device, SOLVE_GROUP_ELEMENTS)
    elements = G * BN * max(BN, BK)
    w = max(min(MAX_WARPS, elements // ELEMENTS_PER_WARP),
            elements * dtype.itemsize // (32 * TILE_BYTES_PER_THREAD))
    return {"group_size": G, "block_k": BK, "num_warps": min(16, max(1, w)),
            "implicit_pivoting": BN >= IMPLICIT_MIN_BN}


@jit
def _lu_solve_kernel(A, B, X, INFO, batch, n, k, s_ab, s_ar, s_ac, s_bb, s_br, s_bc, s_xb, s_xr, s_xc,
                     G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IMPLICIT: tl.constexpr):
    g = tl.program_id(0) * G + tl.arange(0, G)
    r = tl.arange(0, BN)
    q = tl.program_id(1) * BK + tl.arange(0, BK)
    g3 = g[:, None, None].to(tl.int64)
    r2 = r[None, :]
    r3 = r[None, :, None]
    c3 = r[None, None, :]
    q3 = q[None, None, :]
    live = g3 < batch
    a = tl.load(A + g3 * s_ab + r3 * s_ar + c3 * s_ac, mask=live & (r3 < n) & (c3 < n), other=0.0)
    in_b = live & (r3 < n) & (q3 < k)
    b = tl.load(B + g3 * s_bb + r3 * s_br + q3 * s_bc, mask=in_b, other=0.0)

    info = tl.zeros([G], dtype=tl.int32)
    if IMPLICIT:
        # Rows stay where they are; ``order[r]`` is the step at which physical row r became the
        # pivot row (BN while it has not). Per step that drops the reads of row j of A and of B
        # and the four tile-wide selects of the swap: 5 reductions instead of 8. The pivot is the
        # first largest |a| in physical row order (LAPACK's is in swapped order: exact ties may
        # pick another row, with the same error bound); NaN ranks first, so a NaN column is
        # pivoted on (NaN spreads through that matrix only) and ``order`` stays a permutation.
        order = tl.full([G, BN], BN, tl.int32)
        for j in range(n):
            col = tl.sum(tl.where(c3 == j, a, 0.0), axis=2)                      # [G, BN]: A[:, j]
            free = (order == BN) & (r2 < n)
            key = tl.where(col != col, float("inf"), tl.abs(col))
            p2 = tl.argmax(tl.where(free, key, -1.0), axis=1)[:, None]
            a_p = tl.sum(tl.where(r3 == p2[:, :, None], a, 0.0), axis=1)          # [G, BN]: row p
            b_p = tl.sum(tl.where(r3 == p2[:, :, None], b, 0.0), axis=1)          # [G, BK]
            pivot = tl.sum(tl.where(r2 == p2, col, 0.0), axis=1)                 # [G]
            info = tl.where((info == 0) & (pivot == 0.0), j + 1, info)
            order = tl.where(r2 == p2, j, order)
            free = free & (r2 != p2)
            l = tl.where(free, col / tl.where(pivot == 0.0, 1.0, pivot)[:, None], 0.0)[:, :, None]
            free3 = free[:, :, None]
            a = tl.where(free3 & (c3 > j), a - l * a_p[:, None, :], a)
            b = tl.where(free3, b - l * b_p[:, None, :], b)

        # Row order[r] of U sits in physical row r; back substitution in that order.
        order3 = order[:, :, None]
        for t in range(n):
            j = n - 1 - t
            col = tl.sum(tl.where(c3 == j, a, 0.0), axis=2)[:, :, None]          # [G, BN, 1]
            sel = order3 == j
            d = tl.sum(tl.where(sel, col, 0.0), axis=1)                          # [G, 1]
            x = tl.sum(tl.where(sel, b, 0.0), axis=1) / tl.where((g < batch)[:, None], d, 1.0)
            b = tl.where(sel, x[:, None, :], tl.where(order3 < j, b - col * x[:, None, :], b))
        # Physical row r holds x[order[r]].
        tl.store(X + g3 * s_xb + order3 * s_xr + q3 * s_xc, b, mask=in_b)
    else:
        for j in range(n):
            col = tl.sum(tl.where(c3 == j, a, 0.0), axis=2)                          # [G, BN]: A[:, j]
            p = tl.argmax(tl.where((r2 >= j) & (r2 < n), tl.abs(col), -1.0), axis=1)  # first largest
            p2 = p[:, None]
            p3 = p[:, None, None]
            a_j = tl.sum(tl.where(r3 == j, a, 0.0), axis=1)                          # [G, BN]: rows j, p
            a_p = tl.sum(tl.where(r3 == p3, a, 0.0), axis=1)
            b_j = tl.sum(tl.where(r3 == j, b, 0.0), axis=1)                          # [G, BK]
            b_p = tl.sum(tl.where(r3 == p3, b, 0.0), axis=1)
            pivot = tl.sum(tl.where(r2 == p2, col, 0.0), axis=1)                     # [G]
            info = tl.where((info == 0) & (pivot == 0.0), j + 1, info)
            col_j = tl.sum(tl.where(r2 == j, col, 0.0), axis=1)
            col = tl.where(r2 == p2, col_j[:, None], col)                            # the swap, on A[:, j]
            # A zero pivot means a zero column below it: LAPACK skips the scaling, so do we (l = 0).
            l = tl.where(r2 > j, col / tl.where(pivot == 0.0, 1.0, pivot)[:, None], 0.0)
            a = tl.where(r3 == j, a_p[:, None, :], tl.where(r3 == p3, a_j[:, None, :], a))
            b = tl.where(r3 == j, b_p[:, None, :], tl.where(r3 == p3, b_j[:, None, :], b))
            a = tl.where((r3 > j) & (c3 > j), a - l[:, :, None] * a_p[:, None, :], a)
            b = tl.where(r3 > j, b - l[:, :, None] * b_p[:, None, :], b)

        for t in range(n):
            j = n - 1 - t
            col = tl.sum(tl.where(c3 == j, a, 0.0), axis=2)                          # U[:, j]
            d = tl.sum(tl.where(r2 == j, col, 0.0), axis=1)
            x = tl.sum(tl.where(r3 == j, b, 0.0), axis=1) / tl.where(g < batch, d, 1.0)[:, None]
            b = tl.where(r3 == j, x[:, None, :], tl.where(r3 < j, b - col[:, :, None] * x[:, None, :], b))

        tl.store(X + g3 * s_xb + r3 * s_xr + q3 * s_xc, b, mask=in_b)
    # A tensor mask selected by the scalar test (a tensor & a scalar comparison is an integer tensor
    # under Triton 3.9's interpreter, which refuses it as a mask).
    tl.store(INFO + g, info, mask=tl.where(tl.program_id(1) == 0, g < batch, False))


def solve_launcher(A: Tensor, B: Tensor, left: bool, *, num_warps: int | None = None,
                   group_size: int | None = None, block_k: int | None = None,
                   implicit_pivoting: bool | None = None) -> Callable[..., tuple[Tensor, Tensor]]:
    """``run(A, B) -> (X, info)`` for tensors of ``A``'s and ``B``'s shapes, strides, dtype and
    device: the launch of :func:`solve_launch` with the broadcast, strides, launch shape and grid
    worked out here, once per call signature (the op's plan keeps ``run``), so that a call only
    allocates and launches (and, where ``B`` broadcasts ``A``, reduces ``info`` to ``A``'s batch)."""
    n, dtype, device = A.shape[-1], B.dtype, B.device
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    x_shape, info_shape = (*batch, *B.shape[-2:]), A.shape[:-2]
    nb = math.prod(batch)
    k = B.shape[-1] if left else B.shape[-2]
    if nb == 0 or n == 0 or k == 0:
        def empty(A: Tensor, B: Tensor, *_: object) -> tuple[Tensor, Tensor]:
            X = torch.empty(x_shape, dtype=dtype, device=device)
            if nb == 0 or n == 0:
                return X, torch.zeros(info_shape, dtype=torch.int32, device=device)
            # No right-hand side: the LU still runs for info (a one-column system of zeros).
            return X, solve_launch(A, A.new_zeros(*A.shape[:-1], 1), True)[1]
        return empty
    a_batch = None if A.shape[:-2] == batch else (*batch, n, n)
    b_batch = None if B.shape[:-2] == batch else (*batch, *B.shape[-2:])
    sa, copy_a = stack_strides(A if a_batch is None else A.expand(a_batch))
    sb, copy_b = stack_strides(B if b_batch is None else B.expand(b_batch))
    sx = [x_shape[-2] * x_shape[-1], x_shape[-1], 1]
    if not left:
        for s in (sa, sb, sx):   # X A = B  ⇔  Aᵀ Xᵀ = Bᵀ
            s[1], s[2] = s[2], s[1]
    default = launch_shape(n, k, nb, A.dtype, device)
    G = group_size or default["group_size"]
    BK = block_k or default["block_k"]
    launch = _lu_solve_kernel.bind(
        (cdiv(nb, G), cdiv(k, BK)), None, None, None, None, nb, n, k, *sa, *sb, *sx, G=G, BN=block(n), BK=BK,
        IMPLICIT=default["implicit_pivoting"] if implicit_pivoting is None else implicit_pivoting,
        num_warps=num_warps or default["num_warps"])
    # info over the full batch, reduced to A's where B's batch dims broadcast A's.
    lead = len(batch) - len(info_shape)
    dims = [i for i in range(len(batch)) if i < lead or info_shape[i - lead] == 1 and batch[i] != 1]

    as_given = a_batch is None and b_batch is None and not copy_a and not copy_b

    def operand(x: Tensor, full: tuple[int, ...] | None, copy: bool) -> Tensor:
        x = x if full is None else x.expand(full)
        return batched(x) if copy else x

    def run(A: Tensor, B: Tensor, *_: object) -> tuple[Tensor, Tensor]:
        X = torch.empty(x_shape, dtype=dtype, device=device)
        info = torch.empty(batch, dtype=torch.int32, device=device)   # the kernel stores all
        if not as_given:
            A, B = operand(A, a_batch, copy_a), operand(B, b_batch, copy_b)
        launch(A, B, X, info)
        return X, (info.amax(dim=dims).reshape(info_shape) if dims else info)

    return run


def solve_launch(A: Tensor, B: Tensor, left: bool, *, num_warps: int | None = None,
                 group_size: int | None = None, block_k: int | None = None,
                 implicit_pivoting: bool | None = None) -> tuple[Tensor, Tensor]:
    """``(X, info)`` with ``A X = B`` (``X A = B`` when not ``left``); ``A`` ``(*a, n, n)``, ``B``
    ``(*b, n, k)`` (``(*b, k, n)``) with broadcastable batch shapes; ``info`` has shape ``*a``.

    The keywords override :func:`launch_shape` (for sweeps): warps per program, matrices per
    program and right-hand-side columns per program (powers of two), and whether rows are swapped
    (LAPACK's getf2) or pivoting is tracked by a row order (fewer reductions a step)."""
    return solve_launcher(A, B, left, num_warps=num_warps, group_size=group_size, block_k=block_k,
                          implicit_pivoting=implicit_pivoting)(A, B)


AUTO_MAX_N = MAX_N


def _automatic(A, B, left, check_errors):
    return A.shape[-1] <= AUTO_MAX_N


@solve_ex_op.implement("triton", supports=lambda A, B, left, check_errors:
                       fits(A) and B.dtype == A.dtype and B.dim() >= 2, automatic=_automatic,
                       specialize=lambda A, B, left, check_errors: solve_launcher(A, B, left))
def _solve_ex_triton(A, B, left, check_errors):
    return solve_launch(A, B, left)
