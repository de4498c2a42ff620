"""Solve with a Cholesky factor on Metal: the host side of ``cholesky_solve_<dtype>`` in
``shaders/linalg.metal``.

One dispatch does both substitutions (``L y = b``, then ``Lᵀ x = y``): each threadgroup loads its
factor once, with the read triangle mirrored into the other so that both orientations are plain
row-major triangles of the same tile, and each SIMD-group carries whole right-hand-side columns
through both solves in registers. Two launches of ``trsm_<dtype>`` would load the factor twice and
write and re-read the intermediate ``Y`` through device memory; the kernel here costs one more
shader entry point and no new arithmetic (it reuses ``trsm``'s substitution). Not timed: there is
no Apple hardware in CI, only the CPU executor, so this is argued from memory traffic, not measured.

float32 with ``n`` up to ``METALCORE_LINALG_MAX_N`` and any number of right-hand sides; float64 and
larger factors stay on the reference (``torch.cholesky_solve``).
"""

import math

from torch import Tensor

from metalcore import _metal
from metalcore.linalg._small_metal import fits, kernel, rhs_threads
from metalcore.linalg.cholesky_solve import cholesky_solve_op


def cholesky_solve_launch(B: Tensor, L: Tensor, upper: bool) -> Tensor:
    """``X`` with ``L Lᵀ X = B`` (``Uᵀ U X = B`` when ``upper``); ``L`` ``(*, n, n)``, ``B``
    ``(*, n, k)`` with the same batch shape, float32, ``n <= METALCORE_LINALG_MAX_N``."""
    n, k = B.shape[-2:]
    X = _metal.empty(B.shape, dtype=B.dtype, device=B.device)
    if X.numel() == 0:
        return X
    L3 = L.reshape(math.prod(L.shape[:-2]), n, n).contiguous()
    B3 = B.reshape(L3.shape[0], n, k).contiguous()
    tg = rhs_threads(k)
    _metal.launch(*kernel("cholesky_solve", L), L3, B3, X, n, k, int(upper), threads=L3.shape[0] * tg,
                  group_size=tg)
    return X


def _supported(B: Tensor, L: Tensor, upper: bool) -> bool:
    return fits(L) and B.dtype == L.dtype and B.device == L.device and B.shape[:-2] == L.shape[:-2]


@cholesky_solve_op.implement("metal", supports=_supported)
def _cholesky_solve_metal(B: Tensor, L: Tensor, upper: bool) -> Tensor:
    return cholesky_solve_launch(B, L, upper)
