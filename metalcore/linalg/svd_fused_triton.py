"""The whole QR-preconditioned one-sided Jacobi SVD of small matrices in one launch, in registers.

Layers: ``_fused_svd_kernel`` → :func:`svd_fused` → ``svd_triton.svd_launch(..., registers=True)``
(the ``registers`` path of ``metalcore::svd``) for sides up to :data:`MAX_N`.

Why one launch: the chain it replaces (``svd_triton.svd_launch`` with the register Jacobi) made ~12
kernel launches and ~20 other aten calls a call — column sort, Householder QR with ``Q``, Jacobi,
``Q V``, a second Householder QR, signs, unsort — and on the H100 it took 0.54 ms at 500×16² against
0.19 ms for the Jacobi launch alone without the QR step (bench/linalg_triton.md v9).

Per program, ``G`` matrices ``X`` (``M × N``, ``M ≥ N``; a wide ``A`` arrives as ``Aᵀ`` through its
strides) as a ``[G, BN, BM]`` tile whose row ``j`` is column ``j`` of ``X`` (the register Jacobi's
layout, :mod:`metalcore.linalg.svd_batched_triton`):

1. ``X`` divided by ``max|x|``; columns ordered by descending ``max|x_ij|`` (``svd.sort_columns``'s
   cheap stand-in for column pivoting, Drmač & Veselić): ``X P``.
2. Householder QR ``X P = Q R`` (LAPACK ``geqr2``'s reflectors, norms as ``s·‖x/s‖``); the
   reflectors stay in a second tile, and row ``j`` of ``R`` is collected as it is finished, so
   ``Rᵀ`` needs no transpose.
3. One-sided Jacobi on ``Rᵀ`` (``N × N``; the register kernel's rounds, thresholds and sweep bound):
   ``Rᵀ V_x = W``; columns then sorted by descending ``‖w_j‖``.
4. ``U = Q [V_x; 0]``: the reflectors applied backwards to ``V_x`` (no explicit ``Q``).
5. ``V = P Q_W`` with ``Q_W`` the Householder ``Q`` of ``W`` signed by ``diag R_W``: ``W``'s columns
   are orthogonal to the Jacobi tolerance, so that is ``W`` with normalized columns, and it stays
   orthonormal where a singular value is zero (rank-deficient input). ``P`` is applied by the
   store's addresses.

Work per matrix: ``N`` QR steps over ``[BN, BM]``, the Jacobi rounds over ``[BN, BN]`` (6-10 sweeps
of ``N − 1``), then ``N`` steps that each reflect ``U`` back once and take one step of ``W``'s QR (two
independent chains, so their latencies overlap), and ``N`` steps forming ``Q_W``: about ``3N``
dependent steps besides the rounds, each a few row reductions like a Jacobi round.
Non-convergence and NaN/Inf input give NaN in every output of that matrix (a program's
non-convergence marks its ``G`` matrices, as in the register Jacobi kernel). Launched without FMA
contraction (``_jacobi_triton.FP_FUSION``: the rotation decisions must agree between lanes).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import cdiv, helper, jit
from metalcore.linalg import _jacobi_triton as jac
from metalcore.linalg._jacobi_triton import descending_order, one_sided_sweeps, permute_rows, row_norms, scaled
from metalcore.linalg._small_triton import block, group, stack_strides
from metalcore.linalg.householder_gemm import as3
from metalcore.linalg.qr_triton import reflector

# The five tiles of a 32×32 matrix (X, reflectors, Rᵀ, Vᵀ, U) are 5120 values: 40 a thread at 4 warps.
MAX_N = 32


@helper
def qr_step(a, hv, taus, diag, j, rj, r):
    """Step ``j`` of the Householder QR of the ``[G, BN, B]`` tile ``a`` (row ``k`` = column ``k``):
    column ``j`` becomes ``β e_j`` below its first ``j`` entries and the reflector is applied to
    the columns after it; the reflector is stored as row ``j`` of ``hv``, ``τ`` and ``β`` (``diag R``)
    as entry ``j`` of ``taus`` and ``diag``. Rows ``≤ j`` of ``a`` are final after it."""
    j3 = rj[None, :, None]
    r3 = r[None, None, :]
    x = tl.sum(tl.where(j3 == j, a, 0.0), axis=1)                         # [G, B]: column j
    v, tau, beta = reflector(x, j, r)
    w = tl.sum(a * v[:, None, :], axis=2)                                  # [G, BN]: vᵀ a_k
    a = tl.where(j3 > j, a - (tau[:, None] * w)[:, :, None] * v[:, None, :], a)
    a = tl.where((j3 == j) & (r3 >= j), tl.where(r3 == j, beta[:, None, None], 0.0), a)
    hv = tl.where(j3 == j, v[:, None, :], hv)
    taus = tl.where(rj[None, :] == j, tau[:, None], taus)
    diag = tl.where(rj[None, :] == j, beta[:, None], diag)
    return a, hv, taus, diag


@helper
def reflect_step(q, hv, taus, j, rj):
    """``H_j q`` for the columns held as rows of ``q`` ``[G, C, B]``: reflector ``j`` is row ``j`` of
    ``hv`` ``[G, BN, B]``, ``τ_j`` entry ``j`` of ``taus``."""
    v = tl.sum(tl.where(rj[None, :, None] == j, hv, 0.0), axis=1)          # [G, B]
    tau = tl.sum(tl.where(rj[None, :] == j, taus, 0.0), axis=1)            # [G]
    w = tl.sum(q * v[:, None, :], axis=2)                                  # [G, C]
    return q - (tau[:, None] * w)[:, :, None] * v[:, None, :]


@jit
def _fused_svd_kernel(X, U, S, VT, SW, nb, m, n, s_xb, s_xr, s_xc, s_ub, s_ur, s_uc, s_vb, s_vr, s_vc,
                      tol, tiny, max_sweeps, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      WANT_UV: tl.constexpr, WANT_SWEEPS: tl.constexpr, IEEE32: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    live = g < nb
    rj = tl.arange(0, BN)
    ri = tl.arange(0, BM)
    g3 = g[:, None, None]
    j3 = rj[None, :, None]                      # column of X (tile row)
    i3 = ri[None, None, :]                      # row of X (tile column)
    l3 = rj[None, None, :]                      # row index in the N × N tiles
    j2 = rj[None, :]
    inside = live[:, None, None] & (j3 < n) & (i3 < m)
    a = tl.load(X + g3 * s_xb + i3 * s_xr + j3 * s_xc, mask=inside, other=0.0)
    a, scale, bad_input = scaled(a)

    # 1-2. X P = Q R, the columns by descending max-norm; Jacobi's tile is Rᵀ.
    order = descending_order(tl.where(j2 < n, tl.max(tl.abs(a), axis=2), -1.0), rj)
    a = permute_rows(a, order)
    hv = tl.zeros([G, BN, BM], dtype=a.dtype)
    taus = tl.zeros([G, BN], dtype=a.dtype)
    dr = tl.zeros([G, BN], dtype=a.dtype)                            # diag R: not needed here
    x = tl.zeros([G, BN, BN], dtype=a.dtype)
    for j in range(n):
        a, hv, taus, dr = qr_step(a, hv, taus, dr, j, rj, ri)
        # Row j of R is final: R[j, k] = a[k, j], which is row j of the tile of Rᵀ.
        row = tl.sum(tl.where(i3 == j, a, 0.0), axis=2)                    # [G, BN]
        x = tl.where(j3 == j, tl.where(l3 >= j, row[:, None, :], 0.0), x)

    # 3. One-sided Jacobi on the columns of Rᵀ (N × N), Vᵀ accumulated; svd_batched_triton's rounds.
    vt = tl.where((j3 == l3) & (g3 >= 0), 1.0, 0.0).to(a.dtype)      # row j = column j of V_x
    x, vt, sweep, rotated = one_sided_sweeps(x, vt, n, live, tol, tiny, max_sweeps, WANT_UV, IEEE32)

    sv = row_norms(x)                                                      # ‖w_j‖
    bad = (rotated > 0) | bad_input | (tl.max((sv != sv).to(tl.int32), axis=1) > 0)
    rank_src = descending_order(tl.where((j2 < n) & (sv == sv), sv, -1.0), rj)
    sv = tl.gather(sv, rank_src, axis=1)
    tl.store(S + g[:, None] * n + j2, tl.where(bad[:, None], float("nan"), sv * scale[:, None]),
             mask=live[:, None] & (j2 < n))
    if WANT_UV:
        x = permute_rows(x, rank_src)
        vt = permute_rows(vt, rank_src)
        # 4-5, as two independent chains in one loop (their latencies overlap): U = Q [V_x; 0], the
        # reflectors applied backwards to V_x's columns (its row j filled just before H_j, the first
        # reflector that reads it), and the Householder QR of W.
        if BM == BN:
            u = vt
        else:
            u = tl.zeros([G, BN, BM], dtype=a.dtype)
        hw = tl.zeros([G, BN, BN], dtype=a.dtype)
        tw = tl.zeros([G, BN], dtype=a.dtype)
        dw = tl.zeros([G, BN], dtype=a.dtype)
        for t in range(n):
            j = n - 1 - t
            if BM != BN:
                u = tl.where(i3 == j, tl.sum(tl.where(l3 == j, vt, 0.0), axis=2)[:, :, None], u)
            u = reflect_step(u, hv, taus, j, rj)
            x, hw, tw, dw = qr_step(x, hw, tw, dw, t, rj, rj)
        tl.store(U + g3 * s_ub + i3 * s_ur + j3 * s_uc, tl.where(bad[:, None, None], float("nan"), u),
                 mask=inside)
        # 5. V = P Q_W diag(sign R_W): row k of Q_W goes to row order[k] of V.
        q = tl.where((j3 == l3) & (g3 >= 0), 1.0, 0.0).to(a.dtype)
        for t in range(n):
            q = reflect_step(q, hw, tw, n - 1 - t, rj)
        q = q * tl.where(dw < 0.0, -1.0, 1.0)[:, :, None]                   # q[c, k] = V_P[k, c]
        tl.store(VT + g3 * s_vb + order[:, None, :] * s_vr + j3 * s_vc,
                 tl.where(bad[:, None, None], float("nan"), q), mask=live[:, None, None] & (j3 < n) & (l3 < n))
    if WANT_SWEEPS:
        tl.store(SW + g, sweep + tl.zeros([G], dtype=tl.int32), mask=live)


def launch_warps(BN: int, nb: int, dtype: torch.dtype, compute_uv: bool) -> int:
    """Warps per program, from the H100 (bench/results/svd-fused-warps-h100-20261206.log, ms per call
    at 1 / 2 / 4 / 8 warps): one wherever the chain of rounds binds — 500×16² 0.108 / 0.134 / 0.150 /
    0.209, 4096×8² 0.095 / 0.160 / 0.245 / 0.452, 1000×32² 0.516 / 0.643 / 0.662 / 0.956 — and for
    values only at every point measured. With vectors at ``BN = 32`` the five tiles (5120 values)
    spill from one warp's registers, which costs once the card is full: 65536×32² 79.6 / 36.3 / 32.2
    / 52.9, fp64 1000×32² 3.16 / 1.84 / 1.94 / 2.48. Batches between 1000 and 65536 were not timed;
    the selection table times the path as this gives it."""
    if not compute_uv or BN < 32:
        return 1
    if dtype == torch.float64:
        return 2
    return 1 if nb <= 1024 else 4


def svd_fused_launcher(A: Tensor, full_matrices: bool, compute_uv: bool, *, matrices_per_program: int | None = None,
                       num_warps: int | None = None, want_sweeps: bool = False
                       ) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """``run(A, sweeps=None) -> (U, S, Vᴴ)`` for tensors of ``A``'s shape, strides, dtype and device:
    :func:`svd_fused` with its launch bound once per call signature (the op's plan keeps ``run``)."""
    *batch, m, n = A.shape
    k = min(m, n)
    if full_matrices and m != n:
        raise ValueError(f"svd_fused: full_matrices needs a square input, got {m}x{n}")
    dev, dt = A.device, A.dtype
    nb = math.prod(batch)
    shapes = (batch + [k], batch + [m, k], batch + [k, n])

    def outputs(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        S = torch.empty(shapes[0], dtype=dt, device=dev)
        if not compute_uv:
            return A.new_empty(0), S, A.new_empty(0)
        return torch.empty(shapes[1], dtype=dt, device=dev), S, torch.empty(shapes[2], dtype=dt, device=dev)

    if nb == 0 or k == 0:
        return lambda A, sweeps=None: outputs(A)
    # The kernel factors X = A (tall) or X = Aᵀ (wide; A = V' S U'ᵀ from Aᵀ = U' S V'ᵀ): its U' and
    # V' are stored through strides into U and Vᴴ, or into Vᴴ and U.
    sx, copy = stack_strides(A)
    if m >= n:
        M, su, sv = m, (m * k, k, 1), (k * n, 1, n)
    else:
        M, sx, su, sv = n, [sx[0], sx[2], sx[1]], (k * n, 1, n), (m * k, k, 1)
    finfo = torch.finfo(dt)
    BM, BN = block(M), block(k)
    G = matrices_per_program or group(nb, 3 * BN * BM + 2 * BN * BN, dev)
    launch = _fused_svd_kernel.bind(
        (cdiv(nb, G),), None, None, None, None, None, nb, M, k, *sx, *su, *sv,
        k * finfo.eps, finfo.tiny / finfo.eps, jac.MAX_SWEEPS, G=G, BM=BM, BN=BN, WANT_UV=compute_uv,
        WANT_SWEEPS=want_sweeps, IEEE32=dt == torch.float32,
        num_warps=num_warps or launch_warps(BN, nb, dt, compute_uv), enable_fp_fusion=jac.FP_FUSION)

    def run(A: Tensor, sweeps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        U, S, Vh = outputs(A)
        Ut, Vt = (U, Vh) if m >= n else (Vh, U)
        launch(as3(A) if copy else A, Ut if compute_uv else S, S, Vt if compute_uv else S,
               S if sweeps is None else sweeps)
        return U, S, Vh

    return run


def svd_fused(A: Tensor, full_matrices: bool, compute_uv: bool, *, matrices_per_program: int | None = None,
              num_warps: int | None = None, sweeps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, Vᴴ)`` of ``A`` ``(*, m, n)``, both sides at most :data:`MAX_N`, float32/float64, in one
    launch; ``full_matrices`` only where it changes nothing (``m == n``) or is false — the caller
    keeps the Householder chain for complete bases of rectangular input. ``sweeps`` (int32, one entry
    per matrix) receives each program's sweep count."""
    return svd_fused_launcher(A, full_matrices, compute_uv, matrices_per_program=matrices_per_program,
                              num_warps=num_warps, want_sweeps=sweeps is not None)(A, sweeps)
