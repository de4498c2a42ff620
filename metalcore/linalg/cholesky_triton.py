"""Cholesky factorization in Triton: one program per matrix (or per group of tiny ones), in registers.

Layers: ``_cholesky_kernel`` → :func:`cholesky_launch` → the ``triton`` implementation of
``metalcore::cholesky_ex`` (declared in :mod:`metalcore.linalg.cholesky`).

The kernel loads the read triangle of ``A`` mirrored into a full symmetric ``[G, BN, BN]`` tile and
runs the right-looking unblocked algorithm (LAPACK ``potf2``): for each column ``k`` the pivot
``d = A[k, k]``, ``l = A[k:, k] / √d``, then the symmetric rank-1 update of the trailing block.
The first ``k`` with ``d ≤ 0`` or NaN sets ``info = k + 1`` for that matrix alone and freezes its
tile (LAPACK leaves the remaining columns as they are); the other matrices of the program carry on.

The rank-1 update needs ``l`` both as a column and as a row; the row is either ``l`` moved to the
other slice layout (a ``convert_layout``: a shared-memory round trip each step) or, with ``ROW``,
row ``k`` of the (symmetric) trailing block reduced along the rows, which needs no conversion. The
launcher's keywords choose it and the launch shape, so a device sweep can pick the default.

Work per matrix: ``n`` steps of ``O(BN²)`` masked tile operations, i.e. ``~3 n³`` flops against the
``n³/3`` of the algorithm; at ``n ≤ 128`` the steps' reductions (latency), not the flops, set the
time. Bytes: ``A`` read once, ``L`` written once, ``8 n²`` bytes per matrix in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from metalcore.linalg._small_triton import MAX_N, batched, block, fits, group, warps
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.nn._jit_triton import jit


@jit
def _cholesky_kernel(A, L, INFO, batch, n, s_ab, s_ar, s_ac,
                     G: tl.constexpr, BN: tl.constexpr, UPPER: tl.constexpr, ROW: tl.constexpr):
    g = tl.program_id(0) * G + tl.arange(0, G)
    r = tl.arange(0, BN)
    g3 = g[:, None, None]
    r3 = r[None, :, None]
    c3 = r[None, None, :]
    inside = (g3 < batch) & (r3 < n) & (c3 < n)
    hi = tl.maximum(r3, c3)
    lo = tl.minimum(r3, c3)
    base = A + g3.to(tl.int64) * s_ab
    # Only one triangle is read (LAPACK semantics); element (r, c) of the tile is A[max, min] (lower)
    # or A[min, max] (upper), so the other triangle may hold anything, NaN included.
    if UPPER:
        a = tl.load(base + lo * s_ar + hi * s_ac, mask=inside, other=0.0)
    else:
        a = tl.load(base + hi * s_ar + lo * s_ac, mask=inside, other=0.0)

    info = tl.zeros([G], dtype=tl.int32)
    for k in range(n):
        col = tl.sum(tl.where(c3 == k, a, 0.0), axis=2)            # [G, BN]: A[:, k]
        d = tl.sum(tl.where(r[None, :] == k, col, 0.0), axis=1)    # [G]: A[k, k]
        info = tl.where((info == 0) & ~(d > 0.0), k + 1, info)     # catches d ≤ 0 and NaN
        ok = (info == 0)[:, None, None]
        s = tl.sqrt(tl.where(info == 0, d, 1.0))[:, None]
        l = tl.where(r[None, :] >= k, col / s, 0.0)
        if ROW:
            # The trailing block stays symmetric, so row k equals column k there; reducing along
            # the rows yields it directly in the layout a row broadcast needs, where ``l[:, None, :]``
            # costs a layout conversion (a shared-memory round trip) every step.
            row = tl.sum(tl.where(r3 == k, a, 0.0), axis=1)        # [G, BN]: A[k, :]
            l_row = tl.where(r[None, :] >= k, row / s, 0.0)[:, None, :]
        else:
            l_row = l[:, None, :]
        a = tl.where(ok & (r3 > k) & (c3 > k), a - l[:, :, None] * l_row, a)
        a = tl.where(ok & (c3 == k) & (r3 >= k), l[:, :, None], a)

    out = L + g3.to(tl.int64) * n * n
    if UPPER:
        # U = Lᵀ: element (r, c) of the lower factor goes to (c, r).
        tl.store(out + c3 * n + r3, tl.where(r3 >= c3, a, 0.0), mask=inside)
    else:
        tl.store(out + r3 * n + c3, tl.where(r3 >= c3, a, 0.0), mask=inside)
    tl.store(INFO + g, info, mask=g < batch)


def cholesky_launch(A: Tensor, upper: bool, *, num_warps: int | None = None, group_size: int | None = None,
                    row_by_reduction: bool = False) -> tuple[Tensor, Tensor]:
    """``(L, info)`` for ``A`` ``(*, n, n)`` float32/float64, ``n ≤ MAX_N``; ``L`` contiguous.

    The keywords override the launch shape (for sweeps): warps per program, matrices per program
    (a power of two), and whether row ``k`` is a second reduction (``True``) or the transposed
    column (a layout conversion)."""
    n = A.shape[-1]
    L = torch.empty(A.shape, dtype=A.dtype, device=A.device)
    A3 = batched(A)
    nb = A3.shape[0]
    if nb == 0 or n == 0:
        return L, torch.zeros(A.shape[:-2], dtype=torch.int32, device=A.device)
    info = torch.empty(A.shape[:-2], dtype=torch.int32, device=A.device)   # every element is stored
    BN = block(n)
    G = group_size or group(nb, BN * BN, A.device)
    _cholesky_kernel[(triton.cdiv(nb, G),)](
        A3, L, info, nb, n, A3.stride(0), A3.stride(1), A3.stride(2),
        G=G, BN=BN, UPPER=upper, ROW=row_by_reduction, num_warps=num_warps or warps(G * BN * BN))
    return L, info


# Not chosen automatically: 0.51-0.67x torch.linalg.cholesky_ex on the H100 (500x16 .. 64x128, fp32,
# bench/linalg_triton.md v1) until the elimination loop is tuned.
@cholesky_ex_op.implement("triton", supports=lambda A, upper, check_errors: fits(A, max_n=MAX_N),
                          automatic=False)
def _cholesky_ex_triton(A, upper, check_errors):
    return cholesky_launch(A, upper)
