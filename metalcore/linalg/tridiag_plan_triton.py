"""The torch steps around the any-order tridiagonal solver's kernels, fused: one Triton program a matrix
for :func:`~metalcore.linalg.tridiag_host.prepare` (scale, split, each row's block, Gershgorin's
interval) and one for :func:`~metalcore.linalg.tridiag_host.vector_plan` (shifts, clusters, the
clustered lanes), with the same arithmetic as the torch steps, which stay the Metal backend's and the
reference these kernels are tested against.

Why: stage 3's torch steps were 86 dispatches a call for the values and 188 with the vectors, most
of them kernels (``bench/scripts/tridiag_glue_count.py``, 64 × 256): ~5 µs of host time each eager,
and in the CUDA graph that replays the two-stage path (:mod:`metalcore._graphs`) still a dependent
kernel node of a few µs of GPU time each, for work of ``O(n)`` a matrix. Fused: 16 and 31 dispatches,
of which 4 and 7 compute (the final sort, scaling and order) beside the two launches.

Each program walks its matrix in tiles of ``BLOCK`` entries, carrying the running maximum (first
rows) or minimum (last rows) of a segmented scan from tile to tile, so that nothing in registers
grows with ``n``. Work: a few passes over ``O(n)`` entries a matrix; at n = 4096, 4 tiles a pass.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import helper, jit, next_power_of_2
from metalcore.linalg.tridiag_host import ORTOL_N, RHO, SPLIT, TIGHT, Problem

# Entries a tile: 8 a thread at 4 warps.
BLOCK = 1024


@helper
def _larger(a, b):
    return tl.maximum(a, b)


@helper
def _smaller(a, b):
    return tl.minimum(a, b)


@jit
def _prepare_kernel(d, e, D, E, FIRST_ROW, LAST_ROW, LOW, HIGH, SCALE, FINITE, n, tau, EPS: tl.constexpr,
                    TINY: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``matrix``: :func:`~metalcore.linalg.tridiag_host.prepare` of the rows of ``n`` at ``d``,
    ``e``: ``D``, ``E`` scaled to ``max(|d|, |e|) = 1`` (zeros for a matrix with NaN or Inf,
    ``FINITE`` 0), ``E = 0`` where ``|E| ≤ tau`` (a split) and in its last column, each row's block
    ``FIRST_ROW`` … ``LAST_ROW``, Gershgorin's ``LOW``, ``HIGH`` widened by their rounding, ``SCALE``.
    ``EPS``, ``TINY``: the dtype's; constexpr because a float argument reaches compiled code as fp32,
    where float64's ``tiny`` is 0."""
    mat = tl.program_id(0).to(tl.int64)
    d += mat * n
    e += mat * n
    D += mat * n
    E += mat * n
    lanes = tl.arange(0, BLOCK)
    dt = D.dtype.element_ty
    # Whether every entry is finite (NaN compares false), and the largest magnitude.
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    big = tl.zeros([BLOCK], dtype=dt)
    for i0 in range(0, n, BLOCK):
        i = i0 + lanes
        x = tl.abs(tl.load(d + i, mask=i < n, other=0.0))
        y = tl.abs(tl.load(e + i, mask=i < n - 1, other=0.0))
        bad += tl.where((x < float("inf")) & (y < float("inf")), 0, 1)
        big = tl.maximum(big, tl.maximum(x, y))
    finite = tl.sum(bad, axis=0) == 0
    scale = tl.where(finite, tl.max(big, axis=0), 0.0)
    s = tl.where(scale > 0.0, scale, 1.0)
    # Forward: D and the split E, each row's block's first row, Gershgorin's interval.
    first_carry = 0
    low = tl.full([BLOCK], float("inf"), dt)
    high = tl.full([BLOCK], -float("inf"), dt)
    for i0 in range(0, n, BLOCK):
        i = i0 + lanes
        inside = i < n
        x = tl.where(finite, tl.load(d + i, mask=inside, other=0.0) / s, 0.0)
        y = tl.where(finite, tl.load(e + i, mask=i < n - 1, other=0.0) / s, 0.0)
        before = tl.where(finite, tl.load(e + i - 1, mask=(i >= 1) & inside, other=0.0) / s, 0.0)
        cut = (tl.abs(y) <= tau) & (i < n - 1)            # T splits below row i
        cut_before = (tl.abs(before) <= tau) & (i >= 1)   # … above row i
        y = tl.where(cut, 0.0, y)
        before = tl.where(cut_before, 0.0, before)
        tl.store(D + i, x, mask=inside)
        tl.store(E + i, y, mask=inside)
        first = tl.associative_scan(tl.where((i == 0) | cut_before, i, 0), 0, _larger)
        first = tl.maximum(first, first_carry)
        tl.store(FIRST_ROW + mat * n + i, first, mask=inside)
        first_carry = tl.max(tl.where(inside, first, 0), axis=0)
        radius = tl.abs(y) + tl.abs(before)
        low = tl.minimum(low, tl.where(inside, x - radius, float("inf")))
        high = tl.maximum(high, tl.where(inside, x + radius, -float("inf")))
    low, high = tl.min(low, axis=0), tl.max(high, axis=0)
    pad = 4.0 * EPS * tl.maximum(tl.abs(low), tl.abs(high)) + 2.0 * TINY
    tl.store(LOW + mat, low - pad)
    tl.store(HIGH + mat, high + pad)
    tl.store(SCALE + mat, scale)
    tl.store(FINITE + mat, finite)
    # Backward: each row's block's last row.
    last_carry = n - 1
    tiles = tl.cdiv(n, BLOCK)
    for t in range(0, tiles):
        i = (tiles - 1 - t) * BLOCK + lanes
        y = tl.where(finite, tl.load(e + i, mask=i < n - 1, other=0.0) / s, 0.0)
        ends = (tl.abs(y) <= tau) | (i >= n - 1)
        last = tl.associative_scan(tl.where(ends, i, n - 1), 0, _smaller, reverse=True)
        last = tl.minimum(last, last_carry)
        tl.store(LAST_ROW + mat * n + i, last, mask=i < n)
        last_carry = tl.min(last, axis=0)


@jit
def _vector_plan_kernel(LS, FIRST_ROW, SHIFT, FIRST, TODO, COUNT, n, tight, ortol, rho, floor, BLOCK: tl.constexpr):
    """Program ``matrix``: :func:`~metalcore.linalg.tridiag_host.vector_plan` of the scaled eigenvalues
    ``LS`` (ascending within each block of rows ``FIRST_ROW``): each lane's ``SHIFT`` (its group's, for
    eigenvalues within ``tight`` of each other whose shared shift stays ``rho``-close enough, with
    ``floor`` its least offset, else its own eigenvalue), its cluster's ``FIRST`` lane (eigenvalues
    within ``ortol``), the clustered lanes ``TODO`` ascending, padded with ``n``, and their ``COUNT``.
    ``TODO`` holds each lane's group's first lane in between."""
    mat = tl.program_id(0).to(tl.int64)
    LS += mat * n
    FIRST_ROW += mat * n
    FIRST += mat * n
    TODO += mat * n
    lanes = tl.arange(0, BLOCK)
    # Forward: each lane's group's and cluster's first lane; groups and clusters start with a block.
    group_carry = 0
    cluster_carry = 0
    for i0 in range(0, n, BLOCK):
        i = i0 + lanes
        inside = i < n
        lam = tl.load(LS + i, mask=inside, other=0.0)
        gap = lam - tl.load(LS + i - 1, mask=(i >= 1) & inside, other=0.0)
        block = tl.load(FIRST_ROW + i, mask=inside, other=0) == i
        group = tl.maximum(tl.associative_scan(tl.where(block | (gap > tight), i, 0), 0, _larger), group_carry)
        cluster = tl.maximum(tl.associative_scan(tl.where(block | (gap > ortol), i, 0), 0, _larger), cluster_carry)
        tl.store(TODO + i, group, mask=inside)
        tl.store(FIRST + i, cluster, mask=inside)
        group_carry = tl.max(tl.where(inside, group, 0), axis=0)
        cluster_carry = tl.max(tl.where(inside, cluster, 0), axis=0)
    tl.debug_barrier()
    # Backward: each lane's group's last lane, then the group's shared shift or the lane's own value.
    last_carry = n - 1
    tiles = tl.cdiv(n, BLOCK)
    for t in range(0, tiles):
        i = (tiles - 1 - t) * BLOCK + lanes
        inside = i < n
        lam = tl.load(LS + i, mask=inside, other=0.0)
        following = (i + 1 >= n) | (tl.load(FIRST_ROW + i + 1, mask=i + 1 < n, other=0) == i + 1)
        ends = following | (tl.load(LS + i + 1, mask=i + 1 < n, other=0.0) - lam > tight)
        last = tl.minimum(tl.associative_scan(tl.where(ends, i, n - 1), 0, _smaller, reverse=True), last_carry)
        last_carry = tl.min(last, axis=0)
        first = tl.load(TODO + i, mask=inside, other=0)
        lo = tl.load(LS + first, mask=inside, other=0.0)
        hi = tl.load(LS + last, mask=inside, other=0.0)
        # Distances to the block's nearest eigenvalue below and above (8: the spectrum is in [−3, 3]).
        starts_block = tl.load(FIRST_ROW + first, mask=inside, other=0) == first
        below = tl.where(starts_block, 8.0, lo - tl.load(LS + tl.maximum(first - 1, 0), mask=inside, other=0.0))
        after = tl.minimum(last + 1, n - 1)
        ends_block = (last == n - 1) | (tl.load(FIRST_ROW + after, mask=inside, other=0) == last + 1)
        above = tl.where(ends_block, 8.0, tl.load(LS + after, mask=inside, other=0.0) - hi)
        width = hi - lo
        offset = tl.maximum(width, floor)
        shared = tl.where(below >= above, lo - offset, hi + offset)
        distance = tl.minimum(tl.maximum(below, above) - offset, tl.minimum(below, above) + width + offset)
        use = (last > first) & (width + offset <= rho * distance)
        tl.store(SHIFT + mat * n + i, tl.where(use, shared, lam), mask=inside)
    tl.debug_barrier()
    # The clustered lanes (an earlier cluster mate), ascending, then the padding.
    count = 0
    for i0 in range(0, n, BLOCK):
        i = i0 + lanes
        clustered = tl.load(FIRST + i, mask=i < n, other=n) < tl.minimum(i, n)
        place = count + tl.cumsum(clustered.to(tl.int32), axis=0) - 1
        tl.store(TODO + place, i, mask=clustered)
        count += tl.sum(clustered.to(tl.int32), axis=0)
    for i0 in range(0, n, BLOCK):
        i = i0 + lanes
        tl.store(TODO + i, n, mask=(i >= count) & (i < n))
    tl.store(COUNT + mat, count)


def _block(n: int, block: int | None) -> int:
    return block or min(BLOCK, next_power_of_2(n))


def prepare(d: Tensor, e: Tensor, *, block: int | None = None) -> Problem:
    """:func:`~metalcore.linalg.tridiag_host.prepare` in one launch: ``T(d, e)`` (``(nb, n)`` each) scaled,
    split, each row's block, Gershgorin's interval. ``block``: entries a tile (tests make it small)."""
    nb, n = d.shape
    dt, dev = d.dtype, d.device
    finfo = torch.finfo(dt)
    D, E = torch.empty(nb, n, dtype=dt, device=dev), torch.empty(nb, n, dtype=dt, device=dev)
    first_row, last_row = (torch.empty(nb, n, dtype=torch.int32, device=dev) for _ in range(2))
    low, high, scale = (torch.empty(nb, dtype=dt, device=dev) for _ in range(3))
    finite = torch.empty(nb, dtype=torch.bool, device=dev)
    # The split threshold reaches compiled code as fp32: for float64 it is rounded by ≤ 6e-8 of itself,
    # so an off-diagonal within that of the threshold may split where the torch steps would not.
    _prepare_kernel[(nb,)](d.contiguous(), e.contiguous(), D, E, first_row, last_row, low, high, scale, finite, n,
                           SPLIT * math.sqrt(n) * finfo.eps, EPS=finfo.eps, TINY=finfo.tiny,
                           BLOCK=_block(n, block), num_warps=4)
    return Problem(D, E, scale, finite, first_row, last_row, low, high)


def vector_plan(problem: Problem, LS: Tensor, *, block: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`~metalcore.linalg.tridiag_host.vector_plan` in one launch: ``(shift, first, todo, count)``
    of the values kernel's ``LS``."""
    nb, n = LS.shape
    eps = torch.finfo(LS.dtype).eps
    shift = torch.empty_like(LS)
    first, todo = (torch.empty(nb, n, dtype=torch.int32, device=LS.device) for _ in range(2))
    count = torch.empty(nb, dtype=torch.int32, device=LS.device)
    _vector_plan_kernel[(nb,)](LS, problem.first_row, shift, first, todo, count, n, TIGHT * eps, ORTOL_N / n,
                               RHO * math.sqrt(eps), 8.0 * eps, BLOCK=_block(n, block), num_warps=4)
    return shift, first, todo, count

