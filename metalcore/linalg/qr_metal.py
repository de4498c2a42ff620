"""Householder QR on Metal: the host side of ``qr_<dtype>`` in ``shaders/linalg.metal``.

One threadgroup per matrix factors it in threadgroup memory as LAPACK ``geqr2`` does (reflectors
below the diagonal, ``R`` on and above it, ``τ`` beside), then each SIMD-group forms whole columns of
``Q`` in registers by applying the reflectors to unit vectors (``org2r``); ``A`` is read once, ``R``
and ``Q`` written once. Modes ``reduced``, ``complete`` and ``r``. float32 with both sides up to
``METALCORE_LINALG_MAX_N``; larger float32 matrices go to the blocked QR of
:mod:`metalcore.linalg.qr_blocked_metal` (panel shader + matrix products); float64 stays on the
reference. Automatic on MPS like the other Metal kernels: the alternative there is torch's CPU
fallback for ``linalg.qr`` (no Apple hardware here to time either).
"""

import math

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.linalg import qr_blocked_metal
from metalcore.linalg._small_metal import kernel, threads_for
from metalcore.linalg.qr import qr_op


def qr_launch(A: Tensor, kr: int, nq: int) -> tuple[Tensor, Tensor]:
    """``(Q, R)`` of ``A`` ``(*, m, n)`` with ``R`` ``(*, kr, n)`` (``kr`` = k or m) and ``Q``
    ``(*, m, nq)`` (``nq`` = 0, k or m)."""
    *batch, m, n = A.shape
    Q = _metal.empty((*batch, m, nq), dtype=A.dtype, device=A.device)
    R = _metal.empty((*batch, kr, n), dtype=A.dtype, device=A.device)
    A3 = A.reshape(math.prod(batch), m, n).contiguous()
    nb = A3.shape[0]
    if nb == 0:
        return Q, R
    if A.numel() == 0:  # k = 0: no reflectors, Q = I, R = 0
        return Q.copy_(torch.eye(m, nq, dtype=A.dtype, device=A.device).expand_as(Q)), R.zero_()
    tg = threads_for(m * n)
    # Q and R buffers of zero size are not passed to a kernel: one dummy element stands in.
    Qk = Q if Q.numel() else A3.new_empty(1)
    Rk = R if R.numel() else A3.new_empty(1)
    _metal.launch(*kernel("qr", A), A3, Qk, Rk, m, n, kr, nq, threads=nb * tg, group_size=tg)
    return Q, R


def _supported(A: Tensor, mode: str) -> bool:
    return qr_blocked_metal.small(A) or qr_blocked_metal.blocked_supported(A)


@qr_op.implement("metal", supports=_supported)
def _qr_metal(A: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    if not qr_blocked_metal.small(A):
        return qr_blocked_metal.qr_blocked_metal(A, mode)
    m, n = A.shape[-2:]
    k = min(m, n)
    if mode == "r":
        _, R = qr_launch(A, k, 0)
        return A.new_empty(0), R
    if mode == "complete":
        return qr_launch(A, m, m)
    return qr_launch(A, k, k)
