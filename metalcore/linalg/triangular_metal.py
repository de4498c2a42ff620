"""Triangular solve on Metal: the host side of ``trsm_<dtype>`` in ``shaders/linalg.metal``.

One threadgroup per matrix holds the read triangle of ``A`` in threadgroup memory; each SIMD-group
solves whole right-hand-side columns by substitution (one dot product across the 32 lanes per row),
so any number of columns runs with one load of ``A``. ``X A = B`` is solved as ``Aᵀ Xᵀ = Bᵀ``
through transposed indexing (no copies beyond making operands contiguous). float32 with ``n`` up to
``METALCORE_LINALG_MAX_N``; float64 and larger matrices stay on the reference.
"""

import math

from torch import Tensor

from metalcore import _metal
from metalcore.linalg._small_metal import fits, kernel, rhs_threads
from metalcore.linalg.triangular import solve_triangular_op


def solve_triangular_launch(A: Tensor, B: Tensor, upper: bool, left: bool, unitriangular: bool) -> Tensor:
    """``X`` with ``A X = B`` (``X A = B`` when not ``left``); ``A`` ``(*, n, n)``, ``B`` ``(*, n, k)``
    (``(*, k, n)``) with the same batch shape, float32, ``n <= METALCORE_LINALG_MAX_N``."""
    n = A.shape[-1]
    X = _metal.empty(B.shape, dtype=B.dtype, device=B.device)
    if X.numel() == 0:
        return X
    A3 = A.reshape(math.prod(A.shape[:-2]), n, n).contiguous()
    B3 = B.reshape(math.prod(B.shape[:-2]), *B.shape[-2:]).contiguous()
    k = B.shape[-1] if left else B.shape[-2]
    # Element (i, q) of the left-sided right-hand side: B[i, q] (left) or B[q, i] (right, Bᵀ).
    sr, sc = (k, 1) if left else (1, n)
    lower = not upper if left else upper  # Aᵀ swaps the triangles
    tg = rhs_threads(k)
    _metal.launch(*kernel("trsm", A), A3, B3, X, n, k, sr, sc, int(lower), int(unitriangular), int(not left),
                  threads=A3.shape[0] * tg, group_size=tg)
    return X


def _supported(A: Tensor, B: Tensor, upper: bool, left: bool, unitriangular: bool) -> bool:
    # Any number of right-hand sides: only A's side is bounded by the tile.
    return fits(A) and B.dtype == A.dtype and B.device == A.device and B.shape[:-2] == A.shape[:-2]


@solve_triangular_op.implement("metal", supports=_supported)
def _solve_triangular_metal(A: Tensor, B: Tensor, upper: bool, left: bool, unitriangular: bool) -> Tensor:
    return solve_triangular_launch(A, B, upper, left, unitriangular)
