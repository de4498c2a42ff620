"""Symmetric eigendecomposition of many small matrices by parallel Jacobi held in registers.

Layers: ``_register_eigh_kernel`` → :func:`eigh_registers` (called by the ``triton`` implementation
of ``metalcore::eigh`` in :mod:`metalcore.linalg.eigh_triton` for ``n ≤ REGISTER_MAX_N``).

Why a second Jacobi kernel: the scratch kernel of ``eigh_triton`` gives each matrix one program
and moves the rotated rows through global memory with a block barrier per half-round, so at
n ≤ 32 a program spends its time on latency (1000×32: 1.04 ms on the H100, ~3 µs a round). Here
``G`` matrices share a program as a ``[G, BN, BN]`` register tile (``_small_triton.group``), and a
round of the tournament rotates all its ``N/2`` pairs at once without memory traffic:

* every index ``i`` has a partner ``π(i)`` (``_jacobi_triton.round_partner``); the partner's row
  is fetched with ``tl.gather`` along the row axis (a shuffle or one trip through shared memory,
  chosen by the compiler), so ``Jᵀ A`` is ``c_i A[i,:] + σ_i s_i A[π(i),:]`` with ``σ = −1`` for the
  smaller index of a pair, ``+1`` for the larger; ``(Jᵀ A) J`` likewise along columns, and
  ``Vᵀ ← Jᵀ Vᵀ`` like the rows;
* both members of a pair compute the same rotation from the same three numbers (``a_pp``, ``a_qq``
  and ``a_pq`` read at the smaller index), and the 2×2 block is set to its exact result as in the
  scratch kernel;
* thresholds, scaling by ``max|a|``, in-band NaN for non-convergence and NaN input, and the
  ascending sort are those of ``eigh_triton`` (its docstring gives the reasons).

No global scratch, no explicit barrier, and the loop condition is a reduction over the whole
program, so it is uniform across threads.

Work per round: 3 gathers and ~12 elementwise passes over ``[G, BN, BN]`` (×2 with vectors) and
2 row reductions; ``N − 1`` rounds a sweep.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl
from torch import Tensor

from metalcore.linalg import _jacobi_triton as jac
from metalcore.linalg._jacobi_triton import round_partner, scaled, schur_rotation, symmetric_tile
from metalcore.linalg._small_triton import block, group, warps
from metalcore._triton import jit


@jit
def _register_eigh_kernel(A, W, V, SW, nb, n, s_ab, s_ar, s_ac, tol, floor, max_sweeps,
                          G: tl.constexpr, BN: tl.constexpr, UPPER: tl.constexpr, WANT_V: tl.constexpr,
                          WANT_SWEEPS: tl.constexpr, IEEE32: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    live = g < nb
    r = tl.arange(0, BN)
    g3 = g[:, None, None]
    r3 = r[None, :, None]                       # row index
    c3 = r[None, None, :]                       # column index
    r2 = r[None, :]
    inside = live[:, None, None] & (r3 < n) & (c3 < n)
    a, scale, bad_input = scaled(symmetric_tile(A, g3, r3, c3, s_ab, s_ar, s_ac, inside, UPPER))
    diag3 = r3 == c3
    vt = tl.where(diag3 & (g3 >= 0), 1.0, 0.0).to(a.dtype)          # row i = column i of V
    N = n + n % 2
    zero3 = tl.zeros([G, BN, BN], dtype=tl.int32)

    sweep = 0
    rotated = 1
    while (sweep < max_sweeps) & (rotated > 0):
        busy = tl.zeros([G], dtype=tl.int32)
        for t in range(N - 1):
            part = round_partner(r, t, N)                            # [BN]
            first = r < part                                          # the pair's smaller index
            # a_pp, a_qq, a_pq of each pair, read at its smaller index so both members agree.
            d = tl.sum(tl.where(diag3, a, 0.0), axis=2)                                     # [G, BN]
            off = tl.sum(tl.where(c3 == part[None, :, None], a, 0.0), axis=2)              # a[i, π(i)]
            part2 = part[None, :] + tl.zeros([G, BN], dtype=tl.int32)
            d_part = tl.gather(d, part2, axis=1)
            off_lo = tl.where(first[None, :], off, tl.gather(off, part2, axis=1))
            app = tl.where(first[None, :], d, d_part)
            aqq = tl.where(first[None, :], d_part, d)
            mag = tl.abs(off_lo)
            act = (live[:, None] & (r2 < n) & (part[None, :] < n) & (part[None, :] != r2)
                   & (mag > tol * tl.sqrt(tl.abs(app)) * tl.sqrt(tl.abs(aqq))) & (mag > floor))
            c, s, tt = schur_rotation(app, aqq, off_lo, act, IEEE32)
            ss = tl.where(first[None, :], -s, s)                                            # σ_i s_i
            busy += tl.sum(act.to(tl.int32), axis=1)
            # Jᵀ A: rows.
            rows = part[None, :, None] + zero3
            a = c[:, :, None] * a + ss[:, :, None] * tl.gather(a, rows, axis=1)
            if WANT_V:
                vt = c[:, :, None] * vt + ss[:, :, None] * tl.gather(vt, rows, axis=1)
            # (Jᵀ A) J: columns; then the exact 2×2 block of each active pair.
            cols = part[None, None, :] + zero3
            a = c[:, None, :] * a + ss[:, None, :] * tl.gather(a, cols, axis=2)
            fix = act[:, :, None]
            newd = d + tl.where(first[None, :], -tt, tt) * off_lo
            a = tl.where(fix & diag3, newd[:, :, None], tl.where(fix & (c3 == part[None, :, None]), 0.0, a))
        rotated = tl.sum(busy, axis=0)
        sweep += 1

    d = tl.sum(tl.where(diag3, a, 0.0), axis=2)                                               # [G, BN]
    # Non-convergence is known per program, not per matrix: a per-matrix count carried out of the loop
    # crashed Triton's TritonGPURemoveLayoutConversions pass on sm_90 (H100 run 2026-12-06). So a matrix
    # that misses the sweep bound turns the G − 1 others of its program NaN too (NaN input stays
    # per matrix: bad_input is known before the loop).
    bad = (rotated > 0) | bad_input | (tl.max((d != d).to(tl.int32), axis=1) > 0)
    key = tl.where((r2 < n) & (d == d), d, float("inf"))        # NaN-free keys: ranks stay a permutation
    key_i = key[:, :, None]
    key_j = key[:, None, :]
    before = (key_j < key_i) | ((key_j == key_i) & (c3 < r3))
    rank = tl.sum(before.to(tl.int32), axis=2)                                                 # [G, BN]
    out_ok = live[:, None] & (r2 < n)
    tl.store(W + g[:, None] * n + rank, tl.where(bad[:, None], float("nan"), d * scale[:, None]), mask=out_ok)
    if WANT_V:
        # vt[g, i, j] = V[j, i]: row i goes to column rank[i].
        tl.store(V + g3 * n * n + c3 * n + rank[:, :, None], tl.where(bad[:, None, None], float("nan"), vt),
                 mask=inside)
    if WANT_SWEEPS:
        tl.store(SW + g, sweep + tl.zeros([G], dtype=tl.int32), mask=live)


# The register tile holds A and Vᵀ: at n = 32, 2·1024 values, 16 a thread at 4 warps.
REGISTER_MAX_N = 32


def eigh_registers(A: Tensor, upper: bool, compute_v: bool, *, matrices_per_program: int | None = None,
                   num_warps: int | None = None, sweeps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(L, Q)`` of the symmetric matrices ``A`` ``(*, n, n)``, ``n ≤ REGISTER_MAX_N``.
    ``matrices_per_program`` and ``num_warps`` override the launch shape (for the device sweep);
    ``sweeps``, an int32 tensor of the batch's size, receives each matrix's sweep count."""
    n = A.shape[-1]
    L, Q, A3 = jac.eigh_outputs(A, compute_v)
    nb = A3.shape[0]
    if nb == 0 or n == 0:
        return L, Q
    finfo = torch.finfo(A.dtype)
    BN = block(n)
    G = matrices_per_program or group(nb, BN * BN * (2 if compute_v else 1), A.device)
    _register_eigh_kernel[(-(-nb // G),)](
        A3, L, Q if compute_v else L, L if sweeps is None else sweeps, nb, n,
        A3.stride(0), A3.stride(1), A3.stride(2), math.sqrt(n) * finfo.eps, finfo.eps, jac.MAX_SWEEPS,
        G=G, BN=BN, UPPER=upper, WANT_V=compute_v, WANT_SWEEPS=sweeps is not None,
        IEEE32=A.dtype == torch.float32, num_warps=num_warps or warps(G * BN * BN * (2 if compute_v else 1)))
    return L, Q
