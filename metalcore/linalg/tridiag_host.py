"""The host side of the batched tridiagonal eigensolvers, shared by the Triton kernels
(:mod:`metalcore.linalg.eigh_tridiag_triton` in registers for n ≤ 128,
:mod:`metalcore.linalg.tridiag_eig_triton` for any order) and the Metal shaders
(:mod:`metalcore.linalg.tridiag_eig_metal`): the accuracy design of the vectors (:data:`ORTOL_N`,
:data:`ROUNDS`, :data:`TIGHT`, :data:`RHO`, :data:`SEED`) with the measurements behind it, bisection's
pass count, and the steps around the kernels of the any-order solver — scaling, splitting ``T`` into
blocks, the shifts and clusters of the whole spectrum, the final order. The first two are written here
in torch (:func:`prepare`, :func:`vector_plan`) as the rule's reference: each backend runs them fused
(two launches, :mod:`metalcore.linalg.tridiag_plan_triton` and the Metal shaders), tested equal to
these. No Triton here: the Metal backend runs where Triton is not installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Bisection steps by dtype: Gershgorin's width after scaling is at most 3 (|d| ≤ 1, |e| ≤ 1 on both
# sides), and 3·2⁻²⁷ < ε(fp32) = 1.2e-7, 3·2⁻⁵⁴ < ε(fp64) = 2.2e-16; one more step of margin each.
BITS = {torch.float32: 28, torch.float64: 55}


def passes(dtype: torch.dtype, sections: int) -> int:
    """Passes of the Sturm recurrence that narrow every bracket by 2^BITS[dtype]."""
    return math.ceil(BITS[dtype] / math.log2(sections + 1))


# Inverse iteration (the vectors). One solve with T − λ_j I leaves in lane j's vector a component
# ~ε‖T‖/gap along each neighbour's eigenvector, whatever the rounds: rounding in the solve. Eigenvalues
# closer than ORTOL_N / n (T scaled to entries at most 1) therefore form a cluster whose vectors are
# orthogonalised against each other, which keeps every other pair's ε/gap below 4·n·ε: LAPACK's
# orthogonality ratio ≲ 4 where stein's fixed 1e-3 of the norm measured 47 on one 13² fp32 matrix.
# Each of the ROUNDS rounds is one solve from the last round's vectors, the first from SEED's
# pseudo-random ones. One round is not enough even without clusters: a pivot floored at ε caps the
# gain at ~1/ε, and one round left LAPACK's ratios at 28-600 on 24 matrices of 13² and 40² (interpreter);
# two rounds gave ≤ 3.4.
ORTOL_N = 0.25
ROUNDS = 2
# Shifts. Eigenvalues closer than bisection's error (a multiple eigenvalue, rounded to a spread of a
# few ε) are matched to their lanes at random: a lane's λ_j may sit 1e-3 of the cluster's width from
# one eigenvalue and 1e-1 from another, so its solve amplifies the first 100 times more. After
# Gram-Schmidt the last lanes of such a cluster keep a short remainder whose rounding (ε of the
# solve's norm) and outside share (width/gap) normalisation magnifies: orthogonality ratios up to
# 2400 and residuals up to 340 on ~1% of the rank and cluster families' 64² matrices (H100, fp32 and
# fp64; bench/scripts/tridiag_vectors_replica.py shows them on the CPU). So each group of eigenvalues
# whose neighbours are within TIGHT·ε shares one shift, max(width, 8ε) beside the group on its side
# of larger gap: every vector of the group is then amplified within a factor 2 of the others. Its
# share of the nearest eigenvalue outside, (width + offset)/distance a solve, must reach ~ε in ROUNDS
# solves, so a group whose neighbours are closer than that (RHO·√ε) keeps its own eigenvalues. In
# the replica over 6,500 matrices of 5 families, n = 13-128: 0 ratios above 30 in fp32 and fp64 (13
# and 9 before), the same at TIGHT = 1024; on the H100 0 of 54 family × size cells
# (bench/linalg_triton.md, v18).
TIGHT = 16.0
RHO = 8.0
SEED = 20261207
# Off-diagonals at most SPLIT · √n · ε (T scaled to entries at most 1) split T into blocks
# (split_blocks). The tolerance trades LAPACK's residual ratio (+SPLIT/√n) for splits of off-diagonals
# that rounding left nonzero; the largest of those on rank-n/4 Gram input through the two-stage
# reduction (fp32, interpreter): 9.5 ε at n = 256, 8.2 ε at 512, 8.7 ε at 1024, then a gap to 1.4e6 ε
# or more.
SPLIT = 2.0


def scaled(d: Tensor, e: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(D, E, scale, finite)``: ``T(d, e)`` (``(nb, n)`` each, ``e[:, i] = T[i, i+1]``, the last column
    ignored) scaled to ``max(|d|, |e|) = 1`` as contiguous rows, ``E``'s last column 0; a matrix with
    NaN or Inf (``finite`` False) runs as zeros, to be made NaN at the end. ``scale`` is 0 for those
    and for the zero matrix (whose eigenvalues are then exactly 0, not bisection's ±pivmin)."""
    n = d.shape[1]
    d, e = d.contiguous(), e.contiguous()
    off = e[:, : n - 1]
    finite = d.isfinite().all(1) & off.isfinite().all(1)
    scale = torch.maximum(d.abs().amax(1), off.abs().amax(1) if n > 1 else torch.zeros_like(d[:, 0]))
    scale = torch.where(finite, scale, 0.0)
    s = torch.where(scale > 0.0, scale, 1.0)[:, None]
    D = torch.where(finite[:, None], d / s, 0.0)
    E = torch.zeros_like(D)
    E[:, : n - 1] = torch.where(finite[:, None], off / s, 0.0)
    return D, E, scale, finite


def gershgorin(D: Tensor, E: Tensor) -> tuple[Tensor, Tensor]:
    """``(low, high)`` ``(nb,)``: Gershgorin's interval of each scaled ``T``, widened by a margin that
    covers its own rounding, so that it holds every eigenvalue."""
    finfo = torch.finfo(D.dtype)
    radius = E.abs()
    radius[:, 1:] += E[:, :-1].abs()
    low, high = (D - radius).amin(1), (D + radius).amax(1)
    pad = 4.0 * finfo.eps * torch.maximum(low.abs(), high.abs()) + 2.0 * finfo.tiny
    return low - pad, high + pad


def segments(starts: Tensor) -> tuple[Tensor, Tensor]:
    """``(first, last)``: for each position of ``starts`` ``(nb, n)`` (bool, True where a segment
    begins; position 0 always does), the first and last positions of its segment."""
    nb, n = starts.shape
    index = torch.arange(n, device=starts.device).expand(nb, n)
    ends = torch.cat([starts[:, 1:], torch.ones_like(starts[:, :1])], 1)
    first = torch.where(starts, index, 0).cummax(1).values
    last = torch.where(ends, index, n - 1).flip(1).cummin(1).values.flip(1)
    return first, last


def shifts_and_clusters(lam: Tensor, eps: float, block_starts: Tensor) -> tuple[Tensor, Tensor]:
    """``(shift, first)`` of the scaled eigenvalues ``lam`` ``(nb, n)``, ascending within each block of
    ``T`` (``block_starts``: True at a block's first lane, as :func:`split_blocks` gives it): lane j's
    shift for inverse iteration, and the first lane of its cluster (eigenvalues of one block closer
    than ``ORTOL_N / n``). Eigenvalues of two blocks never share a group or a cluster: their vectors
    live on disjoint rows, orthogonal by construction.

    The whole-spectrum twin of :func:`~metalcore.linalg.eigh_tridiag_triton.shifts` and
    :func:`~metalcore.linalg.eigh_tridiag_triton.clusters`, same rule: a group of eigenvalues each
    within ``TIGHT · ε`` of the next shares the shift ``max(width, 8ε)`` beside it on its side of
    larger gap, unless its nearest outside eigenvalue in the block is too close (``RHO``)."""
    gap = lam[:, 1:] - lam[:, :-1]
    starts = block_starts.clone()
    starts[:, 1:] |= gap > TIGHT * eps
    first, last = segments(starts)
    lo, hi = lam.gather(1, first), lam.gather(1, last)
    # Distances from the group to its block's nearest eigenvalue below and above (8: the spectrum is
    # in [−3, 3]).
    n = lam.shape[1]
    ends = torch.cat([block_starts[:, 1:], torch.ones_like(block_starts[:, :1])], 1)
    below = torch.where(block_starts.gather(1, first), 8.0, lo - lam.gather(1, (first - 1).clamp_min(0)))
    above = torch.where(ends.gather(1, last), 8.0, lam.gather(1, (last + 1).clamp_max(n - 1)) - hi)
    width = hi - lo
    offset = width.clamp_min(8.0 * eps)
    shared = torch.where(below >= above, lo - offset, hi + offset)
    distance = torch.minimum(torch.maximum(below, above) - offset, torch.minimum(below, above) + width + offset)
    use = (last > first) & (width + offset <= RHO * math.sqrt(eps) * distance)
    cluster_starts = block_starts.clone()
    cluster_starts[:, 1:] |= gap > ORTOL_N / n
    return torch.where(use, shared, lam), segments(cluster_starts)[0]


def split_blocks(E: Tensor, eps: float) -> Tensor:
    """Where the scaled off-diagonals ``E`` ``(nb, n)`` (``E[:, i] = T[i, i+1]``, ``‖T‖_max = 1``) split
    ``T``: True at row ``i + 1`` wherever ``|E[:, i]| ≤ SPLIT · √n · ε``, and at row 0. ``E`` is set to
    zero there, in place.

    Why: an eigenvalue of multiplicity ``m`` (the ``3n/4`` zeros of a rank-``n/4`` Gram matrix, as
    Shampoo's first statistics are) needs ``T`` to be split ``m − 1`` times (an unreduced tridiagonal
    has distinct eigenvalues), and the reduction leaves those off-diagonals at rounding level, not 0.
    Unsplit, the ``m`` lanes form one cluster that Gram-Schmidt walks in one program (``4 m² n`` flops
    a round: 16.7 ms at 64×256² on the H100, against 3.4 for cuSOLVER); split, each lane's vector
    lives on its own block's rows, orthogonal to the other blocks' by construction (LAPACK ``dstebz``
    and ``dstein`` work block by block for the same reason). Zeroing ``|e| ≤ τ`` moves the
    eigenvalues by at most ``τ`` (absolute: the contract's ``O(n ε ‖A‖)``); ``τ = SPLIT · √n · ε``
    adds ``SPLIT / √n`` to LAPACK's residual ratio (``‖·‖ / (n ε ‖A‖)``). The measured gap: on
    rank-n/4 Gram input through the two-stage reduction (fp32, interpreter), the split-worthy
    off-diagonals reached 9.5 ε at n = 256 and the next one was 1.8e6 ε (bench/linalg.md)."""
    n = E.shape[1]
    small = E.abs() <= SPLIT * math.sqrt(n) * eps
    small[:, n - 1:] = False                              # E's last column lies outside T
    E.masked_fill_(small, 0.0)
    return torch.cat([torch.ones_like(small[:, :1]), small[:, : n - 1]], 1)


def cluster_lanes(first: Tensor) -> tuple[Tensor, Tensor]:
    """``(todo, count)`` of the clusters' first lanes ``first`` ``(nb, n)``: the lanes with an earlier
    cluster mate, ascending, padded with ``n`` (int32), and how many there are a matrix."""
    n = first.shape[1]
    index = torch.arange(n, device=first.device)
    clustered = first < index
    todo = torch.where(clustered, index, n).sort(1).values.to(torch.int32)
    return todo, clustered.sum(1, dtype=torch.int32)


@dataclass(frozen=True)
class Problem:
    """One call's scaled, split ``T`` as the kernels read it (:func:`prepare`): ``D``, ``E`` ``(nb, n)``
    (``E = 0`` where ``T`` splits), ``scale`` and ``finite`` ``(nb,)`` (:func:`scaled`), each row's
    block ``first_row`` … ``last_row`` (int32), Gershgorin's ``low``, ``high`` ``(nb,)``."""

    D: Tensor
    E: Tensor
    scale: Tensor
    finite: Tensor
    first_row: Tensor
    last_row: Tensor
    low: Tensor
    high: Tensor


def prepare(d: Tensor, e: Tensor) -> Problem:
    """The torch steps before the values kernel: :func:`scaled`, :func:`split_blocks`, the blocks' rows,
    :func:`gershgorin`."""
    D, E, scale, finite = scaled(d, e)
    starts = split_blocks(E, torch.finfo(d.dtype).eps)
    first_row, last_row = (x.to(torch.int32).contiguous() for x in segments(starts))
    low, high = gershgorin(D, E)
    return Problem(D, E, scale, finite, first_row, last_row, low.contiguous(), high.contiguous())


def eigenvalues(problem: Problem, LS: Tensor) -> tuple[Tensor, Tensor]:
    """``(lam, order)``: the values kernel's ``LS`` (each block's eigenvalues at its rows, ascending
    within a block, not across blocks) sorted, scaled back, NaN for a matrix with NaN or Inf; ``order``
    the permutation that sorted them, for :func:`in_order`. × scale, not its floor of 1: the zero
    matrix's eigenvalues are exactly 0, not bisection's ±pivmin."""
    ascending, order = LS.sort(1)
    return (ascending * problem.scale[:, None]).masked_fill_(~problem.finite[:, None], float("nan")), order


def vector_plan(problem: Problem, LS: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(shift, first, todo, count)`` for the vectors' kernels: :func:`shifts_and_clusters` (``first``
    as int32) and :func:`cluster_lanes`."""
    starts = problem.first_row == torch.arange(LS.shape[1], device=LS.device)
    shift, first = shifts_and_clusters(LS, torch.finfo(LS.dtype).eps, starts)
    todo, count = cluster_lanes(first)
    return shift.contiguous(), first.to(torch.int32).contiguous(), todo, count


def in_order(Z: Tensor, order: Tensor, out: Tensor, finite: Tensor) -> Tensor:
    """``Z``'s columns in the eigenvalues' ascending order (``order`` from :func:`eigenvalues`), into
    ``out`` (``Z``'s shape, free storage), NaN for a matrix with NaN or Inf: one pass over ``Z``."""
    nb, n, _ = Z.shape
    out = torch.gather(Z, 2, order[:, None, :].expand(nb, n, n), out=out)
    return out.masked_fill_(~finite[:, None, None], float("nan"))
