"""Singular values and vectors by Golub-Kahan bidiagonalisation, bisection and inverse iteration,
one persistent program per matrix, in registers.

Layers: ``_bidiag_svd_kernel`` → :func:`svd_bidiag` → the ``bidiag`` path of
``metalcore::svd`` on the Triton backend (:mod:`metalcore.linalg.svd_triton`), both sides up to the
register tile's :data:`~metalcore.linalg._small_triton.MAX_N` (128), reduced factors.

Why: the Jacobi kernels cost hundreds of dependent rounds at 64-128 (64×128² with vectors: 7.9 ms on
the H100), while the tridiagonal eigenvalue path (:mod:`metalcore.linalg.eigh_tridiag_triton`, the
same stages) took 0.16 ms of GPU time for 100×64² values (bench/linalg_triton.md v14).

1. **Bidiagonalisation** (LAPACK ``gebd2``, ``m ≥ n``; a wide matrix is read as its transpose
   through strides): for ``k < n`` a left reflector zeroes column ``k`` below the diagonal
   (``A ← (I − τ v vᵀ) A``), then a right reflector zeroes row ``k`` right of the super-diagonal
   (``A ← A (I − τ u uᵀ)``); with vectors both are kept as ``√τ v`` in the output buffers until
   step 5. ``B``'s diagonal ``d`` and super-diagonal ``e`` are read from the tile and scaled by their
   largest magnitude.
2-3. **Bisection on the Golub-Kahan matrix** ``T_GK`` (order ``2n``, zero diagonal, off-diagonal
   ``d₀, e₀, d₁, e₁, …, d_{n−1}``), whose eigenvalues are ``±σ_i``: lane ``j`` finds the ``(n + j)``-th
   smallest, ``σ`` in ascending order (LAPACK ``dbdsvdx``'s route), by the eigenvalue path's Sturm
   multisection; ``S`` is stored descending.
4. **Inverse iteration on** ``T_GK`` (the eigenvalue path's): the eigenvector of ``σ_j`` interleaves
   ``v_j`` (even rows) and ``u_j`` (odd rows), ``B v = σ u``. Each half is normalised and
   orthonormalised within clusters on its own, which removes the other sign's share (module
   comments).
5. **Back-transformation** of both halves by the reflectors of step 1, in reverse order.

Accuracy: the bidiagonalisation is backward stable and bisection finds each eigenvalue of ``T_GK`` to
``O(ε ‖B‖)``, so the singular values carry ``gesvd``'s absolute bound ``O(n ε ‖A‖)`` (what LAPACK's
ratio for singular values measures), not the Jacobi kernels' relative accuracy for tiny ``σ`` of
graded matrices. The vectors' residual and orthogonality ratios stay within LAPACK's on every test
family, rank-deficient and repeated included, in the interpreter and on the H100 (bench/linalg_triton.md,
v18). NaN or Inf in a matrix gives NaN values and vectors for that matrix only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import jit
from metalcore.linalg._small_triton import MAX_N, block, stack_strides
from metalcore.linalg.eigh_tridiag_triton import (ORTOL_N, ROUNDS, SPLIT_BACK_COLUMNS, _reflect_kernel, chain_warps,
                                                  orthonormalise_clusters, passes, reflector, schedule,
                                                  sturm_multisection, tridiag_eigenvectors, unit_columns, unit_tile)
from metalcore.linalg.householder_gemm import as3


@jit
def _bidiag_svd_kernel(A, S, U, V, RU, RV, DS, ES, ZS, YS, QS, nb, m, n, s_ab, s_ar, s_ac, s_ur, s_uc, s_vr, s_vc,
                       eps, PIVMIN: tl.constexpr, passes, ortol, rounds, BM: tl.constexpr, BN: tl.constexpr,
                       SECTIONS: tl.constexpr, WANT_UV: tl.constexpr, SPLIT_BACK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    inside = (rows[:, None] < m) & (cols[None, :] < n)
    scratch = pid.to(tl.int64) * 2 * BN                   # this program's T_GK, order 2n
    tile = pid.to(tl.int64) * 2 * BN * BN                 # this program's T_GK eigenvectors and pivots
    for mat in range(pid, nb, programs):
        mat = tl.full([], 0, tl.int64) + mat
        a = tl.load(A + mat * s_ab + rows[:, None] * s_ar + cols[None, :] * s_ac, mask=inside, other=0.0)
        finite = tl.sum(tl.sum(tl.where(tl.abs(a) < float("inf"), 0, 1), axis=1), axis=0) == 0
        a, unit = unit_tile(a)
        uout = U + mat * m * n
        vout = V + mat * n * n
        ruout = (RU if SPLIT_BACK else U) + mat * m * n       # the reflectors' rows
        rvout = (RV if SPLIT_BACK else V) + mat * n * n

        # 1. Golub-Kahan bidiagonalisation: left reflector of column k, right reflector of row k.
        for k in range(0, n):
            v, tau, _ = reflector(tl.sum(tl.where(cols[None, :] == k, a, 0.0), axis=1), rows, k)
            a = a - v[:, None] * (tau * tl.sum(a * v[:, None], axis=0))[None, :]
            if WANT_UV:
                # H_k = I − w wᵀ with w = √τ v, kept in RU's rows (U's storage but in SPLIT_BACK) until step 5.
                tl.store(ruout + k * m + rows, tl.sqrt(tau) * v, mask=rows < m)
            u, tau, _ = reflector(tl.sum(tl.where(rows[:, None] == k, a, 0.0), axis=0), cols, k + 1)
            a = a - (tau * tl.sum(a * u[None, :], axis=1))[:, None] * u[None, :]
            if WANT_UV:
                tl.store(rvout + k * n + cols, tl.sqrt(tau) * u, mask=cols < n)

        # 2. B's diagonal and super-diagonal, scaled to at most 1, interleaved as T_GK's off-diagonal.
        d = tl.sum(tl.where(rows[:, None] == cols[None, :], a, 0.0), axis=0)             # d_j = B[j, j]
        e = tl.sum(tl.where(rows[:, None] == cols[None, :] - 1, a, 0.0), axis=0)         # e_{j-1} = B[j-1, j]
        d = tl.where(cols < n, d, 0.0)
        e = tl.where((cols >= 1) & (cols < n), e, 0.0)                                    # at j: e_{j-1}
        scale = tl.maximum(tl.max(tl.abs(d), axis=0), tl.max(tl.abs(e), axis=0))
        s = tl.where(scale > 0.0, scale, 1.0)
        d = d / s
        e = e / s
        # Gershgorin: row 2j of T_GK holds e_{j-1} and d_j, row 2j+1 holds d_j and e_j.
        e_after = tl.sum(tl.where(cols[:, None] == cols[None, :] - 1, e[None, :], 0.0), axis=1)
        high = tl.max(tl.abs(d) + tl.maximum(tl.abs(e), tl.abs(e_after)), axis=0)
        pad = 4.0 * eps * high + 2.0 * PIVMIN
        tl.debug_barrier()                                # the previous matrix's readers are done
        tl.store(DS + scratch + tl.arange(0, 2 * BN), tl.zeros([2 * BN], dtype=d.dtype))
        tl.store(ES + scratch + 2 * cols, d)
        tl.store(ES + scratch + 2 * cols - 1, e, mask=cols >= 1)
        tl.debug_barrier()

        # 3. Lane j: the (n + j)-th smallest eigenvalue of T_GK, the j-th smallest singular value.
        sigma = sturm_multisection(DS + scratch, ES + scratch, 2 * n, -pad, high + pad, n + cols, passes,
                                   PIVMIN, SECTIONS)
        sigma = tl.maximum(sigma, 0.0)
        tl.store(S + mat * n + (n - 1 - cols), tl.where(finite, sigma * (scale * unit), float("nan")), mask=cols < n)

        if WANT_UV:
            # 4. T_GK's eigenvector of σ_j interleaves v_j (even rows) and u_j (odd rows): B v = σ u.
            z, cluster, clustered = tridiag_eigenvectors(sigma, DS + scratch, ES + scratch, ZS + tile, YS + tile, QS + tile, 2 * n, n,
                                     tl.arange(0, 2 * BN), cols, eps, ortol, rounds, BN, True)
            tl.debug_barrier()
            tl.store(ZS + tile + tl.arange(0, 2 * BN)[:, None] * BN + cols[None, :], z)
            tl.debug_barrier()
            # Each half normalised and orthonormalised within clusters on its own: the other sign's
            # eigenvector -σ_k of T_GK has the same halves up to sign, so its share in lane j's vector,
            # ~ε/(σ_j + σ_k), only rescales the halves where k = j and stays within the cluster
            # otherwise (σ_j + σ_k < ortol puts both in the cluster of σ ≈ 0). In that cluster a half
            # can be short (its vector mostly the other half), and normalising it magnifies its
            # rounding-level share of the other lanes' directions (measured: 8e-5 in fp32 on a rank-4
            # 12×8), so its lanes are also orthogonalised against every other lane.
            smallest = tl.sum(tl.where(cols == 0, sigma, 0.0), axis=0)
            zero = tl.where(smallest <= ortol, tl.sum(tl.where((cluster == 1) & (cols < n), 1, 0), axis=0), 0)
            inner = (cols[:, None] < n) & (cols[None, :] < n)
            zv = unit_columns(tl.load(ZS + tile + (2 * cols)[:, None] * BN + cols[None, :], mask=inner, other=0.0))
            zu = unit_columns(tl.load(ZS + tile + (2 * rows + 1)[:, None] * BN + cols[None, :],
                                      mask=(rows[:, None] < n) & (cols[None, :] < n), other=0.0))
            if clustered or zero > 0:
                zv = orthonormalise_clusters(zv, cols, n, cluster, zero)
                zu = orthonormalise_clusters(zu, cols, n, cluster, zero)
            # 5. Back-transformation: V = G_0 (… (G_{n−1} V_B)), U = H_0 (… (H_{n−1} [U_B; 0])), here or
            # by _reflect_kernel.
            if not SPLIT_BACK:
                for t in range(0, n):
                    k = n - 1 - t
                    w = tl.load(rvout + k * n + cols, mask=cols < n, other=0.0)
                    zv = zv - w[:, None] * tl.sum(w[:, None] * zv, axis=0)[None, :]
                    w = tl.load(ruout + k * m + rows, mask=rows < m, other=0.0)
                    zu = zu - w[:, None] * tl.sum(w[:, None] * zu, axis=0)[None, :]
            zu = tl.where(finite, zu, float("nan"))
            zv = tl.where(finite, zv, float("nan"))
            tl.debug_barrier()                            # every reflector is read
            descending = n - 1 - cols[None, :]
            tl.store(uout + rows[:, None] * s_ur + descending * s_uc, zu, mask=inside)
            tl.store(vout + cols[:, None] * s_vr + descending * s_vc, zv, mask=inner)


def svd_bidiag_launcher(A: Tensor, compute_uv: bool, programs: int | None = None,
                        sections: int | None = None, num_warps: int | None = None, split_back: int | None = None
                        ) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``run(A) -> (U, S, Vh)``, reduced (``U`` and ``Vh`` empty unless ``compute_uv``), for tensors of
    ``A``'s shape, strides, dtype and device: the launch bound once per call signature (the op's plan
    keeps ``run``). ``programs``, ``sections``: as
    :func:`~metalcore.linalg.eigh_tridiag_triton.schedule` (defaults: its rule); ``num_warps``:
    warps a program (default :func:`~metalcore.linalg.eigh_tridiag_triton.chain_warps`); ``split_back``:
    columns a program of the separate back-transformation kernel, 0 for the kernel's own loop (default
    :data:`~metalcore.linalg.eigh_tridiag_triton.SPLIT_BACK_COLUMNS`)."""
    *batch, m, n = A.shape
    k = min(m, n)
    dt, dev = A.dtype, A.device
    nb = math.prod(batch)
    no_vectors = torch.empty(0, dtype=dt, device=dev)
    u_shape, vh_shape = batch + [m, k], batch + [k, n]

    def outputs():
        if not compute_uv:
            return no_vectors, no_vectors
        return torch.empty(u_shape, dtype=dt, device=dev), torch.empty(vh_shape, dtype=dt, device=dev)

    def empty(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        U, Vh = outputs()
        return U, torch.empty(batch + [k], dtype=dt, device=dev), Vh

    if nb == 0 or k == 0:
        return empty
    sa, copy = stack_strides(A)
    wide = m < n
    if wide:                                              # the transpose, through strides
        m, n, sa = n, m, [sa[0], sa[2], sa[1]]
    # The kernel's left factor (m × n, tall) and right factor (n × n) as stored: for a wide A they are
    # Vh's transpose and U.
    su, sv = ((1, m), (n, 1)) if wide else ((n, 1), (1, n))
    BM, BN = block(m), block(n)
    num_warps = num_warps or chain_warps(BM, BN, nb, dev, dt, compute_uv)
    programs, sections = schedule(nb, dev, num_warps, programs, sections)
    split = (SPLIT_BACK_COLUMNS if split_back is None else split_back) if compute_uv else 0
    finfo = torch.finfo(dt)
    launch = _bidiag_svd_kernel.bind((programs,), *[None] * 11, nb, m, n, *sa, *su, *sv, finfo.eps, finfo.tiny,
                                     passes(dt, sections), ORTOL_N / (2 * n), ROUNDS, BM=BM, BN=BN, SECTIONS=sections,
                                     WANT_UV=compute_uv, SPLIT_BACK=split > 0, num_warps=num_warps)
    if split:
        # The left factor's n reflectors have m entries, the right one's n.
        reflect_left = _reflect_kernel.bind((nb, math.ceil(n / split)), None, None, m, n, n, m * n, m * n, *su,
                                            BN=BM, BC=split, num_warps=1)
        reflect_right = _reflect_kernel.bind((nb, math.ceil(n / split)), None, None, n, n, n, n * n, n * n, *sv,
                                             BN=BN, BC=split, num_warps=1)

    def run(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        U, Vh = outputs()
        S = torch.empty(batch + [k], dtype=dt, device=dev)
        lines = torch.empty(2, programs, 2 * BN, dtype=dt, device=dev)
        vectors = torch.empty(3, programs, 2 * BN * BN, dtype=dt, device=dev) if compute_uv else None
        Z, Y, P = vectors if compute_uv else (lines[0],) * 3
        left, right = (Vh, U) if wide else (U, Vh)
        RU, RV = (torch.empty(nb, n, m, dtype=dt, device=dev), torch.empty(nb, n, n, dtype=dt, device=dev)) if split \
            else (left, right)
        launch(as3(A) if copy else A, S, left, right, RU, RV, lines[0], lines[1], Z, Y, P)
        if split:
            reflect_left(RU, left)
            reflect_right(RV, right)
        return U, S, Vh

    return run


def svd_bidiag(A: Tensor, compute_uv: bool = True, programs: int | None = None,
               sections: int | None = None, split_back: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD ``(U, S, Vh)`` of ``A`` ``(*, m, n)`` (both sides ``≤ MAX_N``, float32/float64),
    singular values descending; without ``compute_uv`` ``U`` and ``Vh`` are empty. ``programs``:
    persistent programs (default: as many as the SMs hold); ``sections``: Sturm points a lane and pass
    (default :data:`~metalcore.linalg.eigh_tridiag_triton.SECTIONS` up to one matrix an SM, else 1)."""
    return svd_bidiag_launcher(A, compute_uv, programs, sections, split_back=split_back)(A)

