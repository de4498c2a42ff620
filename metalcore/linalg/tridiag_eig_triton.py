"""Eigenvalues and eigenvectors of batched symmetric tridiagonal matrices of any order (stage 3 of
the two-stage eigensolver for n > 128, issue 18): Sturm multisection for the values, inverse
iteration for the vectors, many programs a matrix.

Layers: ``_values_kernel``, ``_inverse_iteration_kernel`` and ``_cluster_kernel`` →
:func:`tridiag_eig`. :mod:`metalcore.linalg.eigh_tridiag_triton` does the same inside one program a
matrix with ``T`` in registers (n ≤ 128); this module shares its accuracy design with
:mod:`metalcore.linalg.tridiag_host` (``ORTOL_N``, ``ROUNDS``, ``TIGHT``, ``RHO``, ``SEED``, ``SPLIT``,
with the measurements behind them), whose torch steps around the kernels run here fused into two
launches (:mod:`metalcore.linalg.tridiag_plan_triton`: scaling and splitting ``T``, shifts and
clusters), and keeps every
``n``-long column in global memory, so that nothing in registers grows with ``n``: a ``[4096, 32]``
register tile, as the small kernel's ``tridiag_eigenvectors`` would need at n = 4096, is 512 KiB,
twice an SM's registers.

Each matrix is scaled (on the device, no host sync) to ``max(|d|, |e|) = 1``; ``T`` below is
the scaled matrix, whose spectrum lies in ``[−3, 3]``.

0. **Blocks** (:func:`~metalcore.linalg.tridiag_host.split_blocks`' rule): ``T`` splits wherever an
   off-diagonal is at rounding level (``≤ SPLIT · √n · ε``), set to zero, as LAPACK's ``dstebz`` splits
   it; lane ``j`` then serves the ``(j − f)``-th eigenvalue of the diagonal block of rows ``f … l`` that
   holds row ``j``, and its vector lives on those rows. A multiple eigenvalue (the ``3n/4`` zeros of a
   rank-``n/4`` Gram matrix) can only come from a split ``T``, and its lanes in different blocks need no
   orthogonalisation. At the end the eigenvalues are sorted and ``Z``'s columns follow them.
1. **Values** (``_values_kernel``, grid ``(nb, ⌈n / lanes⌉)``): program ``(matrix, block)`` brackets
   its lanes' eigenvalues inside Gershgorin's interval (computed with the split) by Sturm counts over the
   rows of their blocks, ``sections`` points a lane and pass. The scaled eigenvalues go to global
   memory: step 2 reads every one of them.
2. **Shifts and clusters** (:func:`~metalcore.linalg.tridiag_host.shifts_and_clusters`' rule): the
   whole-spectrum twin of the small kernel's ``shifts()`` and ``clusters()``, which see only their
   program's lanes. A group of eigenvalues within ``TIGHT · ε`` of each other (a multiple eigenvalue)
   shares one shift beside the group; a group that crosses the edge between two programs' lanes, seen by
   each program alone, would get two shifts, each placed by that program's part of the group only —
   possibly inside the other part, and blind to the other program's nearest outside eigenvalue, which
   ``RHO``'s rule needs. Both are segmented scans over each block's ascending eigenvalues (``cummax``),
   O(n) a matrix, where ``shifts()`` compares all lane pairs; groups and clusters end at a block's edge.
3. **Inverse iteration** (``_inverse_iteration_kernel``, grid ``(nb, ⌈n / lanes⌉)``, once a round):
   lane ``j`` solves ``(T − σ_j I) x = z_j`` through the ``L D Lᵀ`` pivots of the Sturm recurrence (a
   pivot below ε raised to ±ε), one entry of each lane's column a step, from pseudo-random vectors
   (zero outside the lane's block, which the solves keep: ``e = 0`` at its edges) seeded by the
   entry's place in ``Z`` (every column its own start: a seed by lane within the program would give
   lane c of every program the same vector, and two lanes of one multiple eigenvalue in two programs
   the same solution); columns then scaled to unit norm.
4. **Gram-Schmidt** (``_cluster_kernel``, one program a matrix, after every round): eigenvalues closer
   than ``ORTOL_N / n`` form clusters; each lane with an earlier mate, in ascending order, is
   orthogonalised against all its earlier mates (classical Gram-Schmidt, twice) and renormalised,
   reading the columns from ``Z``. One pass for all clusters — within a program's lanes or across
   programs — rather than per-program Gram-Schmidt plus a cross-program fix-up: a lane of a cluster that
   crosses an edge must be orthogonal to its mates on both sides, so the per-program work would be done
   twice. A large cluster (many close eigenvalues in one block of ``T``) goes in blocks of
   :data:`CLUSTER_BLOCK` lanes, each projected off the cluster's earlier lanes by ``tl.dot`` before its
   lanes are orthogonalised among themselves one at a time. After every round, as in the small kernel,
   not only after the last: the next round's solve then restores the eigenvector quality a Gram-Schmidt
   step loses when two start vectors were nearly parallel.

Work a matrix (flops, n eigenvalues): values ``≈ 5 · sections · passes · n²`` (a step is a
division, three flops and a compare, for each of the ``sections`` points of each lane; fp32:
8 · 9 · 5 n² = 360 n², or 1 · 28 · 5 = 140 n² by bisection); vectors ``≈ 5 n²`` of pivots once and
``7 n²`` a round (two multiply-adds a step of the solves, three flops an entry to normalise), 19 n²
in all; Gram-Schmidt ``8 m n`` a round for a lane with ``m`` earlier mates (``4 m² n`` a cluster
of ``m``). Bytes: the vectors stream their columns (pivots ``1/q``, ``y``, ``z``: three ``n × n``
arrays, the third the output): ``n²`` stores of pivots, then a round reads ``z``, pivots and writes
``y``, reads ``y``, pivots and writes ``z``, reads ``z`` twice and writes it to normalise: ≈ 19 n²
elements in all, 1.3 GB at n = 4096 in fp32.

What bounds it: dependent steps a program — ``passes · n`` recurrence steps for the values
(9 · 4096 = 37k at n = 4096, fp32, 8 sections), ``n`` for the pivots and ``2 n`` a round for the
vectors (``ROUNDS · 2n + n`` = 20k at n = 4096); every program of a step runs in parallel. The
Gram-Schmidt program walks a matrix's clustered lanes one after another: cheap for the ~5% of a
random spectrum's lanes, ``4 m² n`` flops a round in one program for a cluster of ``m``, mostly in
``tl.dot`` blocks. Step 0's splits keep ``m`` small where it would be largest: a multiple
eigenvalue's lanes sit in different blocks. On rank-n/4 Gram input through the two-stage reduction
(fp32) the largest block left held 109 rows at n = 256 and 228 at 512 (of 64 and 128 nonzero
eigenvalues and a few zeros), where unsplit the zeros were one cluster of ``3n/4``.

Accuracy: bisection finds each eigenvalue of ``T`` to ``O(ε ‖T‖)``; the vectors follow the small
kernel's design (residual and orthogonality within LAPACK's ratios), with the shifts and clusters of
the whole spectrum. NaN or Inf in a matrix's ``d`` or ``e`` gives NaN eigenvalues and vectors for that
matrix only.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import cdiv, helper, jit, program_slots
from metalcore.linalg._small_triton import warps
from metalcore.linalg.eigh_tridiag_triton import SECTIONS, SEED
from metalcore.linalg.tridiag_host import ROUNDS, eigenvalues, in_order, passes
from metalcore.linalg.tridiag_plan_triton import prepare, vector_plan

# Values a thread of the tiles in which a program sweeps its columns (normalisation, Gram-Schmidt):
# what the loops keep in registers does not grow with n. At 16 (a [64, 32] tile at 4 warps, [16, 32]
# at 1) the sm_90 builds (fp32, 32 lanes) take 72 registers for the inverse iteration and 96 for the
# Gram-Schmidt, no spills; at 64 values a thread the inverse iteration took 254.
CHUNK_PER_THREAD = 16
ROWS_CHUNK = CHUNK_PER_THREAD * 128 // 32                 # the Gram-Schmidt kernel's 4 warps, 32 mates
# Earlier cluster mates a chunk of Gram-Schmidt: 32 columns of one row are one 128-byte line in fp32.
MATES_CHUNK = 32
# Lanes of a cluster projected together off the cluster's earlier lanes, by tl.dot (16: its smallest
# tile side). A cluster of m lanes then costs m/16 blocked projections plus 15 mates a lane one at a
# time, instead of m(m−1)/2 one-column steps: for a cluster of m = 768 at n = 1024, ~2.5
# GFLOP of dots a round in one program where the column steps were ~300k dependent tile passes.
CLUSTER_BLOCK = 16


@helper
def _block_multisection(D, E, first, last, low, high, index, passes, pivmin, SECTIONS: tl.constexpr):
    """Lane j: the ``index[j]``-th smallest (0-based) eigenvalue of the diagonal block of rows
    ``first[j] … last[j]`` of the split ``T`` (``e = 0`` at every block's edges), inside ``[low, high]``.
    :func:`~metalcore.linalg.eigh_tridiag_triton.sturm_multisection`'s passes, with each lane counting
    only its own block's negative pivots: ``e = 0`` restarts the recurrence at every block's first
    row, so the count over a block's rows is that block's Sturm count. The rows run from the first
    to the last of the program's blocks."""
    left = low + tl.zeros_like(index).to(low.dtype)
    right = high + tl.zeros_like(index).to(low.dtype)
    parts = (tl.arange(0, SECTIONS) + 1).to(low.dtype) / (SECTIONS + 1)
    start = tl.min(first, axis=0)
    stop = tl.max(last, axis=0) + 1
    for _ in range(0, passes):
        x = left[:, None] + (right - left)[:, None] * parts[None, :]
        q = tl.load(D + start) - x
        q = tl.where(tl.abs(q) < pivmin, -pivmin, q)
        count = tl.where((q < 0.0) & (first == start)[:, None], 1, 0)
        for i in range(start + 1, stop):
            e_i = tl.load(E + i - 1)
            q = (tl.load(D + i) - x) - e_i * e_i / q
            q = tl.where(tl.abs(q) < pivmin, -pivmin, q)
            count += tl.where((q < 0.0) & ((first <= i) & (i <= last))[:, None], 1, 0)
        above = count > index[:, None]                    # the eigenvalue is below x
        right = tl.minimum(right, tl.min(tl.where(above, x, right[:, None]), axis=1))
        left = tl.maximum(left, tl.max(tl.where(above, left[:, None], x), axis=1))
    return 0.5 * (left + right)


@jit
def _values_kernel(D, E, FIRST_ROW, LAST_ROW, LOW, HIGH, LS, n, passes, PIVMIN: tl.constexpr,
                   LANES: tl.constexpr, SECTIONS: tl.constexpr):
    """Program ``(matrix, block)``: for the lanes ``j = block · LANES + [0, LANES)``, the
    ``(j − FIRST_ROW[j])``-th eigenvalue of the diagonal block of rows ``FIRST_ROW[j] … LAST_ROW[j]``
    of the scaled, split ``T`` (diagonal at ``D``, off-diagonal at ``E``, rows of ``n``) inside
    ``[LOW, HIGH]`` into ``LS``: each block's eigenvalues, ascending, at its own rows. ``PIVMIN``: the
    smallest pivot (see :func:`~metalcore.linalg.eigh_tridiag_triton.sturm_multisection`)."""
    mat = tl.program_id(0).to(tl.int64)
    index = tl.program_id(1) * LANES + tl.arange(0, LANES)
    lane = tl.minimum(index, n - 1)
    first = tl.load(FIRST_ROW + mat * n + lane)
    last = tl.load(LAST_ROW + mat * n + lane)
    lam = _block_multisection(D + mat * n, E + mat * n, first, last, tl.load(LOW + mat), tl.load(HIGH + mat),
                              lane - first, passes, PIVMIN, SECTIONS)
    tl.store(LS + mat * n + index, lam, mask=index < n)


@helper
def _unit_columns(Z, cols, valid, top, n, BC: tl.constexpr, CH: tl.constexpr):
    """The columns ``cols`` of the row-major ``n × n`` array at ``Z`` scaled to unit 2-norm, by their
    largest magnitude ``top`` first (so that no square overflows), a chunk of ``CH`` rows at a time."""
    m = tl.where(top > 0.0, top, 1.0)
    squares = tl.zeros([CH, BC], dtype=top.dtype)
    for r0 in range(0, n, CH):
        rows = r0 + tl.arange(0, CH)
        inside = (rows[:, None] < n) & valid[None, :]
        t = tl.load(Z + rows[:, None] * n + cols[None, :], mask=inside, other=0.0) / m[None, :]
        squares += t * t
    s = m * tl.sqrt(tl.maximum(tl.sum(squares, axis=0), 1.0))
    for r0 in range(0, n, CH):
        rows = r0 + tl.arange(0, CH)
        inside = (rows[:, None] < n) & valid[None, :]
        at = Z + rows[:, None] * n + cols[None, :]
        tl.store(at, tl.load(at, mask=inside, other=0.0) / s[None, :], mask=inside)


@jit
def _inverse_iteration_kernel(D, E, SH, FIRST_ROW, LAST_ROW, Z, YS, QS, n, eps, BC: tl.constexpr,
                              CH: tl.constexpr, START: tl.constexpr):
    """Program ``(matrix, block)``: one round of inverse iteration for the columns
    ``block · BC + [0, BC)`` of ``Z`` (``n × n`` a matrix, row-major): ``Z ← (T − σ I)⁻¹ Z`` with the
    shifts ``SH``, columns scaled to unit norm. ``START``: first compute the pivots into ``QS`` and
    the pseudo-random start vectors into ``Z``, column ``j`` zero outside its block's rows
    ``FIRST_ROW[j] … LAST_ROW[j]`` (``T`` split there, so the solves keep it so). ``YS``: scratch of
    ``Z``'s shape."""
    mat = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    valid = cols < n
    d = D + mat * n
    e = E + mat * n
    z = Z + mat * n * n + cols                            # lane j's entry i at z + i · n
    y = YS + mat * n * n + cols
    r = QS + mat * n * n + cols
    if START:
        # Pivots of T − σ_j I = L D Lᵀ (the Sturm recurrence); a pivot below ε becomes ±ε, which
        # bounds the solve's growth (T is scaled to entries at most 1). Stored as 1/q, so that a solve
        # step is one multiply-add.
        shift = tl.load(SH + mat * n + cols, mask=valid, other=0.0)
        q = tl.load(d) - shift
        q = tl.where(tl.abs(q) < eps, tl.where(q < 0.0, -eps, eps), q)
        tl.store(r, 1.0 / q, mask=valid)
        for i in range(1, n):
            e_i = tl.load(e + i - 1)
            q = (tl.load(d + i) - shift) - e_i * (e_i / q)
            q = tl.where(tl.abs(q) < eps, tl.where(q < 0.0, -eps, eps), q)
            tl.store(r + i * n, 1.0 / q, mask=valid)
        # Seeded by the entry's place in Z: a start of its own for every column of the matrix.
        first = tl.load(FIRST_ROW + mat * n + cols, mask=valid, other=0)
        last = tl.load(LAST_ROW + mat * n + cols, mask=valid, other=0)
        for r0 in range(0, n, CH):
            rows = r0 + tl.arange(0, CH)
            at = rows[:, None] * n + cols[None, :]
            block = (rows[:, None] >= first[None, :]) & (rows[:, None] <= last[None, :])
            tl.store(Z + mat * n * n + at, tl.where(block, tl.rand(SEED, at) - 0.5, 0.0).to(shift.dtype),
                     mask=(rows[:, None] < n) & valid[None, :])
    tl.debug_barrier()                                    # the start vectors, or the last round's Gram-Schmidt

    # L y = z, then D⁻¹ y. Each step's loads are issued a step ahead: only the multiply-add is on the
    # dependent chain.
    q_inv = tl.load(r, mask=valid, other=1.0)
    yy = tl.load(z, mask=valid, other=0.0)
    tl.store(y, yy * q_inv, mask=valid)
    e_n = tl.load(e)
    z_n = tl.load(z + n, mask=valid & (n > 1), other=0.0)
    r_n = tl.load(r + n, mask=valid & (n > 1), other=1.0)
    for i in range(1, n):
        l_i = e_n * q_inv
        z_i = z_n
        q_inv = r_n
        nxt = tl.minimum(i + 1, n - 1)
        e_n = tl.load(e + nxt - 1)
        z_n = tl.load(z + nxt * n, mask=valid, other=0.0)
        r_n = tl.load(r + nxt * n, mask=valid, other=1.0)
        yy = z_i - l_i * yy
        tl.store(y + i * n, yy * q_inv, mask=valid)
    tl.debug_barrier()

    # Lᵀ x = D⁻¹ y, bottom up, keeping each lane's largest |x| for the normalisation.
    x = tl.load(y + (n - 1) * n, mask=valid, other=0.0)
    tl.store(z + (n - 1) * n, x, mask=valid)
    top = tl.abs(x)
    i0 = tl.maximum(n - 2, 0)
    y_n = tl.load(y + i0 * n, mask=valid, other=0.0)
    c_n = tl.load(e + i0) * tl.load(r + i0 * n, mask=valid, other=1.0)
    for t in range(0, n - 1):
        i = n - 2 - t
        y_i = y_n
        c_i = c_n
        nxt = tl.maximum(i - 1, 0)
        y_n = tl.load(y + nxt * n, mask=valid, other=0.0)
        c_n = tl.load(e + nxt) * tl.load(r + nxt * n, mask=valid, other=1.0)
        x = y_i - c_i * x
        top = tl.maximum(top, tl.abs(x))
        tl.store(z + i * n, x, mask=valid)
    tl.debug_barrier()
    _unit_columns(Z + mat * n * n, cols, valid, top, n, BC, CH)


@helper
def _project_block(z, cb, FIRST, f, start, n, CH: tl.constexpr, KC: tl.constexpr, KB: tl.constexpr):
    """The cluster's lanes ``start … start + KB − 1`` (those whose cluster begins at ``f``) of the
    row-major ``n × n`` array ``z`` minus their components along the columns ``f … start − 1``
    (orthonormal), classical Gram-Schmidt twice, by ``tl.dot``: ``C = Z_mᵀ Z_b``, ``Z_b −= Z_m C``.
    ``cb``: ``n × KB`` coefficients of scratch."""
    lanes = start + tl.arange(0, KB)
    mine = (lanes < n) & (tl.load(FIRST + lanes, mask=lanes < n, other=-1) == f)
    for _pass in tl.static_range(2):
        for k0 in range(f, start, KC):
            ks = k0 + tl.arange(0, KC)
            mates = ks < start
            acc = tl.zeros([KC, KB], dtype=z.dtype.element_ty)
            for r0 in range(0, n, CH):
                rows = r0 + tl.arange(0, CH)
                inside = rows < n
                zk = tl.load(z + rows[:, None] * n + ks[None, :], mask=inside[:, None] & mates[None, :], other=0.0)
                zb = tl.load(z + rows[:, None] * n + lanes[None, :], mask=inside[:, None] & mine[None, :], other=0.0)
                acc = tl.dot(tl.trans(zk), zb, acc, input_precision="ieee", out_dtype=z.dtype.element_ty)
            tl.store(cb + ks[:, None] * KB + tl.arange(0, KB)[None, :], acc, mask=mates[:, None])
        tl.debug_barrier()
        for r0 in range(0, n, CH):
            rows = r0 + tl.arange(0, CH)
            inside = rows < n
            at = z + rows[:, None] * n + lanes[None, :]
            acc = tl.zeros([CH, KB], dtype=z.dtype.element_ty)
            for k0 in range(f, start, KC):
                ks = k0 + tl.arange(0, KC)
                mates = ks < start
                zk = tl.load(z + rows[:, None] * n + ks[None, :], mask=inside[:, None] & mates[None, :], other=0.0)
                cc = tl.load(cb + ks[:, None] * KB + tl.arange(0, KB)[None, :], mask=mates[:, None], other=0.0)
                acc = tl.dot(zk, cc, acc, input_precision="ieee", out_dtype=z.dtype.element_ty)
            keep = inside[:, None] & mine[None, :]
            tl.store(at, tl.load(at, mask=keep, other=0.0) - acc, mask=keep)
        tl.debug_barrier()


@jit
def _cluster_kernel(Z, FIRST, TODO, COUNT, CS, CB, n, CH: tl.constexpr, KC: tl.constexpr, KB: tl.constexpr):
    """Program ``matrix``: the ``COUNT`` lanes listed in ``TODO`` (ascending), lane ``j`` orthogonalised
    against the columns ``FIRST[j] … j − 1`` of ``Z`` (its earlier cluster mates, orthonormal by then;
    classical Gram-Schmidt, twice) and scaled to unit norm. A cluster's lanes go in blocks of ``KB``:
    at a block's first lane the whole block is projected off the earlier blocks by ``tl.dot``
    (:func:`_project_block`), then each lane off its block's earlier lanes, one at a time. ``CS``:
    ``n`` coefficients of scratch a matrix, ``CB``: ``n × KB``."""
    mat = tl.program_id(0).to(tl.int64)
    z = Z + mat * n * n
    c = CS + mat * n
    count = tl.load(COUNT + mat)
    for t in range(0, count):
        j = tl.load(TODO + mat * n + t)
        cluster = tl.load(FIRST + mat * n + j)
        f = cluster + (j - cluster) // KB * KB            # the first lane of j's block in its cluster
        if (j == f) & (f > cluster):
            _project_block(z, CB + mat * n * KB, FIRST + mat * n, cluster, f, n, CH, KC, KB)
        for _pass in tl.static_range(2):
            # c_k = z_kᵀ z_j for the mates k, a chunk of KC mates at a time.
            for k0 in range(f, j, KC):
                ks = k0 + tl.arange(0, KC)
                mates = ks < j
                dots = tl.zeros([CH, KC], dtype=Z.dtype.element_ty)
                for r0 in range(0, n, CH):
                    rows = r0 + tl.arange(0, CH)
                    inside = rows < n
                    zj = tl.load(z + rows * n + j, mask=inside, other=0.0)
                    zk = tl.load(z + rows[:, None] * n + ks[None, :], mask=inside[:, None] & mates[None, :], other=0.0)
                    dots += zk * zj[:, None]
                tl.store(c + ks, tl.sum(dots, axis=0), mask=mates)
            tl.debug_barrier()
            # z_j ← z_j − Σ_k c_k z_k
            for r0 in range(0, n, CH):
                rows = r0 + tl.arange(0, CH)
                inside = rows < n
                zj = tl.load(z + rows * n + j, mask=inside, other=0.0)
                for k0 in range(f, j, KC):
                    ks = k0 + tl.arange(0, KC)
                    mates = ks < j
                    ck = tl.load(c + ks, mask=mates, other=0.0)
                    zk = tl.load(z + rows[:, None] * n + ks[None, :], mask=inside[:, None] & mates[None, :], other=0.0)
                    zj -= tl.sum(zk * ck[None, :], axis=1)
                tl.store(z + rows * n + j, zj, mask=inside)
            tl.debug_barrier()
        # After Gram-Schmidt z_j is at most of unit norm and at least ~ε: no square over- or underflows.
        squares = tl.zeros([CH], dtype=Z.dtype.element_ty)
        for r0 in range(0, n, CH):
            rows = r0 + tl.arange(0, CH)
            zj = tl.load(z + rows * n + j, mask=rows < n, other=0.0)
            squares += zj * zj
        norm = tl.sqrt(tl.sum(squares, axis=0))
        for r0 in range(0, n, CH):
            rows = r0 + tl.arange(0, CH)
            zj = tl.load(z + rows * n + j, mask=rows < n, other=0.0)
            tl.store(z + rows * n + j, zj / norm, mask=rows < n)
        tl.debug_barrier()                                # the next lane reads z_j as a mate


def tridiag_eig(d: Tensor, e: Tensor, compute_v: bool, *, lanes: int = 32, sections: int | None = None
                ) -> tuple[Tensor, Tensor]:
    """Eigenvalues, ascending, of the symmetric tridiagonal matrices with diagonals ``d`` ``(nb, n)``
    and off-diagonals ``e`` ``(nb, n)`` (``e[:, i] = T[i, i+1]``; the last column is ignored), float32
    or float64 on one device; with ``compute_v`` also their orthonormal eigenvectors as the columns of
    ``Z`` ``(nb, n, n)`` (column j for ``lam[:, j]``), else ``d.new_empty(0)``.

    ``lanes``: eigenvalues a program (a power of two); ``sections``: Sturm points a lane and pass, a
    power of two (default :data:`~metalcore.linalg.eigh_tridiag_triton.SECTIONS` while the programs
    fit one an SM, else bisection's 1). Example::

        d, e = torch.randn(4, 300, device="cuda"), torch.randn(4, 300, device="cuda")
        lam, Z = tridiag_eig(d, e, True)      # (4, 300), (4, 300, 300)
    """
    if d.dim() != 2 or e.shape != d.shape:
        raise ValueError(f"d and e must both be (nb, n), got {tuple(d.shape)} and {tuple(e.shape)}")
    if d.dtype not in (torch.float32, torch.float64) or e.dtype != d.dtype or e.device != d.device:
        raise ValueError(f"d and e must be float32 or float64 of one dtype and device, got {d.dtype} on "
                         f"{d.device} and {e.dtype} on {e.device}")
    if lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two, got {lanes}")
    if sections is not None and (sections < 1 or sections & (sections - 1)):
        raise ValueError(f"sections must be a power of two, got {sections}")
    nb, n = d.shape
    dt, dev = d.dtype, d.device
    if nb == 0 or n == 0:
        return d.new_empty(nb, n), d.new_empty(nb, n, n) if compute_v else d.new_empty(0)
    finfo = torch.finfo(dt)
    blocks = cdiv(n, lanes)
    if sections is None:
        sections = SECTIONS if nb * blocks <= program_slots(dev) else 1

    # Scaled to max(|d|, |e|) = 1 and split; a matrix with NaN or Inf runs as zeros, made NaN at the end.
    prob = prepare(d, e)
    LS = torch.empty_like(prob.D)
    _values_kernel[(nb, blocks)](prob.D, prob.E, prob.first_row, prob.last_row, prob.low, prob.high, LS, n,
                                 passes(dt, sections), PIVMIN=finfo.tiny, LANES=lanes, SECTIONS=sections,
                                 num_warps=warps(lanes * sections))
    lam, order = eigenvalues(prob, LS)
    if not compute_v:
        return lam, d.new_empty(0)

    shift, first, todo, count = vector_plan(prob, LS)
    Z = torch.empty(nb, n, n, dtype=dt, device=dev)
    Y, P = torch.empty_like(Z), torch.empty_like(Z)
    C = torch.empty_like(prob.D)
    CB = torch.empty(nb, n, CLUSTER_BLOCK, dtype=dt, device=dev)
    # One warp a 32 lanes: every lane's solve is a chain of its own, one thread each.
    solve_warps = max(1, lanes // 32)
    for round_ in range(ROUNDS):
        _inverse_iteration_kernel[(nb, blocks)](prob.D, prob.E, shift, prob.first_row, prob.last_row, Z, Y, P, n,
                                                finfo.eps, BC=lanes, CH=CHUNK_PER_THREAD * 32 * solve_warps // lanes,
                                                START=round_ == 0, num_warps=solve_warps)
        _cluster_kernel[(nb,)](Z, first, todo, count, C, CB, n, CH=ROWS_CHUNK, KC=MATES_CHUNK, KB=CLUSTER_BLOCK,
                               num_warps=4)
    return lam, in_order(Z, order, Y, prob.finite)
