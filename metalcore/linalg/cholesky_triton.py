"""Cholesky factorization in Triton: one program per matrix (or per group of tiny ones), in registers.

Layers: ``_cholesky_kernel`` → :func:`cholesky_launch` → the ``triton`` implementation of
``metalcore::cholesky_ex`` (declared in :mod:`metalcore.linalg.cholesky`).

The kernel loads the read triangle of ``A`` mirrored into a full symmetric ``[G, BN, BN]`` tile and
runs the right-looking unblocked algorithm (LAPACK ``potf2``): for each column ``k`` the pivot
``d = A[k, k]``, ``l = A[k:, k] / √d``, then the symmetric rank-1 update of the trailing block.
The first ``k`` with ``d ≤ 0`` or NaN sets ``info = k + 1`` for that matrix alone and freezes its
tile (LAPACK leaves the remaining columns as they are); the other matrices of the program carry on.

The rank-1 update needs ``l`` both as a column and as a row; the row is ``l`` moved to the other
slice layout (a ``convert_layout``). Reading row ``k`` of the symmetric trailing block by a second
reduction instead avoids the conversion but was slower at every size on the H100 (1.2-3x, e.g.
75 vs 27 µs at 1000×32, bench/linalg_triton.md v3), so it was removed. The launch shape (matrices
and warps per program) follows :func:`launch_shape`, fitted to that sweep; the launcher's keywords
override it for sweeps.

Work per matrix: ``n`` steps of ``O(BN²)`` masked tile operations, i.e. ``~3 n³`` flops against the
``n³/3`` of the algorithm; at ``n ≤ 128`` the steps' reductions (latency), not the flops, set the
time. Bytes: ``A`` read once, ``L`` written once, ``8 n²`` bytes per matrix in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore.linalg._small_triton import GROUP_ELEMENTS, MAX_N, batched, block, fits, group, stack_strides
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore._triton import cdiv, jit


@jit
def _cholesky_kernel(A, L, INFO, batch, n, s_ab, s_ar, s_ac,
                     G: tl.constexpr, BN: tl.constexpr, UPPER: tl.constexpr):
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
        a = tl.where(ok & (r3 > k) & (c3 > k), a - l[:, :, None] * l[:, None, :], a)
        a = tl.where(ok & (c3 == k) & (r3 >= k), l[:, :, None], a)

    out = L + g3.to(tl.int64) * n * n
    if UPPER:
        # U = Lᵀ: element (r, c) of the lower factor goes to (c, r).
        tl.store(out + c3 * n + r3, tl.where(r3 >= c3, a, 0.0), mask=inside)
    else:
        tl.store(out + r3 * n + c3, tl.where(r3 >= c3, a, 0.0), mask=inside)
    tl.store(INFO + g, info, mask=g < batch)


# Launch shape, fitted to the H100 sweep (fp32, GPU µs, bench/linalg_triton.md v3):
# - matrices per program: tiny ones (BN ≤ 8) packed to GROUP_ELEMENTS (10000×3: 32 a program 2.7 µs,
#   8 a program 3.4; 4096×8: 8 a program 4.7, 2 a program 5.2); from BN = 16 one matrix a program
#   (500×16: 6.3 µs alone, 8.3 two to a program).
# - warps: one per 512 tile elements, at most 16 (1000×32: 2 warps 26.7 µs, 1 27.4, 4 28.4;
#   100×64: 8 warps 44.0, 4 57.2, 2 77.4; 64×128: 16 warps 209, 8 258).
# fp64 (not timed) takes the same shape: ptxas (sm_90) fits 64×64 on 8 warps in 120 registers, and
# 128×128 on 16 warps in 128 (all that 16 warps may have) with 16 bytes a thread spilled.
ELEMENTS_PER_WARP = 512
PACK_MAX_BN = 8


def launch_shape(n: int, batch: int, device: torch.device) -> dict:
    """Default ``group_size`` and ``num_warps`` of :func:`cholesky_launch` for ``batch`` matrices of
    side ``n`` (the rule above)."""
    BN = block(n)
    G = group(batch, BN * BN, device, GROUP_ELEMENTS if BN <= PACK_MAX_BN else 1)
    return {"group_size": G, "num_warps": min(16, max(1, G * BN * BN // ELEMENTS_PER_WARP))}


def cholesky_launcher(A: Tensor, upper: bool, *, num_warps: int | None = None,
                      group_size: int | None = None) -> Callable[..., tuple[Tensor, Tensor]]:
    """``run(A) -> (L, info)`` for tensors of ``A``'s shape, strides, dtype and device: the launch of
    :func:`cholesky_launch` with strides, launch shape and grid worked out here, once per call
    signature (the op's plan keeps ``run``), so that a call only allocates and launches."""
    shape, dtype, device = A.shape, A.dtype, A.device
    n, nb = shape[-1], math.prod(shape[:-2])
    if nb == 0 or n == 0:
        return lambda A, *_: (torch.empty(shape, dtype=dtype, device=device),
                              torch.zeros(shape[:-2], dtype=torch.int32, device=device))
    strides, copy = stack_strides(A)
    default = launch_shape(n, nb, device)
    G = group_size or default["group_size"]
    launch = _cholesky_kernel.bind((cdiv(nb, G),), None, None, None, nb, n, *strides,
                                   G=G, BN=block(n), UPPER=upper, num_warps=num_warps or default["num_warps"])

    def run(A: Tensor, *_: object) -> tuple[Tensor, Tensor]:
        L = torch.empty(shape, dtype=dtype, device=device)
        info = torch.empty(shape[:-2], dtype=torch.int32, device=device)   # every element is stored
        launch(batched(A) if copy else A, L, info)
        return L, info

    return run


def cholesky_launch(A: Tensor, upper: bool, *, num_warps: int | None = None,
                    group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """``(L, info)`` for ``A`` ``(*, n, n)`` float32/float64, ``n ≤ MAX_N``; ``L`` contiguous.

    The keywords override :func:`launch_shape` (for sweeps): warps per program and matrices per
    program (a power of two)."""
    return cholesky_launcher(A, upper, num_warps=num_warps, group_size=group_size)(A)


# Chosen automatically up to n = 64, where its GPU time beat torch.linalg.cholesky_ex on the H100
# (fp32, bench/linalg_triton.md v3): 10000×3 2.7 vs 30.5 µs, 4096×8 4.7 vs 28.1, 500×16 6.3 vs 19.3,
# 1000×32 26.7 vs 46.5, 100×64 44.0 vs 64.2; at 64×128 it loses (209 vs 142: 128 dependent steps on
# 64 programs). What remains for tiny batches is host time: ~40-55 µs to issue a call against
# torch's ~30, so from an idle GPU a single small call is ~0.6-0.9x torch's. fp64 (not timed) follows
# the same rule: the time is the chain of dependent reductions, not the FMA rate.
AUTO_MAX_N = 64


def _automatic(A, upper, check_errors):
    return A.shape[-1] <= AUTO_MAX_N


@cholesky_ex_op.implement("triton", supports=lambda A, upper, check_errors: fits(A, max_n=MAX_N),
                          automatic=_automatic, specialize=lambda A, upper, check_errors: cholesky_launcher(A, upper))
def _cholesky_ex_triton(A, upper, check_errors):
    return cholesky_launch(A, upper)
