"""``larft`` and ``larfb`` as GEMM compositions, on any device (no Triton needed): the CUDA backend of
both ops (:mod:`metalcore.linalg.householder_triton`) and the blocked QR's level-3 steps on CUDA and
MPS (:mod:`metalcore.linalg.qr_blocked`).

For the block sizes that matter (``k`` = 32 to 128 reflectors over thousands of rows) both ops are
a few GEMMs: ``larft`` costs one ``Vᴴ V`` (``2 m k²`` flops), ``larfb`` two panel GEMMs
(``4 m k p``). cuBLAS runs those near the fp32 peak, so the work here is to issue as few passes as
possible, not to write a GEMM:

* ``larfb`` forms the unit-trapezoidal ``V`` once, computes ``W = T' (Vᴴ C)`` (or ``(C V) T'``) and
  folds the subtraction into the second GEMM (``baddbmm`` with ``alpha = −1``): one pass over ``C``
  less than ``C − V (T (Vᴴ C))``, and in place when the caller owns ``C`` (the blocked QR's trailing
  update).
* ``larft`` builds ``T`` from ``S = striu(Vᴴ V)`` by recursive doubling instead of a triangular
  solve: with ``V = [V₁ V₂]`` split in halves, ``T = [[T₁, −T₁ S₁₂ T₂], [0, T₂]]`` (the recursive
  form of LAPACK's ``larft``, Elmroth & Gustavson 2000). All the diagonal blocks of one size are
  done at once as a batch, so ``T`` takes ``2 log₂ k`` small batched GEMMs. A zero ``τ_i`` leaves
  row and column ``i`` of ``T`` exactly zero, as LAPACK sets them.

Precision: fp32 GEMMs go through ``torch.matmul``/``baddbmm``, which follow
``torch.backends.cuda.matmul.allow_tf32`` (off by default): TF32 only if the user opted in; this
module never changes that setting.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def as3(x: Tensor) -> Tensor:
    """``x`` ``(*, p, q)`` as ``(batch, p, q)`` (explicit batch size: ``-1`` is ambiguous for 0 × q)."""
    return x.reshape(math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1])


def larft_gemm(Vu: Tensor, tau: Tensor) -> Tensor:
    """``T`` ``(B, k, k)`` of the block reflector from the explicit unit-trapezoidal ``Vu``
    ``(B, m, k)`` and ``tau`` ``(B, k)``, by recursive doubling (module docstring)."""
    B, _, k = Vu.shape
    K = 1 << (max(k, 1) - 1).bit_length()  # the next power of two
    # Padding with τ = 0 reflectors gives zero rows and columns of T, sliced off at the end.
    S = torch.zeros(B, K, K, dtype=Vu.dtype, device=Vu.device)
    S[:, :k, :k] = torch.bmm(Vu.mT, Vu).triu(1)
    T = torch.zeros(B, K, K, dtype=Vu.dtype, device=Vu.device)
    T.diagonal(dim1=-2, dim2=-1)[:, :k] = tau
    b = 1
    while b < K:
        # The K/(2b) diagonal blocks of side 2b of T and S, as (B, K/(2b), 2b, 2b) views.
        p = K // (2 * b)
        Td = T.view(B, p, 2 * b, p, 2 * b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        Sd = S.view(B, p, 2 * b, p, 2 * b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        Td[..., :b, b:] = -(Td[..., :b, :b] @ Sd[..., :b, b:]) @ Td[..., b:, b:]
        b *= 2
    return T[:, :k, :k]


def larfb_gemm(Vu: Tensor, T: Tensor, C: Tensor, left: bool, transpose: bool, *, inplace: bool = False) -> Tensor:
    """``H C`` / ``C H`` (``Hᴴ`` when ``transpose``) with ``H = I − Vu T Vuᵀ``: all ``(B, ·, ·)``,
    ``Vu`` explicit unit trapezoidal, ``T`` upper triangular (its lower part must be zero).
    ``inplace`` overwrites ``C`` (any strided view whose rows or columns are unit-stride)."""
    Tt = T.mT if transpose else T
    if left:
        W = Tt @ torch.bmm(Vu.mT, C)
        return C.baddbmm_(Vu, W, alpha=-1) if inplace else torch.baddbmm(C, Vu, W, alpha=-1)
    W = torch.bmm(C, Vu) @ Tt
    return C.baddbmm_(W, Vu.mT, alpha=-1) if inplace else torch.baddbmm(C, W, Vu.mT, alpha=-1)
