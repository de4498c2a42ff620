"""Eigenvalues and eigenvectors of symmetric matrices by Householder tridiagonalisation, Sturm
multisection and inverse iteration, one persistent program per matrix, in registers.

Layers: ``_tridiag_eigh_kernel`` → :func:`eigh_tridiag` → the ``tridiag`` path of
``metalcore::eigh`` on the Triton backend (:mod:`metalcore.linalg.eigh_triton`), sides up to the
register tile's :data:`~metalcore.linalg._small_triton.MAX_N` (128). :func:`reflector`,
:func:`sturm_multisection` and :func:`tridiag_eigenvectors` also serve the singular values and vectors
of :mod:`metalcore.linalg.svd_bidiag_triton`.

Why: above n = 32 the Jacobi kernels run hundreds of dependent rounds (the ``shifted`` kernel: ~504
at n = 64, 0.86 ms for 16×64² on the H100) and the table gives eigh to cuSOLVER's batched syev
(16×64² values 0.38 ms, 256×64² 0.63). A tridiagonal reduction has n − 2 dependent steps, and the
eigenvalues of the tridiagonal ``T`` by bisection are independent of each other: one lane per
eigenvalue (bench/linalg_triton.md v14: 100×64² values in 0.16 ms of GPU time on the H100, against
cuSOLVER's 0.38).

1. **Tridiagonalisation** (LAPACK ``sytd2``, lower): the whole matrix as a ``[BN, BN]`` tile, scaled
   to a largest entry of 1; for ``k < n − 2`` the reflector of column ``k`` below the diagonal
   (``dlarfg``; :func:`reflector`), ``p = τ A v``, ``w = p − ½ τ (pᵀv) v``, ``A ← A − v wᵀ − w vᵀ``.
   ``T``'s diagonal and first super-diagonal are then read from the tile and scaled by their largest
   magnitude.
2-3. **Bisection** (LAPACK ``dstebz``'s Sturm counts): lane ``j`` brackets the ``j``-th smallest
   eigenvalue inside Gershgorin's interval; ``count(x)``, the number of eigenvalues below ``x``, is
   the number of negative pivots of ``T − x I`` (``q₀ = d₀ − x``, ``q_i = d_i − x − e²_{i−1}/q_{i−1}``,
   a pivot smaller than ``pivmin`` replaced by ``−pivmin``). Each step halves every lane's bracket;
   :data:`~metalcore.linalg.tridiag_host.BITS` halvings take Gershgorin's width (≤ 3 after scaling)
   below ``ε``; with several points a lane (multisection, :data:`SECTIONS`) each pass of the recurrence does several.
4. **Inverse iteration** (LAPACK ``stein``): lane j solves ``(T − λ_j I) x = z`` through the
   ``L D Lᵀ`` factors of the Sturm recurrence, twice (:data:`ROUNDS`), from pseudo-random vectors,
   with Gram-Schmidt within clusters (:data:`ORTOL_N`) after each solve; eigenvalues closer than
   bisection's error share one shift (:func:`shifts`).
5. **Back-transformation** ``Q Z``: the reflectors of step 1, kept as ``√τ v`` in the rows of the
   output until then, applied to the tile in reverse order.

Accuracy: the reduction is backward stable (``‖A − Q T Qᵀ‖ = O(n ε ‖A‖)``) and bisection finds each
eigenvalue of ``T`` to ``O(ε ‖T‖)``, so the eigenvalues carry ``syev``'s absolute error bound,
``O(n ε ‖A‖)``: what LAPACK's ratio for eigenvalues measures. They come out ascending. NaN or Inf in a
matrix gives NaN eigenvalues (and vectors) for that matrix only. The vectors' residual and
orthogonality are within LAPACK's ratios on every test family, in the interpreter and on the H100
(bench/linalg_triton.md, v18: a group of eigenvalues within bisection's error shares one shift,
:data:`TIGHT`). ``d``, ``e`` and the solves' tiles go through per-program global scratch (the
recurrences read them one entry at a time; registers cannot be indexed by a loop counter).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import helper, jit, program_slots
from metalcore.linalg._small_triton import MAX_N, block, stack_strides, warps
from metalcore.linalg import tridiag_host
from metalcore.linalg.householder_gemm import as3
from metalcore.linalg.tridiag_host import ORTOL_N, ROUNDS, passes

# Multisection: with a program or fewer an SM, the Sturm recurrence's n dependent steps a pass are
# the latency, and 8 points a lane (9 parts a pass, 3.17 bits) take 9 passes instead of 28 in fp32
# for 8 times the divisions, which idle lanes absorb. With many programs an SM the divisions are the
# throughput, and bisection's 28 × 1 is cheapest.
SECTIONS = 8


def chain_warps(rows: int, cols: int, nb: int, device: torch.device, dtype: torch.dtype, vectors: bool) -> int:
    """Warps a program of this module's kernels and the bidiag svd's, for a ``rows × cols`` tile and
    ``nb`` matrices. Each matrix is one program's chain of dependent reductions. More warps shorten
    the chain while a matrix has an SM to itself; fewer put more matrices in flight once they queue.
    Measured on the H100 (132 SMs) from 24² to 128², with vectors (bench/linalg_triton.md v20):
    - fp32 128² tiles: 8 warps beat 16 at every batch (eigh 64×128² 0.91 → 0.86 ms, svd 2.39 → 1.98).
      fp64 lost (svd 64×128² 9.5 → 12.2 ms), and so did eigh's values alone (0.36 → 0.40).
    - 32² tiles, 2 warps by default: 4 up to one matrix an SM (eigh 64×24² 0.069 → 0.051 ms), 1 from
      7 an SM (eigh 1000×32² 0.186 → 0.118, svd 0.421 → 0.277; fp64 likewise).
    - 64² tiles stay at 4 warps. 8 were faster up to one matrix an SM (eigh 100×64² 0.239 → 0.202),
      but gave one LAPACK ratio of 32 among 4096 random fp32 matrices, where 4 gave at most 6.6.
    Everything else keeps :func:`~metalcore.linalg._small_triton.warps`."""
    width = warps(rows * cols)
    if not vectors:
        return width
    slots = program_slots(device)
    if rows == cols == 32:
        return 4 if nb <= slots else 1 if nb >= 7 * slots else width
    return min(8, width) if dtype == torch.float32 else width


def schedule(nb: int, device: torch.device, num_warps: int, programs: int | None,
             sections: int | None) -> tuple[int, int]:
    """``(programs, sections)`` of a launch over ``nb`` matrices, each given value kept: persistent
    programs as many as the SMs hold by warps (64 a Hopper SM), so that per-program scratch does not
    grow with the batch; :data:`SECTIONS` Sturm points a lane up to one matrix an SM, else 1."""
    programs = min(nb, programs or program_slots(device) * max(1, 64 // num_warps))
    if sections is None:
        sections = SECTIONS if nb <= program_slots(device) else 1
    return programs, sections


# The vectors' accuracy design and its measurements: metalcore/linalg/tridiag_host.py (shared with the
# Metal shaders). Kernels read these three as constexprs.
TIGHT = tl.constexpr(tridiag_host.TIGHT)
RHO = tl.constexpr(tridiag_host.RHO)
SEED = tl.constexpr(tridiag_host.SEED)


@helper
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@helper
def reflector(x, rows, k):
    """Householder reflector of ``x``'s entries from ``k`` on (LAPACK ``dlarfg``): ``(v, τ, β)`` with
    ``v_k = 1`` and zero before ``k``, such that ``(I − τ v vᵀ) x`` has ``β`` at ``k`` and zeros after
    it. ``τ = 0`` where nothing is below ``k``. ``x`` may also be a tile with ``rows`` of shape
    ``[len, 1]``: one reflector a column (the band reduction's windows, :mod:`eigh_band_triton`).

    For the kernels' tiles scaled to a largest entry of 1 (:func:`unit_tile`), whose reduced entries
    stay below ~n: the squares cannot overflow, and a square that underflows is an entry below √tiny
    of the tile's largest (1e-19 in fp32), far under ε of it. So the norm needs no scaling by the
    largest entry, and ``x_k`` and the sum of squares below it come from one reduction: one dependent
    cross-warp step where dlarfg's scaled norm took three (bench/linalg_triton.md v22)."""
    x = tl.where(rows >= k, x, 0.0)
    alpha, sigma = tl.reduce((tl.where(rows == k, x, 0.0), tl.where(rows > k, x * x, 0.0)), 0, _add_pairs)
    norm = tl.sqrt(alpha * alpha + sigma)
    beta = tl.where(alpha >= 0.0, -norm, norm)
    trivial = sigma == 0.0
    tau = tl.where(trivial, 0.0, (beta - alpha) / tl.where(trivial, 1.0, beta))
    v = tl.where(rows == k, 1.0, tl.where(rows > k, x / tl.where(trivial, 1.0, alpha - beta), 0.0))
    return v, tau, tl.where(trivial, alpha, beta)


@helper
def unit_tile(a):
    """``(a / s, s)``: the tile scaled by its largest magnitude ``s`` (1 where that is 0 or not finite)."""
    s = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
    s = tl.where((s > 0.0) & (s < float("inf")), s, 1.0)
    return a / s, s


@helper
def sturm_multisection(D, E, length, low, high, index, passes, pivmin, SECTIONS: tl.constexpr):
    """Lane j: the ``index[j]``-th smallest (0-based) eigenvalue of the symmetric tridiagonal matrix
    with diagonal ``D[0:length]`` and off-diagonal ``E[0:length − 1]`` (scratch), inside
    ``[low, high]``. Each pass counts the eigenvalues below ``SECTIONS`` points of every bracket —
    the negative pivots of ``T − x I`` (``q₀ = d₀ − x``, ``q_i = d_i − x − e²_{i−1}/q_{i−1}``, a pivot
    smaller than ``pivmin`` replaced by ``−pivmin``; LAPACK ``dstebz``) — and keeps the part that
    holds the eigenvalue. ``pivmin``: a ``tl.constexpr`` from the kernel (the dtype's smallest
    normal): Triton passes a Python float argument as fp32, which makes float64's 2.2e-308 zero, and a
    zero pivot followed by ``e = 0`` (a split ``T``) turns the rest of the recurrence into NaN."""
    left = low + tl.zeros_like(index).to(low.dtype)
    right = high + tl.zeros_like(index).to(low.dtype)
    parts = (tl.arange(0, SECTIONS) + 1).to(low.dtype) / (SECTIONS + 1)
    for _ in range(0, passes):
        x = left[:, None] + (right - left)[:, None] * parts[None, :]
        q = tl.load(D) - x
        q = tl.where(tl.abs(q) < pivmin, -pivmin, q)
        count = tl.where(q < 0.0, 1, 0)
        for i in range(1, length):
            e_i = tl.load(E + i - 1)
            q = (tl.load(D + i) - x) - e_i * e_i / q
            q = tl.where(tl.abs(q) < pivmin, -pivmin, q)
            count += tl.where(q < 0.0, 1, 0)
        above = count > index[:, None]                    # the eigenvalue is below x
        right = tl.minimum(right, tl.min(tl.where(above, x, right[:, None]), axis=1))
        left = tl.maximum(left, tl.max(tl.where(above, left[:, None], x), axis=1))
    return 0.5 * (left + right)


@helper
def unit_columns(z):
    """Each column of ``z`` scaled to unit 2-norm (by its largest entry first, so that no square
    overflows)."""
    m = tl.max(tl.abs(z), axis=0)
    z = z / tl.where(m > 0.0, m, 1.0)[None, :]
    return z / tl.sqrt(tl.maximum(tl.sum(z * z, axis=0), 1.0))[None, :]


@helper
def clusters(lam, cols, lanes, ortol):
    """``(cluster, clustered)`` of the ascending eigenvalues ``lam`` (lane j for ``lam[j]``, ``lanes``
    of them): lane j's cluster number, which neighbours closer than ``ortol`` share, and whether any
    lane has a cluster mate."""
    before = tl.sum(tl.where(cols[:, None] == cols[None, :] - 1, lam[:, None], 0.0), axis=0)   # lam[j − 1]
    starts = (cols == 0) | (lam - before > ortol)
    cluster = tl.cumsum(starts.to(tl.int32), axis=0)
    clustered = tl.sum(tl.where((cols < lanes) & (cols > 0) & (lam - before <= ortol), 1, 0), axis=0) > 0
    return cluster, clustered


@helper
def shifts(lam, cols, lanes, eps, MIRRORED: tl.constexpr):
    """Lane j's shift for inverse iteration: ``lam[j]``, or the shift its group shares (:data:`TIGHT`,
    :data:`RHO`). ``MIRRORED``: the spectrum also holds ``−lam`` (T_GK of the singular values),
    outside every group of lanes."""
    group, _ = clusters(lam, cols, lanes, TIGHT * eps)
    valid = cols < lanes
    same = (group[:, None] == group[None, :]) & valid[:, None] & valid[None, :]
    lo = tl.min(tl.where(same, lam[None, :], float("inf")), axis=1)
    hi = tl.max(tl.where(same, lam[None, :], -float("inf")), axis=1)
    size = tl.sum(same.to(tl.int32), axis=1)
    outside = valid[None, :] & (group[:, None] != group[None, :])
    # Distances from the group to its nearest eigenvalue below and above (8: T's spectrum is in [−3, 3]).
    below = tl.min(tl.where(outside & (lam[None, :] < lo[:, None]), lo[:, None] - lam[None, :], 8.0), axis=1)
    above = tl.min(tl.where(outside & (lam[None, :] > hi[:, None]), lam[None, :] - hi[:, None], 8.0), axis=1)
    if MIRRORED:
        below = tl.minimum(below, lo + tl.min(tl.where(valid, lam, float("inf")), axis=0))
    width = hi - lo
    offset = tl.maximum(width, 8.0 * eps)
    shared = tl.where(below >= above, lo - offset, hi + offset)
    distance = tl.minimum(tl.maximum(below, above) - offset, tl.minimum(below, above) + width + offset)
    use = (size > 1) & (width + offset <= RHO * tl.sqrt(eps) * distance)
    return tl.where(use, shared, lam)


@helper
def _orthonormalise_lane(z, cols, j, mates):
    """Column ``j`` of ``z`` orthogonalised against the columns ``mates`` (orthonormal; classical
    Gram-Schmidt, twice) and scaled to unit 2-norm."""
    column = cols[None, :] == j
    zj = tl.sum(tl.where(column, z, 0.0), axis=1)
    for _pass in tl.static_range(2):
        c = tl.where(mates, tl.sum(z * zj[:, None], axis=0), 0.0)
        zj = zj - tl.sum(z * c[None, :], axis=1)
    zj = zj / tl.sqrt(tl.sum(zj * zj, axis=0))
    return tl.where(column, zj[:, None], z)


@helper
def orthonormalise_clusters(z, cols, lanes, cluster, whole):
    """The columns of ``z`` (unit 2-norm) orthonormalised within each cluster in lane order, and the
    first ``whole`` lanes (a cluster, or 0) last, against every other lane: their columns may carry
    the other lanes' directions at more than rounding level (the singular vectors' halves of
    σ ≈ 0, :mod:`metalcore.linalg.svd_bidiag_triton`)."""
    # Only lanes with an earlier mate do work (~5-10% of 128 random eigenvalues): a step from one to
    # the next costs two reductions, where visiting every lane cost two a lane.
    first = tl.min(tl.where(cluster[:, None] == cluster[None, :], cols[None, :], lanes), axis=1)
    todo = (cols >= tl.maximum(whole, 1)) & (cols < lanes) & (cols > first)
    j = tl.min(tl.where(todo, cols, lanes), axis=0)
    while j < lanes:
        j_first = tl.sum(tl.where(cols == j, first, 0), axis=0)
        z = _orthonormalise_lane(z, cols, j, (cols < j) & (cols >= j_first))
        j = tl.min(tl.where(todo & (cols > j), cols, lanes), axis=0)
    for j in range(0, whole):
        z = _orthonormalise_lane(z, cols, j, (cols < lanes) & ((cols >= whole) | (cols < j)))
    return z


@helper
def tridiag_eigenvectors(lam, D, E, ZS, YS, QS, order, lanes, rows, cols, eps, ortol, rounds, BC: tl.constexpr,
                         MIRRORED: tl.constexpr):
    """Eigenvectors of the scaled symmetric tridiagonal ``T`` of order ``order`` (diagonal at ``D``,
    off-diagonal at ``E``) as the columns of a ``[len(rows), BC]`` tile, lane ``j < lanes`` for the
    eigenvalue ``lam[j]`` (ascending; stein's inverse iteration; ``MIRRORED`` as in :func:`shifts`).
    ``ZS``, ``YS``, ``QS``: scratch tiles of ``len(rows) × BC``, row stride ``BC``. Also returns
    :func:`clusters` of ``lam``."""
    cluster, clustered = clusters(lam, cols, lanes, ortol)
    at = rows[:, None] * BC + cols[None, :]
    shift = shifts(lam, cols, lanes, eps, MIRRORED)

    # 4a. Pivots of T − σ_j I = L D Lᵀ (the Sturm recurrence), lane j; a pivot below ε becomes ±ε,
    # which bounds the solve's growth (T is scaled to entries at most 1). Stored as 1/q, so that a
    # solve step is one multiply-add.
    q = tl.load(D) - shift
    q = tl.where(tl.abs(q) < eps, tl.where(q < 0.0, -eps, eps), q)
    tl.store(QS + cols, 1.0 / q)
    for i in range(1, order):
        e_i = tl.load(E + i - 1)
        q = (tl.load(D + i) - shift) - e_i * (e_i / q)
        q = tl.where(tl.abs(q) < eps, tl.where(q < 0.0, -eps, eps), q)
        tl.store(QS + i * BC + cols, 1.0 / q)

    # 4b. Inverse iteration from pseudo-random vectors: each round solves (T − λ_j I) x_j = z_j, then
    # orthogonalises within clusters.
    z = tl.where(rows[:, None] < order, tl.rand(SEED, at) - 0.5, 0.0).to(lam.dtype)
    for _ in range(0, rounds):
        tl.debug_barrier()                                # every lane's reads of the last round are done
        tl.store(ZS + at, z)
        tl.debug_barrier()
        r = tl.load(QS + cols)
        y = tl.load(ZS + cols)
        tl.store(YS + cols, y * r)
        # Each step's loads are issued a step ahead: only the multiply-add is on the dependent chain.
        e_n = tl.load(E)
        z_n = tl.load(ZS + BC + cols, mask=order > 1, other=0.0)
        r_n = tl.load(QS + BC + cols, mask=order > 1, other=1.0)
        for i in range(1, order):                         # L y = z, then D⁻¹ y
            l_i = e_n * r
            z_i = z_n
            r = r_n
            nxt = tl.minimum(i + 1, order - 1)
            e_n = tl.load(E + nxt - 1)
            z_n = tl.load(ZS + nxt * BC + cols)
            r_n = tl.load(QS + nxt * BC + cols)
            y = z_i - l_i * y
            tl.store(YS + i * BC + cols, y * r)
        tl.debug_barrier()
        x = tl.load(YS + (order - 1) * BC + cols)
        tl.store(ZS + (order - 1) * BC + cols, x)
        i0 = tl.maximum(order - 2, 0)
        y_n = tl.load(YS + i0 * BC + cols)
        c_n = tl.load(E + i0) * tl.load(QS + i0 * BC + cols)
        for t in range(0, order - 1):                     # Lᵀ x = D⁻¹ y, bottom up
            i = order - 2 - t
            y_i = y_n
            c_i = c_n
            nxt = tl.maximum(i - 1, 0)
            y_n = tl.load(YS + nxt * BC + cols)
            c_n = tl.load(E + nxt) * tl.load(QS + nxt * BC + cols)
            x = y_i - c_i * x
            tl.store(ZS + i * BC + cols, x)
        tl.debug_barrier()
        z = unit_columns(tl.load(ZS + at, mask=rows[:, None] < order, other=0.0))
        if clustered:
            z = orthonormalise_clusters(z, cols, lanes, cluster, 0)
    return tl.where(cols[None, :] < lanes, z, 0.0), cluster, clustered


@helper
def reflect_columns(z, W, rows, length, count):
    """``H_0 (H_1 (… (H_{count−1} z)))`` for the columns of the tile ``z``, with ``H_k = I − w_k w_kᵀ``
    and ``w_k`` the ``length`` entries at ``W + k · length``. The next reflector is loaded a step
    ahead, off the chain of reductions."""
    w = tl.load(W + (count - 1) * length + rows, mask=(rows < length) & (count >= 1), other=0.0)
    for t in range(0, count):
        w_next = tl.load(W + (count - 2 - t) * length + rows, mask=(rows < length) & (t < count - 1), other=0.0)
        z = z - w[:, None] * tl.sum(w[:, None] * z, axis=0)[None, :]
        w = w_next
    return z


@jit
def _reflect_kernel(R, Q, length, count, ncols, s_rb, s_qb, s_qr, s_qc, BN: tl.constexpr, BC: tl.constexpr):
    """The back-transformation of the eigh and svd kernels' ``SPLIT_BACK`` mode: program
    ``(matrix, block)`` applies the matrix's ``count`` reflectors (rows of ``length`` entries at ``R``,
    matrix stride ``s_rb``) to ``BC`` of the ``ncols`` columns of its ``Z`` (at ``Q``, strides
    ``s_qb``, ``s_qr``, ``s_qc``), in place. A ``[BN, BC]`` tile of one warp reduces by shuffles
    alone, where the eigh kernel's ``[BN, BN]`` tile crosses warps through shared memory at every
    reflector."""
    mat = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BN)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    at = mat * s_qb + rows[:, None] * s_qr + cols[None, :] * s_qc
    inside = (rows[:, None] < length) & (cols[None, :] < ncols)
    z = tl.load(Q + at, mask=inside, other=0.0)
    tl.store(Q + at, reflect_columns(z, R + mat * s_rb, rows, length, count), mask=inside)


@jit
def _tridiag_eigh_kernel(A, L, V, R, DS, ES, ZS, YS, QS, nb, n, s_ab, s_ar, s_ac, eps, PIVMIN: tl.constexpr,
                         iterations, ortol, rounds, BN: tl.constexpr, UPPER: tl.constexpr, WANT_V: tl.constexpr,
                         SECTIONS: tl.constexpr, SPLIT_BACK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BN)
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    hi = tl.maximum(rows[:, None], cols[None, :])
    lo = tl.minimum(rows[:, None], cols[None, :])
    scratch = pid.to(tl.int64) * BN                       # this program's d and e
    tile = pid.to(tl.int64) * BN * BN                     # this program's Z and pivots
    for mat in range(pid, nb, programs):
        mat = tl.full([], 0, tl.int64) + mat              # 64-bit offsets (65536 × 128² > 2³¹ bytes)
        base = A + mat * s_ab
        vout = V + mat * n * n
        rout = (R if SPLIT_BACK else V) + mat * n * n     # the reflectors' rows
        if UPPER:
            a = tl.load(base + lo * s_ar + hi * s_ac, mask=inside, other=0.0)
        else:
            a = tl.load(base + hi * s_ar + lo * s_ac, mask=inside, other=0.0)
        finite = tl.sum(tl.sum(tl.where(tl.abs(a) < float("inf"), 0, 1), axis=1), axis=0) == 0
        a, unit = unit_tile(a)

        # 1. Householder tridiagonalisation, lower (sytd2): A = Q T Qᵀ, Q = H_0 … H_{n−3}.
        for k in range(0, n - 2):
            x = tl.sum(tl.where(cols[None, :] == k, a, 0.0), axis=1)
            v, tau, _ = reflector(x, rows, k + 1)
            if WANT_V:
                # H_k = I − w wᵀ with w = √τ v (τ ∈ {0} ∪ [1, 2]), kept in row k of V until step 5.
                tl.store(rout + k * n + rows, tl.sqrt(tau) * v, mask=rows < n)
            p = tau * tl.sum(a * v[None, :], axis=1)
            w = p - (0.5 * tau * tl.sum(p * v, axis=0)) * v
            a = a - v[:, None] * w[None, :] - w[:, None] * v[None, :]

        # 2. T's diagonal and super-diagonal, scaled to at most 1, into scratch for the recurrences.
        d = tl.sum(tl.where(cols[None, :] == rows[:, None], a, 0.0), axis=1)
        e = tl.sum(tl.where(cols[None, :] == rows[:, None] + 1, a, 0.0), axis=1)   # e_i = T[i, i+1]
        d = tl.where(rows < n, d, 0.0)
        e = tl.where(rows < n - 1, e, 0.0)
        scale = tl.maximum(tl.max(tl.abs(d), axis=0), tl.max(tl.abs(e), axis=0))
        s = tl.where(scale > 0.0, scale, 1.0)
        d = d / s
        e = e / s
        e_before = tl.sum(tl.where(cols[None, :] == rows[:, None] - 1, a, 0.0), axis=1) / s   # T[i, i-1]
        e_before = tl.where((rows >= 1) & (rows < n), e_before, 0.0)
        radius = tl.abs(e) + tl.abs(e_before)
        low = tl.min(tl.where(rows < n, d - radius, float("inf")), axis=0)
        high = tl.max(tl.where(rows < n, d + radius, -float("inf")), axis=0)
        # Gershgorin's interval holds every eigenvalue of T; the margin covers its own rounding.
        pad = 4.0 * eps * tl.maximum(tl.abs(low), tl.abs(high)) + 2.0 * PIVMIN
        low = low - pad
        high = high + pad
        tl.debug_barrier()                                # the previous matrix's readers are done
        tl.store(DS + scratch + rows, d)
        tl.store(ES + scratch + rows, e)
        tl.debug_barrier()

        # 3. Multisection, lane j for the j-th smallest eigenvalue.
        lam = sturm_multisection(DS + scratch, ES + scratch, n, low, high, rows, iterations, PIVMIN, SECTIONS)
        # × scale, not s: the zero matrix's eigenvalues are exactly 0, not bisection's ±pivmin.
        tl.store(L + mat * n + rows, tl.where(finite, lam * (scale * unit), float("nan")), mask=rows < n)

        if WANT_V:
            z, _, _ = tridiag_eigenvectors(lam, DS + scratch, ES + scratch, ZS + tile, YS + tile, QS + tile, n, n, rows, cols,
                                     eps, ortol, rounds, BN, False)
            # 5. Back-transformation, Q Z = H_0 (H_1 (… (H_{n−3} Z))), here or by _reflect_kernel.
            if not SPLIT_BACK:
                tl.debug_barrier()
                z = reflect_columns(z, rout, rows, n, n - 2)
            z = tl.where(finite, z, float("nan"))
            tl.debug_barrier()
            tl.store(vout + rows[:, None] * n + cols[None, :], z, mask=inside)


# Columns a program of _reflect_kernel, one warp each; 0 keeps the back-transformation in the eigh
# kernel (the default until an H100 run times the split: bench/linalg_triton.md v23).
SPLIT_BACK_COLUMNS = 0


def eigh_tridiag_launcher(A: Tensor, upper: bool, compute_v: bool, programs: int | None = None,
                          num_warps: int | None = None, sections: int | None = None,
                          split_back: int | None = None) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``run(A) -> (L, Q)`` for tensors of ``A``'s shape, strides, dtype and device (``Q`` empty
    unless ``compute_v``): the launch bound once per call signature (the op's plan keeps ``run``).
    ``programs``: persistent programs, each looping over every ``programs``-th matrix (default: as
    many as the SMs hold); ``num_warps``: warps a program (default :func:`chain_warps`);
    ``sections``: points a lane in each pass of the Sturm recurrence, a power of two (default
    :data:`SECTIONS` up to one matrix an SM, else 1); ``split_back``: columns a program of the
    separate back-transformation kernel (``_reflect_kernel``), 0 for the eigh kernel's own loop
    (default :data:`SPLIT_BACK_COLUMNS`)."""
    *batch, n, _ = A.shape
    nb = math.prod(batch)
    dt, dev = A.dtype, A.device
    no_vectors = torch.empty(0, dtype=dt, device=dev)
    if nb == 0 or n == 0:
        return lambda A: (torch.empty(batch + [n], dtype=dt, device=dev),
                          torch.empty(batch + [n, n], dtype=dt, device=dev) if compute_v else no_vectors)
    sa, copy = stack_strides(A)
    BN = block(n)
    num_warps = num_warps or chain_warps(BN, BN, nb, dev, dt, compute_v)
    programs, sections = schedule(nb, dev, num_warps, programs, sections)   # scratch: 3 BN² a program
    split = (SPLIT_BACK_COLUMNS if split_back is None else split_back) if compute_v else 0
    finfo = torch.finfo(dt)
    launch = _tridiag_eigh_kernel.bind((programs,), None, None, None, None, None, None, None, None, None, nb, n,
                                       *sa, finfo.eps, finfo.tiny, passes(dt, sections), ORTOL_N / n, ROUNDS,
                                       BN=BN, UPPER=upper, WANT_V=compute_v, SECTIONS=sections,
                                       SPLIT_BACK=split > 0, num_warps=num_warps)
    if split:
        reflect = _reflect_kernel.bind((nb, math.ceil(n / split)), None, None, n, n - 2, n, n * n, n * n, n, 1,
                                       BN=BN, BC=split, num_warps=1)

    def run(A: Tensor) -> tuple[Tensor, Tensor]:
        L = torch.empty(batch + [n], dtype=dt, device=dev)
        Q = torch.empty(batch + [n, n], dtype=dt, device=dev) if compute_v else no_vectors
        vectors = torch.empty(3, programs, BN * BN, dtype=dt, device=dev) if compute_v else None
        lines = torch.empty(2, programs, BN, dtype=dt, device=dev)
        Z, Y, P = vectors if compute_v else (lines[0],) * 3
        R = torch.empty(nb, n, n, dtype=dt, device=dev) if split else Q
        launch(as3(A) if copy else A, L, Q, R, lines[0], lines[1], Z, Y, P)
        if split:
            reflect(R, Q)
        return L, Q

    return run


def eigh_tridiag(A: Tensor, upper: bool, compute_v: bool, programs: int | None = None,
                 num_warps: int | None = None, sections: int | None = None, split_back: int | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Eigenvalues, ascending, of the symmetric matrices ``A`` ``(*, n, n)`` (``n ≤ MAX_N``,
    float32/float64) from the triangle ``upper`` names, and with ``compute_v`` their orthonormal
    eigenvectors as ``Q``'s columns (else ``Q`` is empty)."""
    return eigh_tridiag_launcher(A, upper, compute_v, programs, num_warps, sections, split_back)(A)
