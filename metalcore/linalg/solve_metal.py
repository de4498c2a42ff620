"""General solve by LU with partial pivoting on Metal: the host side of ``lu_solve_<dtype>`` in
``shaders/linalg.metal``.

One threadgroup per matrix factors it in threadgroup memory as LAPACK ``getf2`` does, then each
SIMD-group solves whole right-hand-side columns by forward and back substitution. ``X A = B`` is
solved as ``Aᵀ Xᵀ = Bᵀ`` through transposed indexing. ``A`` and ``B`` broadcast over their batch
dimensions (each broadcast copy of a matrix is factored again); ``info`` keeps ``A``'s batch shape.
float32 with ``n`` up to ``METALCORE_LINALG_MAX_N``; float64 and larger matrices stay on the reference.
"""

import math

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.linalg._small_metal import fits, kernel, threads_for
from metalcore.linalg.solve import solve_ex_op


def solve_launch(A: Tensor, B: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """``(X, info)`` with ``A X = B`` (``X A = B`` when not ``left``); ``A`` ``(*a, n, n)``, ``B``
    ``(*b, n, k)`` (``(*b, k, n)``) with broadcastable batch shapes; ``info`` has shape ``*a``."""
    n = A.shape[-1]
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    X = _metal.empty((*batch, *B.shape[-2:]), dtype=B.dtype, device=B.device)
    info = torch.zeros(A.shape[:-2], dtype=torch.int32, device=A.device)
    A3 = A.expand(*batch, n, n).reshape(math.prod(batch), n, n).contiguous()
    nb = A3.shape[0]
    if nb == 0 or n == 0:
        return X.zero_(), info
    k = B.shape[-1] if left else B.shape[-2]
    if k == 0:
        # No right-hand sides: info still reports singular matrices (as torch does); one column of
        # zeros runs the factorization.
        B3, Xk, k, sr, sc = A3.new_zeros(nb, n, 1), A3.new_empty(nb, n, 1), 1, 1, 1
    else:
        B3 = B.expand(*batch, *B.shape[-2:]).reshape(nb, *B.shape[-2:]).contiguous()
        Xk = X
        # Element (i, q) of the left-sided right-hand side: B[i, q] (left) or B[q, i] (right, Bᵀ).
        sr, sc = (k, 1) if left else (1, n)
    info_full = _metal.empty(batch, dtype=torch.int32, device=A.device)
    tg = threads_for(n * n)
    _metal.launch(*kernel("lu_solve", A), A3, B3, Xk, info_full, n, k, sr, sc, int(not left),
                  threads=nb * tg, group_size=tg)
    # info belongs to A's batch shape: every broadcast copy of a matrix has the same info.
    lead = len(batch) - (A.dim() - 2)
    dims = [i for i in range(len(batch)) if i < lead or (A.shape[i - lead] == 1 and batch[i] != 1)]
    info = (info_full.amax(dim=dims) if dims else info_full).reshape(A.shape[:-2])
    return X, info


def _supported(A: Tensor, B: Tensor, left: bool, check_errors: bool) -> bool:
    # Any number of right-hand sides: only A's side is bounded by the tile.
    return fits(A) and B.dtype == A.dtype and B.device == A.device and B.dim() >= 2


@solve_ex_op.implement("metal", supports=_supported)
def _solve_ex_metal(A: Tensor, B: Tensor, left: bool, check_errors: bool) -> tuple[Tensor, Tensor]:
    return solve_launch(A, B, left)
