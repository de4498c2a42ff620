"""Eigenvalues of symmetric matrices by Householder tridiagonalisation and bisection, one program
per matrix, in registers.

Layers: ``_tridiag_eigvalsh_kernel`` → :func:`eigvalsh_tridiag` → the ``tridiag`` path of
``metalcore::eigh`` without vectors on the Triton backend (:mod:`metalcore.linalg.eigh_triton`),
sides up to the register tile's :data:`~metalcore.linalg._small_triton.MAX_N` (128).

Why: above n = 32 the Jacobi kernels run hundreds of dependent rounds (the ``shifted`` kernel: ~504
at n = 64, 0.86 ms for 16×64² on the H100) and the table gives eigh to cuSOLVER's batched syev
(16×64² values 0.38 ms, 256×64² 0.63). A tridiagonal reduction has n − 2 dependent steps, and the
eigenvalues of the tridiagonal ``T`` by bisection are independent of each other: one lane per
eigenvalue (bench/linalg_triton.md, "Plan, not built", latency model: ≈ 0.15-0.2 ms for 100×64²).

1. **Tridiagonalisation** (LAPACK ``sytd2``, lower): the whole matrix as a ``[BN, BN]`` tile; for
   ``k < n − 2`` the reflector of column ``k`` below the diagonal (``dlarfg``, norm scaled by its
   largest entry), ``p = τ A v``, ``w = p − ½ τ (pᵀv) v``, ``A ← A − v wᵀ − w vᵀ``. ``T``'s diagonal
   and first super-diagonal are then read from the tile and scaled by their largest magnitude.
2. **Bisection** (LAPACK ``dstebz``'s Sturm counts): lane ``j`` brackets the ``j``-th smallest
   eigenvalue inside Gershgorin's interval; ``count(x)``, the number of eigenvalues below ``x``, is
   the number of negative pivots of ``T − x I`` (``q₀ = d₀ − x``, ``q_i = d_i − x − e²_{i−1}/q_{i−1}``,
   a pivot smaller than ``pivmin`` replaced by ``−pivmin``). Each step halves every lane's bracket;
   :data:`ITERATIONS` steps take Gershgorin's width (≤ 3 after scaling) below ``ε``.

Accuracy: the reduction is backward stable (``‖A − Q T Qᵀ‖ = O(n ε ‖A‖)``) and bisection finds each
eigenvalue of ``T`` to ``O(ε ‖T‖)``, so the eigenvalues carry ``syev``'s absolute error bound,
``O(n ε ‖A‖)``: what LAPACK's ratio for eigenvalues measures. They come out ascending. NaN or Inf in a
matrix gives NaN eigenvalues for that matrix only. The ``d`` and ``e²`` vectors of each matrix go
through global scratch (the Sturm recurrence reads them one entry at a time; registers cannot be
indexed by a loop counter).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import jit
from metalcore.linalg._small_triton import MAX_N, block, stack_strides, warps
from metalcore.linalg.householder_gemm import as3

# Bisection steps by dtype: Gershgorin's width after scaling is at most 3 (|d| ≤ 1, |e| ≤ 1 on both
# sides), and 3·2⁻²⁷ < ε(fp32) = 1.2e-7, 3·2⁻⁵⁴ < ε(fp64) = 2.2e-16; one more step of margin each.
ITERATIONS = {torch.float32: 28, torch.float64: 55}


@jit
def _tridiag_eigvalsh_kernel(A, L, DS, E2S, n, s_ab, s_ar, s_ac, eps, pivmin, iterations,
                             BN: tl.constexpr, UPPER: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BN)
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    base = A + pid.to(tl.int64) * s_ab
    hi = tl.maximum(rows[:, None], cols[None, :])
    lo = tl.minimum(rows[:, None], cols[None, :])
    if UPPER:
        a = tl.load(base + lo * s_ar + hi * s_ac, mask=inside, other=0.0)
    else:
        a = tl.load(base + hi * s_ar + lo * s_ac, mask=inside, other=0.0)
    finite = tl.sum(tl.sum(tl.where(tl.abs(a) < float("inf"), 0, 1), axis=1), axis=0) == 0

    # 1. Householder tridiagonalisation, lower (sytd2).
    for k in range(0, n - 2):
        x = tl.sum(tl.where(cols[None, :] == k, a, 0.0), axis=1)
        x = tl.where(rows > k, x, 0.0)
        alpha = tl.sum(tl.where(rows == k + 1, x, 0.0), axis=0)
        m = tl.max(tl.abs(x), axis=0)
        m = tl.where(m > 0.0, m, 1.0)
        xs = x / m
        sigma = tl.sum(tl.where(rows > k + 1, xs * xs, 0.0), axis=0)
        norm = m * tl.sqrt((alpha / m) * (alpha / m) + sigma)
        beta = tl.where(alpha >= 0.0, -norm, norm)
        trivial = sigma == 0.0
        tau = tl.where(trivial, 0.0, (beta - alpha) / tl.where(trivial, 1.0, beta))
        v = tl.where(rows == k + 1, 1.0, tl.where(rows > k + 1, x / tl.where(trivial, 1.0, alpha - beta), 0.0))
        p = tau * tl.sum(a * v[None, :], axis=1)
        w = p - (0.5 * tau * tl.sum(p * v, axis=0)) * v
        a = a - v[:, None] * w[None, :] - w[:, None] * v[None, :]

    # 2. T's diagonal and super-diagonal, scaled to at most 1, into scratch for the Sturm recurrence.
    d = tl.sum(tl.where(cols[None, :] == rows[:, None], a, 0.0), axis=1)
    e = tl.sum(tl.where(cols[None, :] == rows[:, None] + 1, a, 0.0), axis=1)   # e_i = T[i, i+1]
    d = tl.where(rows < n, d, 0.0)
    e = tl.where(rows < n - 1, e, 0.0)
    s = tl.maximum(tl.max(tl.abs(d), axis=0), tl.max(tl.abs(e), axis=0))
    s = tl.where(s > 0.0, s, 1.0)
    d = d / s
    e = e / s
    e_before = tl.sum(tl.where(cols[None, :] == rows[:, None] - 1, a, 0.0), axis=1) / s   # T[i, i-1]
    e_before = tl.where((rows >= 1) & (rows < n), e_before, 0.0)
    radius = tl.abs(e) + tl.abs(e_before)
    low = tl.min(tl.where(rows < n, d - radius, float("inf")), axis=0)
    high = tl.max(tl.where(rows < n, d + radius, -float("inf")), axis=0)
    # Gershgorin's interval holds every eigenvalue of T; the margin covers its own rounding.
    pad = 4.0 * eps * tl.maximum(tl.abs(low), tl.abs(high)) + 2.0 * pivmin
    low = low - pad
    high = high + pad
    scratch = pid.to(tl.int64) * BN
    tl.store(DS + scratch + rows, d)
    tl.store(E2S + scratch + rows, e * e)
    tl.debug_barrier()

    # 3. Bisection, lane j for the j-th smallest eigenvalue.
    left = tl.zeros_like(d) + low
    right = tl.zeros_like(d) + high
    for _ in range(0, iterations):
        mid = 0.5 * (left + right)
        q = tl.load(DS + scratch) - mid
        q = tl.where(tl.abs(q) < pivmin, -pivmin, q)
        count = tl.where(q < 0.0, 1, 0)
        for i in range(1, n):
            q = (tl.load(DS + scratch + i) - mid) - tl.load(E2S + scratch + i - 1) / q
            q = tl.where(tl.abs(q) < pivmin, -pivmin, q)
            count += tl.where(q < 0.0, 1, 0)
        below = count > rows
        right = tl.where(below, mid, right)
        left = tl.where(below, left, mid)
    lam = 0.5 * (left + right) * s
    lam = tl.where(finite, lam, float("nan"))
    tl.store(L + pid.to(tl.int64) * n + rows, lam, mask=rows < n)


def eigvalsh_tridiag_launcher(A: Tensor, upper: bool) -> Callable[[Tensor], Tensor]:
    """``run(A) -> L`` for tensors of ``A``'s shape, strides, dtype and device: the launch bound once
    per call signature (the op's plan keeps ``run``)."""
    *batch, n, _ = A.shape
    nb = math.prod(batch)
    dt, dev = A.dtype, A.device
    if nb == 0 or n == 0:
        return lambda A: torch.empty(batch + [n], dtype=dt, device=dev)
    sa, copy = stack_strides(A)
    BN = block(n)
    finfo = torch.finfo(dt)
    launch = _tridiag_eigvalsh_kernel.bind((nb,), None, None, None, None, n, *sa, finfo.eps, finfo.tiny,
                                           ITERATIONS[dt], BN=BN, UPPER=upper, num_warps=warps(BN * BN))

    def run(A: Tensor) -> Tensor:
        L = torch.empty(batch + [n], dtype=dt, device=dev)
        scratch = torch.empty(2, nb, BN, dtype=dt, device=dev)
        launch(as3(A) if copy else A, L, scratch[0], scratch[1])
        return L

    return run


def eigvalsh_tridiag(A: Tensor, upper: bool) -> Tensor:
    """Eigenvalues, ascending, of the symmetric matrices ``A`` ``(*, n, n)`` (``n ≤ MAX_N``,
    float32/float64) from the triangle ``upper`` names."""
    return eigvalsh_tridiag_launcher(A, upper)(A)
