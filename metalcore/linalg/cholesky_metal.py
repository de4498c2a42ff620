"""Cholesky on Metal: the host side of ``cholesky_<dtype>`` in ``shaders/linalg.metal``.

One threadgroup per matrix, the matrix in threadgroup memory: float32 with ``n`` up to
``METALCORE_LINALG_MAX_N`` (64: a 16 KiB tile of Apple's 32 KiB). float64 (no such type on Apple
GPUs) and larger matrices stay on the reference through ``supports``.
"""

import math

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.linalg._small_metal import fits, kernel, threads_for
from metalcore.linalg.cholesky import cholesky_ex_op


def cholesky_launch(A: Tensor, upper: bool) -> tuple[Tensor, Tensor]:
    """``(L, info)`` for ``A`` ``(*, n, n)`` float32, ``n <= METALCORE_LINALG_MAX_N``; ``L`` contiguous."""
    n = A.shape[-1]
    L = _metal.empty(A.shape, dtype=A.dtype, device=A.device)
    info = _metal.empty(A.shape[:-2], dtype=torch.int32, device=A.device)
    A3 = A.reshape(math.prod(A.shape[:-2]), n, n).contiguous()
    nb = A3.shape[0]
    if nb == 0:
        return L, info
    if n == 0:
        return L, info.zero_()
    tg = threads_for(n * n)
    _metal.launch(*kernel("cholesky", A), A3, L, info, n, int(upper), threads=nb * tg, group_size=tg)
    return L, info


@cholesky_ex_op.implement("metal", supports=lambda A, upper, check_errors: fits(A))
def _cholesky_ex_metal(A: Tensor, upper: bool, check_errors: bool) -> tuple[Tensor, Tensor]:
    return cholesky_launch(A, upper)
