"""Pieces shared by the Jacobi kernels (:mod:`metalcore.linalg.eigh_triton`, ``svd_triton``).

Design: each program keeps the vectors Jacobi rotates (the rows of ``A`` for eigh, the columns of
``A`` for svd, and those of ``V``) as rows of a private scratch buffer in global memory. A sweep is
``N − 1`` rounds of the round-robin tournament (``N`` = ``n`` rounded up to even); in a round the
``N/2`` disjoint pairs ``(p_k, q_k)`` are read as two ``[N/2, BN]`` tiles through gathered
pointers, rotated, and stored back, with a ``tl.debug_barrier()`` (``bar.sync``, which also orders
the block's global accesses) before the next dependent load. A round thus costs ``O(N·BN)`` loads,
stores and flops, against the ``BN³`` of the earlier kernels, which formed the permuted copy
``A P`` with a 0/1 ``tl.dot`` product every round. The scratch rows are written and re-read by the
same program within microseconds, so they stay in L1/L2 (64×64 fp32 is 16 KB).

Why not registers only: Triton gives no way to exchange rows of a distributed tile except through
a product, a reduction or a reshape/``tl.join``/``tl.split`` chain, which the compiler lowers to a
round trip through shared memory anyway (a layout conversion) plus the index shuffling to move the
round-robin partners next to each other; the scratch buffer does the same round trip with one
gathered load, in the order we choose, and no ``BN³`` term.

Round-robin (circle method): in round ``t``, index ``N − 1`` is fixed and pairs with ``t``; for
``k = 1 … N/2 − 1`` index ``(t + k) mod (N − 1)`` pairs with ``(t − k) mod (N − 1)``. Every pair
meets once per sweep. A pair that involves the padding index ``n`` (``n`` odd) never rotates.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import helper, next_power_of_2
from metalcore.linalg._small_triton import batched

# Jacobi converges quadratically once the off-diagonal is small: 6-10 sweeps at n ≤ 128 in fp32/
# fp64. 30 is LAPACK gesvj's bound; more than that means the input is not a matrix Jacobi can
# finish, and the result is reported as NaN.
MAX_SWEEPS = 30
# The one-sided (svd) kernels are launched with FMA contraction off. Their α = ‖a_p‖², β, γ are
# butterfly reductions across lanes; contracted, lane L computes fma(x_L, x_L, x²_{L^4}) and lane
# L^4 fma(x_{L^4}, x_{L^4}, x²_L), which differ in the last bit, so for a pair near the threshold
# one lane rotated and another did not, the per-lane rotation counts differed, and the warp split
# at the sweep loop's exit: lanes that left waited in a full-mask shuffle of the epilogue for lanes
# still in the loop (the H100 hang at n ≤ 8; sm_90 PTX, bench/linalg_triton.md v5). Uncontracted,
# each butterfly step adds the same two rounded numbers in both lanes: every lane gets the same bits.
# (The two-sided eigh kernels decide from loaded or exactly extracted entries, never from a sum of
# products, and need no such care.)
FP_FUSION = False


@helper
def round_pairs(t, N, BH: tl.constexpr):
    """Pairs of round ``t``: ``p``, ``q`` as ``[BH]`` index vectors; entries ``k ≥ N/2`` are
    padding (``valid`` false)."""
    k = tl.arange(0, BH)
    last = N - 1
    p = tl.where(k == 0, t, (t + k) % last)
    q = tl.where(k == 0, last, (t - k + last) % last)
    valid = k < N // 2
    return tl.where(valid, p, 0), tl.where(valid, q, 0), valid


@helper
def round_partner(i, t, N):
    """Partner of index ``i`` in round ``t`` of the same tournament, as an index vector (the
    register kernels rotate every pair at once through a gather by partner): ``N − 1`` meets ``t``,
    any other ``i`` meets ``(2t − i) mod (N − 1)``; indices ``≥ N`` (padding) meet themselves."""
    last = N - 1
    other = tl.where(i == t, last, (2 * t - i + 2 * last) % last)
    return tl.where(i >= N, i, tl.where(i == last, t, other))


@helper
def schur_rotation(app, aqq, apq, act, IEEE32: tl.constexpr):
    """The symmetric Schur rotation that zeroes ``apq``: returns ``(c, s, t)`` with ``t = s/c``,
    identity (``c = 1``, ``s = 0``, exact) where ``act`` is false. ``t = sign(ζ)/(|ζ| + √(1+ζ²))``,
    ``ζ = (aqq − app)/(2 apq)``, written so that ``ζ²`` cannot overflow. In fp32 the divisions and
    square roots are the IEEE-rounded ones (Triton's defaults are the approximate instructions,
    2 ulp): ``c² + s²`` then differs from 1 by about one ulp, and the ~n² rotations a vector sees
    do not drift off orthonormal."""
    if IEEE32:
        zeta = tl.div_rn(aqq - app, tl.where(act, 2.0 * apq, 1.0))
        az = tl.abs(zeta)
        big = az > 1.0
        inv = tl.div_rn(1.0, tl.where(big, az, 1.0))
        hyp = tl.where(big, az * tl.sqrt_rn(1.0 + inv * inv), tl.sqrt_rn(1.0 + az * az))
        t = tl.where(act, tl.div_rn(tl.where(zeta >= 0.0, 1.0, -1.0), az + hyp), 0.0)
        c = tl.div_rn(1.0, tl.sqrt_rn(1.0 + t * t))
    else:
        zeta = (aqq - app) / tl.where(act, 2.0 * apq, 1.0)
        az = tl.abs(zeta)
        big = az > 1.0
        inv = 1.0 / tl.where(big, az, 1.0)
        hyp = tl.where(big, az * tl.sqrt(1.0 + inv * inv), tl.sqrt(1.0 + az * az))
        t = tl.where(act, tl.where(zeta >= 0.0, 1.0, -1.0) / (az + hyp), 0.0)
        c = 1.0 / tl.sqrt(1.0 + t * t)
    return c, c * t, t


@helper
def rotate_rows(base, p, q, valid, c, s, stride, length, BL: tl.constexpr, SPLIT: tl.constexpr = False):
    """Rows ``p_k``, ``q_k`` (``length`` contiguous entries, rows ``stride`` apart) of the scratch
    at ``base`` become ``c x − s y`` and ``s x + c y``. Every valid pair is rewritten; an inactive
    one has ``c = 1``, ``s = 0`` and keeps its values exactly. ``SPLIT``: a barrier between the
    loads and the stores, needed where the tile is replicated across threads (see
    :func:`replicated`)."""
    cols = tl.arange(0, BL)[None, :]
    mask = valid[:, None] & (cols < length)
    xp = base + p[:, None] * stride + cols
    yp = base + q[:, None] * stride + cols
    x = tl.load(xp, mask=mask, other=0.0)
    y = tl.load(yp, mask=mask, other=0.0)
    if SPLIT:
        tl.debug_barrier()
    tl.store(xp, c[:, None] * x - s[:, None] * y, mask=mask)
    tl.store(yp, s[:, None] * x + c[:, None] * y, mask=mask)


@helper
def scaled(a):
    """The matrices of ``a`` ``[G, R, C]`` divided by their largest magnitude: ``(a / s, s, bad)``
    with ``s`` 1 for a zero matrix, and ``bad`` ``[G]`` marking a matrix that holds a NaN or an
    infinity (zeroed, so the sweeps run on finite numbers; ``tl.max`` skips NaN)."""
    bad = tl.max(tl.max(((a != a) | (tl.abs(a) == float("inf"))).to(tl.int32), axis=2), axis=1) > 0
    amax = tl.max(tl.max(tl.abs(a), axis=2), axis=1)
    scale = tl.where((amax > 0.0) & (bad == 0), amax, 1.0)
    return tl.where(bad[:, None, None], 0.0, a / scale[:, None, None]), scale, bad


@helper
def symmetric_tile(A, g3, i3, j3, s_ab, s_ar, s_ac, mask, UPPER: tl.constexpr):
    """Entry ``(i, j)`` of each symmetric matrix, read from its stored triangle only: ``(max, min)``
    for the lower one, ``(min, max)`` for the upper."""
    hi = tl.maximum(i3, j3)
    lo = tl.minimum(i3, j3)
    if UPPER:
        return tl.load(A + g3 * s_ab + lo * s_ar + hi * s_ac, mask=mask, other=0.0)
    return tl.load(A + g3 * s_ab + hi * s_ar + lo * s_ac, mask=mask, other=0.0)


@helper
def row_norms(x):
    """``‖x_j‖`` for the rows of ``x`` ``[G, R, C]``, as ``m·‖x_j/m‖`` with ``m = max|x_j|``: no square
    underflows or overflows."""
    m = tl.max(tl.abs(x), axis=2)
    u = x / tl.where(m > 0.0, m, 1.0)[:, :, None]
    return m * tl.sqrt(tl.sum(u * u, axis=2))


@helper
def one_sided_sweeps(x, vt, n, live, tol, tiny, max_sweeps, WANT_V: tl.constexpr, IEEE32: tl.constexpr):
    """One-sided Jacobi on the columns held as the rows of ``x`` ``[G, BN, B]`` (``n`` of them; every
    entry at most ~``n`` in size, so that no square overflows), the rotations applied to the rows of
    ``vt`` ``[G, BN, BN]`` too with ``WANT_V``: rounds of the tournament until a sweep rotates nothing
    or ``max_sweeps``. Every pair of a round at once: the partner row comes from ``tl.gather`` along
    the row axis, ``α_j = ‖x_j‖²`` and ``γ_j = x_jᵀ x_π(j)`` are row reductions (the same products summed
    in the same order for both members of a pair), ``β = α_π(j)`` a gather, and ``x_j ← c x_j + σ_j s
    x_π(j)`` (``σ = −1`` on the pair's smaller index). A pair rotates while ``|γ| > tol·√α·√β`` and
    ``|γ| > tiny``. Returns ``(x, vt, sweeps, rotated)``: ``rotated > 0`` means no convergence (counted
    over the program's ``G`` matrices)."""
    G: tl.constexpr = x.shape[0]
    BN: tl.constexpr = x.shape[1]
    rj = tl.arange(0, BN)
    j2 = rj[None, :]
    N = n + n % 2
    zero_x = tl.zeros(x.shape, dtype=tl.int32)
    zero_v = tl.zeros(vt.shape, dtype=tl.int32)
    zero_r = tl.zeros([G, BN], dtype=tl.int32)
    sweep = 0
    rotated = 1
    while (sweep < max_sweeps) & (rotated > 0):
        busy = tl.zeros([G], dtype=tl.int32)
        for t in range(N - 1):
            part = round_partner(rj, t, N)
            first = rj < part
            y = tl.gather(x, part[None, :, None] + zero_x, axis=1)
            alpha = tl.sum(x * x, axis=2)
            gamma = tl.sum(x * y, axis=2)
            beta = tl.gather(alpha, part[None, :] + zero_r, axis=1)
            app = tl.where(first[None, :], alpha, beta)
            aqq = tl.where(first[None, :], beta, alpha)
            mag = tl.abs(gamma)
            act = (live[:, None] & (j2 < n) & (part[None, :] < n) & (part[None, :] != j2)
                   & (mag > tol * tl.sqrt(app) * tl.sqrt(aqq)) & (mag > tiny))
            c, s, tt = schur_rotation(app, aqq, gamma, act, IEEE32)
            ss = tl.where(first[None, :], -s, s)
            busy += tl.sum(act.to(tl.int32), axis=1)
            x = c[:, :, None] * x + ss[:, :, None] * y
            if WANT_V:
                vt = c[:, :, None] * vt + ss[:, :, None] * tl.gather(vt, part[None, :, None] + zero_v, axis=1)
        rotated = tl.sum(busy, axis=0)
        sweep += 1
    return x, vt, sweep, rotated


@helper
def permute_rows(t, src):
    """Rows of ``t`` ``[G, R, C]`` reordered: row ``r`` of the result is row ``src[:, r]``."""
    return tl.gather(t, src[:, :, None] + tl.zeros(t.shape, dtype=tl.int32), axis=1)


@helper
def descending_rank(key, rj):
    """The position ``[G, BN]`` of each entry of ``key`` in descending order (ties by index): a
    permutation, as long as ``key`` is free of NaN."""
    before = (key[:, None, :] > key[:, :, None]) | ((key[:, None, :] == key[:, :, None])
                                                    & (rj[None, None, :] < rj[None, :, None]))
    return tl.sum(before.to(tl.int32), axis=2)


@helper
def descending_order(key, rj):
    """``src`` ``[G, BN]`` with ``key[src[:, r]]`` descending in ``r`` (ties by index); ``key`` must be
    free of NaN."""
    rank = descending_rank(key, rj)
    return tl.sum(tl.where(rank[:, None, :] == rj[None, :, None], rj[None, None, :], 0), axis=2)


@helper
def nonfinite(a):
    """Whether the tile holds a NaN or an infinity (``tl.max`` skips NaN, so scaling alone would
    not carry it to the outputs)."""
    bad = (a != a) | (tl.abs(a) == float("inf"))
    return tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0


def block_of(n: int) -> int:
    """Padded side ``BN`` (a power of two, at least 2, so that the ``BN/2`` pairs tile is not empty)."""
    return next_power_of_2(max(n, 2))


def replicated(rows: int, cols: int, num_warps: int) -> bool:
    """Whether a ``[rows, cols]`` tile has fewer elements than the program has threads. Triton then
    gives several threads the same element (at ``BN = 8`` with 2 warps, the ``[4, 8]`` pair tile
    lives whole in each warp), and each of them loads, rotates and stores it: without a barrier
    between the loads and the stores, a thread may load a row another one has already rotated and
    store it rotated twice. Within one warp the lanes run the loads and stores in lockstep, but
    nothing in the programming model promises it."""
    return rows * cols < 32 * num_warps


def jacobi_warps(BN: int, svd: bool) -> int:
    """Warps per Jacobi program, from the H100 sweep (bench/linalg_triton.md v4): one warp up to
    ``BN = 16``; from ``BN = 32`` twice what the pair tile's size alone would give (the rounds are
    latency chains over the scratch rows, and more warps keep more of a round's loads in flight):
    2 at 32 (eigh 1000×32 1.04 vs 1.18 ms, svd 0.73 vs 0.90), 8 at 64 (eigh 100×64 1.40 vs 1.79,
    svd 1.13 vs 1.38); at 128, 16 for svd (7.9 vs 8.3 ms) but 8 for eigh (10.1 vs 12.1)."""
    if BN <= 16:
        return 1
    if BN == 32:
        return 2
    if BN == 64:
        return 8
    return 16 if svd else 8



def eigh_outputs(A: Tensor, compute_v: bool) -> tuple[Tensor, Tensor, Tensor]:
    """What every eigh launcher starts from: empty ``L`` ``(*, n)`` and ``Q`` ``(*, n, n)`` (a ``(0,)``
    placeholder without ``compute_v``), and ``A`` as an ``(nb, n, n)`` stack."""
    L = torch.empty(A.shape[:-1], dtype=A.dtype, device=A.device)
    Q = torch.empty(A.shape, dtype=A.dtype, device=A.device) if compute_v else A.new_empty(0)
    return L, Q, batched(A)


def svd_outputs(X: Tensor, compute_uv: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What every one-sided Jacobi launcher starts from: empty ``S`` ``(*, n)``, ``W`` ``(*, m, n)``
    and ``V`` ``(*, n, n)`` (``S`` stands in for both without ``compute_uv``), and ``X`` as an
    ``(nb, m, n)`` stack."""
    *batch, m, n = X.shape
    S = torch.empty(*batch, n, dtype=X.dtype, device=X.device)
    W = torch.empty(*batch, m, n, dtype=X.dtype, device=X.device) if compute_uv else S
    V = torch.empty(*batch, n, n, dtype=X.dtype, device=X.device) if compute_uv else S
    return S, W, V, batched(X)
