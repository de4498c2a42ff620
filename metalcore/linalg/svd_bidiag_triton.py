"""Singular values by Golub-Kahan bidiagonalisation and bisection, one program per matrix, in
registers.

Layers: ``_bidiag_svdvals_kernel`` → :func:`svdvals_bidiag` → the ``bidiag`` path of
``metalcore::svd`` without vectors on the Triton backend (:mod:`metalcore.linalg.svd_triton`), both
sides up to the register tile's :data:`~metalcore.linalg._small_triton.MAX_N` (128).

Why: the Jacobi kernels' values cost as many sweeps as their vectors (hundreds of dependent rounds
at 64-128), while the eigenvalues of the tridiagonal path (:mod:`metalcore.linalg.eigh_tridiag_triton`,
the same two stages) took 0.16 ms of GPU time for 100×64² on the H100 (bench/linalg_triton.md v14).

1. **Bidiagonalisation** (LAPACK ``gebd2``, ``m ≥ n``; a wide matrix is read as its transpose
   through strides): for ``k < n`` a left reflector zeroes column ``k`` below the diagonal
   (``A ← (I − τ v vᵀ) A``), then a right reflector zeroes row ``k`` right of the super-diagonal
   (``A ← A (I − τ u uᵀ)``). ``B``'s diagonal ``d`` and super-diagonal ``e`` are read from the tile
   and scaled by their largest magnitude.
2. **Bisection on the Golub-Kahan matrix** ``T_GK`` (order ``2n``, zero diagonal, off-diagonal
   ``d₀, e₀, d₁, e₁, …, d_{n−1}``), whose eigenvalues are ``±σ_i``: lane ``j`` finds the ``(n + j)``-th
   smallest, ``σ`` in ascending order (LAPACK ``dbdsvdx``'s route), by the eigenvalue path's Sturm
   multisection; ``S`` is stored descending.

Accuracy: the bidiagonalisation is backward stable and bisection finds each eigenvalue of ``T_GK`` to
``O(ε ‖B‖)``, so the singular values carry ``gesvd``'s absolute bound ``O(n ε ‖A‖)`` (what LAPACK's
ratio for singular values measures), not the Jacobi kernels' relative accuracy for tiny ``σ`` of
graded matrices. NaN or Inf in a matrix gives NaN singular values for that matrix only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import jit
from metalcore.linalg._small_triton import MAX_N, block, stack_strides, warps
from metalcore.linalg.eigh_tridiag_triton import passes, reflector, schedule, sturm_multisection
from metalcore.linalg.householder_gemm import as3


@jit
def _bidiag_svdvals_kernel(A, S, DS, ES, nb, m, n, s_ab, s_ar, s_ac, eps, pivmin, passes,
                           BM: tl.constexpr, BN: tl.constexpr, SECTIONS: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    inside = (rows[:, None] < m) & (cols[None, :] < n)
    scratch = pid.to(tl.int64) * 2 * BN                   # this program's T_GK, order 2n
    for mat in range(pid, nb, programs):
        mat = tl.full([], 0, tl.int64) + mat
        a = tl.load(A + mat * s_ab + rows[:, None] * s_ar + cols[None, :] * s_ac, mask=inside, other=0.0)
        finite = tl.sum(tl.sum(tl.where(tl.abs(a) < float("inf"), 0, 1), axis=1), axis=0) == 0

        # 1. Golub-Kahan bidiagonalisation: left reflector of column k, right reflector of row k.
        for k in range(0, n):
            v, tau, _ = reflector(tl.sum(tl.where(cols[None, :] == k, a, 0.0), axis=1), rows, k)
            a = a - v[:, None] * (tau * tl.sum(a * v[:, None], axis=0))[None, :]
            u, tau, _ = reflector(tl.sum(tl.where(rows[:, None] == k, a, 0.0), axis=0), cols, k + 1)
            a = a - (tau * tl.sum(a * u[None, :], axis=1))[:, None] * u[None, :]

        # 2. B's diagonal and super-diagonal, scaled to at most 1, interleaved as T_GK's off-diagonal.
        d = tl.sum(tl.where(rows[:, None] == cols[None, :], a, 0.0), axis=0)             # d_j = B[j, j]
        e = tl.sum(tl.where(rows[:, None] == cols[None, :] - 1, a, 0.0), axis=0)         # e_{j-1} = B[j-1, j]
        d = tl.where(cols < n, d, 0.0)
        e = tl.where((cols >= 1) & (cols < n), e, 0.0)                                    # at j: e_{j-1}
        s = tl.maximum(tl.max(tl.abs(d), axis=0), tl.max(tl.abs(e), axis=0))
        s = tl.where(s > 0.0, s, 1.0)
        d = d / s
        e = e / s
        # Gershgorin: row 2j of T_GK holds e_{j-1} and d_j, row 2j+1 holds d_j and e_j.
        e_after = tl.sum(tl.where(cols[:, None] == cols[None, :] - 1, e[None, :], 0.0), axis=1)
        high = tl.max(tl.abs(d) + tl.maximum(tl.abs(e), tl.abs(e_after)), axis=0)
        pad = 4.0 * eps * high + 2.0 * pivmin
        tl.debug_barrier()                                # the previous matrix's readers are done
        tl.store(DS + scratch + tl.arange(0, 2 * BN), tl.zeros([2 * BN], dtype=d.dtype))
        tl.store(ES + scratch + 2 * cols, d)
        tl.store(ES + scratch + 2 * cols - 1, e, mask=cols >= 1)
        tl.debug_barrier()

        # 3. Lane j: the (n + j)-th smallest eigenvalue of T_GK, the j-th smallest singular value.
        sigma = sturm_multisection(DS + scratch, ES + scratch, 2 * n, -pad, high + pad, n + cols, passes,
                                   pivmin, SECTIONS)
        sigma = tl.where(finite, tl.maximum(sigma, 0.0) * s, float("nan"))
        tl.store(S + mat * n + (n - 1 - cols), sigma, mask=cols < n)


def svdvals_bidiag_launcher(A: Tensor, programs: int | None = None,
                           sections: int | None = None) -> Callable[[Tensor], Tensor]:
    """``run(A) -> S`` for tensors of ``A``'s shape, strides, dtype and device: the launch bound once
    per call signature (the op's plan keeps ``run``). ``programs``, ``sections``: as
    :func:`~metalcore.linalg.eigh_tridiag_triton.schedule` (defaults: its rule)."""
    *batch, m, n = A.shape
    k = min(m, n)
    dt, dev = A.dtype, A.device
    nb = math.prod(batch)
    if nb == 0 or k == 0:
        return lambda A: torch.empty(batch + [k], dtype=dt, device=dev)
    sa, copy = stack_strides(A)
    if m < n:                                             # the transpose, through strides
        m, n, sa = n, m, [sa[0], sa[2], sa[1]]
    BM, BN = block(m), block(n)
    num_warps = warps(BM * BN)
    programs, sections = schedule(nb, dev, num_warps, programs, sections)
    finfo = torch.finfo(dt)
    launch = _bidiag_svdvals_kernel.bind((programs,), None, None, None, None, nb, m, n, *sa, finfo.eps,
                                         finfo.tiny, passes(dt, sections), BM=BM, BN=BN, SECTIONS=sections,
                                         num_warps=num_warps)

    def run(A: Tensor) -> Tensor:
        S = torch.empty(batch + [k], dtype=dt, device=dev)
        lines = torch.empty(2, programs, 2 * BN, dtype=dt, device=dev)
        launch(as3(A) if copy else A, S, lines[0], lines[1])
        return S

    return run


def svdvals_bidiag(A: Tensor, programs: int | None = None, sections: int | None = None) -> Tensor:
    """Singular values, descending, of ``A`` ``(*, m, n)`` (both sides ``≤ MAX_N``, float32/float64).
    ``programs``: persistent programs (default: as many as the SMs hold); ``sections``: Sturm points a
    lane and pass (default :data:`~metalcore.linalg.eigh_tridiag_triton.SECTIONS` up to one matrix
    an SM, else 1)."""
    return svdvals_bidiag_launcher(A, programs, sections)(A)
