"""``larft`` and ``larfb`` on CUDA: the ``triton`` backend of both ops, as the GEMM compositions of
:mod:`metalcore.linalg.householder_gemm` (no Triton kernel: for the block sizes that matter, batched
cuBLAS GEMMs serve every size).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metalcore.linalg.householder import _unit_lower, larfb_op, larft_op
from metalcore.linalg.householder_gemm import as3, larfb_gemm, larft_gemm


def _supports(*tensors: Tensor) -> bool:
    return all(t.dtype in (torch.float32, torch.float64) for t in tensors)


# Not automatic: timed alone on the H100 (bench/scripts/qr_large_check.py) the recursive doubling
# took 0.51-0.71 ms against the reference's GEMM + one triangular solve at 0.14-0.18 ms (m = 4096
# and 11008, k = 32-128): its ~2 log₂ k small launches cost more than the solve.
@larft_op.implement("triton", supports=lambda V, tau: _supports(V, tau), automatic=False)
def _larft_triton(V, tau):
    *batch, m, k = V.shape
    return larft_gemm(as3(_unit_lower(V)), tau.reshape(math.prod(batch), k)).reshape(*batch, k, k)


# Automatic: the reference's GEMMs with one pass over C fewer (the subtraction is in the GEMM); on
# the H100 0.73 vs 0.77 ms at 11008 × 128 with 3968 columns of C, 0.24 vs 0.24 ms at 4096 × 32.
@larfb_op.implement("triton", supports=lambda V, T, C, left, transpose: _supports(V, T, C))
def _larfb_triton(V, T, C, left, transpose):
    out = larfb_gemm(as3(_unit_lower(V)), as3(T.triu()), as3(C), left, transpose)
    return out.reshape(C.shape)
