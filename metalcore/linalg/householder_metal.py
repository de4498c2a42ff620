"""Householder primitives on Metal: the host side of ``geqr2``, ``householder_product``, ``larft`` and
``larfb`` in ``shaders/linalg.metal`` (the contracts are in householder.py).

One threadgroup per matrix, float32:

* ``geqr2``: the factor phase of the QR shader (``dlarfg`` reflectors, scaled norms) on the whole
  ``m × n`` tile, writing the compact ``QR`` and ``tau`` as ``torch.geqrf`` does. Both sides up to
  ``METALCORE_LINALG_MAX_N``.
* ``householder_product``: ``org2r`` from the reflectors in the tile, one column of ``Q`` per
  SIMD-group in registers, as the QR shader forms its ``Q``. ``m`` up to ``METALCORE_LINALG_MAX_N``.
* ``larft``: LAPACK's column recurrence for ``T`` (``k × k`` in threadgroup memory), ``VᵀV`` read
  from device memory, so only ``k`` is bounded by ``METALCORE_LINALG_MAX_N``: a tall panel of any
  height works.
* ``larfb``: ``V`` and the upper triangle of ``T`` in threadgroup memory, one column of ``C``
  (a row, from the right) per SIMD-group; ``V``'s ``m`` up to ``METALCORE_LINALG_MAX_N``, any number
  of columns (rows) of ``C``.

float64, other dtypes and larger matrices stay on the reference.
"""

import math

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.linalg import qr_blocked, qr_blocked_metal
from metalcore.linalg._small_metal import fits, kernel, max_n, rhs_threads, threads_for
from metalcore.linalg.householder_gemm import as3
from metalcore.linalg.householder import geqr2_op, householder_product_op, larfb_op, larft_op

_F32 = torch.float32


def _stack(x: Tensor, nb: int) -> Tensor:
    """``x`` ``(*, r, c)`` as a contiguous ``(nb, r, c)`` stack (a copy only where needed)."""
    return x.reshape(nb, *x.shape[-2:]).contiguous()


def geqr2_launch(A: Tensor) -> tuple[Tensor, Tensor]:
    """``(QR, tau)`` of ``A`` ``(*, m, n)`` float32, both sides at most ``max_n()``."""
    *batch, m, n = A.shape
    k = min(m, n)
    QR = _metal.empty(A.shape, dtype=A.dtype, device=A.device)
    tau = _metal.empty((*batch, k), dtype=A.dtype, device=A.device)
    nb = math.prod(batch)
    if nb == 0 or k == 0:  # no reflectors: QR is A (an empty matrix), tau is empty
        return QR.copy_(A), tau
    tg = threads_for(m * n)
    _metal.launch(*kernel("geqr2", A), _stack(A, nb), QR, tau, m, n, threads=nb * tg, group_size=tg)
    return QR, tau


def householder_product_launch(A: Tensor, tau: Tensor) -> Tensor:
    """The first ``n`` columns of ``H₁ ⋯ H_k`` from ``A`` ``(*, m, n)`` and ``tau`` ``(*, k)``."""
    *batch, m, n = A.shape
    k = tau.shape[-1]
    Q = _metal.empty(A.shape, dtype=A.dtype, device=A.device)
    nb = math.prod(batch)
    if Q.numel() == 0:
        return Q
    if k == 0:  # no reflectors: the first n columns of the identity
        return Q.copy_(torch.eye(m, n, dtype=A.dtype, device=A.device).expand_as(Q))
    tg = threads_for(m * n)
    tau2 = tau.expand(*batch, k).reshape(nb, k).contiguous()
    _metal.launch(*kernel("householder_product", A), _stack(A, nb), tau2, Q, m, n, k,
                  threads=nb * tg, group_size=tg)
    return Q


def larft_launch(V: Tensor, tau: Tensor) -> Tensor:
    """``T`` ``(*, k, k)`` of the reflectors ``V`` ``(*, m, k)`` and ``tau`` ``(*, k)``, ``k <= max_n()``."""
    *batch, m, k = V.shape
    T = _metal.empty((*batch, k, k), dtype=V.dtype, device=V.device)
    nb = math.prod(batch)
    if T.numel() == 0:
        return T
    tg = threads_for(k * k)
    _metal.launch(*kernel("larft", V), _stack(V, nb), tau.reshape(nb, k).contiguous(), T, m, k,
                  threads=nb * tg, group_size=tg)
    return T


def larfb_launch(V: Tensor, T: Tensor, C: Tensor, left: bool, transpose: bool) -> Tensor:
    """``H C`` (``left``) or ``C H`` with ``H = I − V T Vᵀ`` (``Tᵀ`` when ``transpose``); ``V``, ``T``,
    ``C`` with one batch shape (the public function broadcasts them), ``V`` at most ``max_n()`` rows."""
    *batch, p, q = C.shape
    m, k = V.shape[-2:]
    X = _metal.empty(C.shape, dtype=C.dtype, device=C.device)
    nb = math.prod(batch)
    if X.numel() == 0:
        return X
    if k == 0:  # H = I
        return X.copy_(C)
    # From the right, C H = (Hᵀ Cᵀ)ᵀ: the kernel works on the columns of Cᵀ (rows of C, read through
    # transposed strides) with Tᵀ in place of T.
    ncol = q if left else p
    sr, sc = (q, 1) if left else (1, q)
    tg = rhs_threads(ncol)
    trans_t = transpose if left else not transpose
    _metal.launch(*kernel("larfb", C), _stack(V, nb), _stack(T, nb), _stack(C, nb), X, m, k, ncol, sr, sc,
                  int(trans_t), threads=nb * tg, group_size=tg)
    return X


# Beyond the tile, float32 geqr2 and householder_product take the blocked path of
# qr_blocked_metal (tall-panel shader, GEMM larft/larfb), as qr does.
@geqr2_op.implement("metal", supports=lambda A: fits(A) or qr_blocked_metal.blocked_supported(A))
def _geqr2_metal(A: Tensor) -> tuple[Tensor, Tensor]:
    if qr_blocked_metal.small(A):
        return geqr2_launch(A)
    *batch, m, n = A.shape
    QR, tau, _ = qr_blocked.geqrf_blocked(as3(A), qr_blocked_metal.NB, qr_blocked_metal.geqr2_panel_launch)
    return QR.reshape(A.shape), tau.reshape(*batch, min(m, n))


def _householder_product_supported(A: Tensor, tau: Tensor) -> bool:
    m, n = A.shape[-2:] if A.dim() >= 2 else (0, 1)
    return fits(A) and tau.dtype == A.dtype and tau.device == A.device and tau.shape[-1] <= n <= m


@householder_product_op.implement("metal", supports=lambda A, tau: _householder_product_supported(A, tau) or (
    qr_blocked_metal.blocked_supported(A) and tau.dtype == A.dtype and tau.device == A.device))
def _householder_product_metal(A: Tensor, tau: Tensor) -> Tensor:
    if _householder_product_supported(A, tau) and qr_blocked_metal.small(A):
        return householder_product_launch(A, tau)
    return qr_blocked.householder_product_blocked(A, tau, qr_blocked_metal.NB)


def _larft_supported(V: Tensor, tau: Tensor) -> bool:
    # T is the tile; V is read from device memory, so its height is free (up to 32-bit row offsets).
    if V.dtype != _F32 or tau.dtype != _F32 or V.dim() < 2 or tau.device != V.device:
        return False
    m, k = V.shape[-2:]
    return k <= min(m, max_n()) and tau.shape == (*V.shape[:-2], k) and m * k < 2**31


@larft_op.implement("metal", supports=_larft_supported)
def _larft_metal(V: Tensor, tau: Tensor) -> Tensor:
    return larft_launch(V, tau)


def _larfb_supported(V: Tensor, T: Tensor, C: Tensor, left: bool, transpose: bool) -> bool:
    # V is the tile; C may have any number of columns (rows from the right), one SIMD-group each.
    if not fits(V) or T.dtype != _F32 or C.dtype != _F32 or T.device != V.device or C.device != V.device:
        return False
    m, k = V.shape[-2:]
    return (m >= k and T.shape == (*V.shape[:-2], k, k) and C.dim() == V.dim() and C.shape[:-2] == V.shape[:-2]
            and (C.shape[-2] if left else C.shape[-1]) == m and C.numel() < 2**31)


@larfb_op.implement("metal", supports=_larfb_supported)
def _larfb_metal(V: Tensor, T: Tensor, C: Tensor, left: bool, transpose: bool) -> Tensor:
    return larfb_launch(V, T, C, left, transpose)
