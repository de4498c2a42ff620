"""Singular value decomposition on Metal: the host side of ``jacobi_svd_<dtype>`` in
``shaders/jacobi.metal``, with ``U`` from ``qr_<dtype>`` in ``shaders/linalg.metal``.

Layers: the shaders → :func:`svd_launch` → the ``metal`` implementation of ``metalcore::svd``
(declared in :mod:`metalcore.linalg.svd`), which serves ``linalg.svd``, ``linalg.svdvals`` and the
top-level ``svd``.

The algorithm is that of :mod:`metalcore.linalg.svd_triton`: parallel one-sided (Hestenes) Jacobi
in the round-robin ordering on the tall orientation (a wide ``A`` is read as ``Aᵀ`` through strides,
and ``U`` and ``V`` swap roles), on the matrix divided by ``max|a|``, rotating a column pair while
``|a_pᵀa_q| > m·ε·‖a_p‖·‖a_q‖`` (``gesvj`` uses ``√m·ε``, about the rounding error of the computed
``a_pᵀa_q`` itself; ``m·ε`` as in the Triton kernel), at most ``MAX_SWEEPS`` sweeps; a matrix that
does not converge, or holds NaN/Inf, comes back as all NaN without touching the rest of the batch.
``S`` descends; ``U`` is the Householder QR of ``W = A V`` (sorted), with column signs from
``diag R``: ``W``'s columns are orthogonal to ``tol``, so ``R`` is diagonal to that accuracy and ``U``
is orthonormal to working precision even where ``S_j = 0``, and ``full_matrices`` is the complete
``Q``. float32 with both sides up to ``METALCORE_LINALG_MAX_N`` (64).

float32 matrices with both sides from ``svd_large.LARGE_MIN_N`` take :func:`svd_large` (QR + QDWH
polar + eigh, device-generic), whose QRs go through the qr op and so, on MPS, through the blocked
QR of :mod:`metalcore.linalg.qr_blocked_metal`; its ``torch.linalg.eigh`` of the ``n × n`` factor is
torch's CPU fallback on MPS. The threshold is svd_large's, not a Metal one: below it the reference
(torch's CPU fallback for ``linalg.svd`` on MPS) does ``O(n³)`` work once on the CPU while this path
would add the same order of CPU work (eigh) to its GPU QRs and GEMMs, and without Apple hardware
nothing here is timed to say where that crossover lies. Sides between 65 and the threshold, and
float64, stay on the reference through ``supports``.
"""

import math

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.linalg import svd_large as _large
from metalcore.linalg._small_metal import fits
from metalcore.linalg.qr_metal import qr_launch
from metalcore.linalg.svd import svd_op

SHADER = "jacobi"
# As for eigh: 30 sweeps is gesvj's bound. The test families took 2-20 sweeps up to 64 x 64 in float32:
# 20 for ill-conditioned (cond 1e6) and graded 63 x 63 and 64 x 64, where nearly parallel columns
# converge slowly (gesvj's QR preconditioning, not done here, would shorten that).
MAX_SWEEPS = 30
# Both sides at most this: the Jacobi shader (at most the tile side); read at call time, so that
# tests can send small matrices down the large path.
JACOBI_MAX = _metal.constants()["METALCORE_LINALG_MAX_N"]


def svd_launch(A: Tensor, full_matrices: bool, compute_uv: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, Vh)`` of ``A`` ``(*, m, n)`` float32, both sides at most ``METALCORE_LINALG_MAX_N``,
    with torch's shapes; ``U`` and ``Vh`` empty unless ``compute_uv``."""
    *batch, m, n = A.shape
    wide = m < n
    tm, tn = (n, m) if wide else (m, n)  # the tall problem the kernel solves: tm x tn, tm >= tn
    nb = math.prod(batch)
    A3 = A.reshape(nb, m, n).contiguous()
    S = _metal.empty((*batch, tn), dtype=A.dtype, device=A.device)
    # Without compute_uv the kernel writes S only: one dummy element stands in for W and Vh.
    W = _metal.empty((nb, tm, tn) if compute_uv else 1, dtype=A.dtype, device=A.device)
    Vh = _metal.empty((nb, tn, tn) if compute_uv else 1, dtype=A.dtype, device=A.device)
    if nb and tn:
        c = _metal.constants()
        width = c["METALCORE_SIMD_WIDTH"]
        # One SIMD-group per column pair of a round (tn / 2 rounded up), up to the threadgroup size.
        tg = width * min(c["METALCORE_LINALG_THREADS"] // width, (tn + 1) // 2)
        finfo = torch.finfo(A.dtype)
        sr, sc = (1, n) if wide else (n, 1)
        lib = _metal.library(SHADER, A.device)
        _metal.launch(lib, f"jacobi_svd_{_metal.dtype_suffix(A.dtype)}", A3, W, S, Vh, tm, tn, sr, sc,
                      int(compute_uv), tm * finfo.eps, finfo.tiny / finfo.eps, MAX_SWEEPS,
                      threads=nb * tg, group_size=tg)
    if not compute_uv:
        return A.new_empty(0), S, A.new_empty(0)
    nq = tm if full_matrices else tn
    if tn == 0:  # no singular values: U is the identity, as torch returns it
        Q = torch.eye(tm, nq, dtype=A.dtype, device=A.device).expand(nb, tm, nq).clone()
    else:
        # W = U diag(S) with orthogonal columns: its QR gives U up to the signs of diag R. A NaN W (a
        # bad matrix) gives a NaN Q, so U is NaN there too.
        Q, R = qr_launch(W, tn, nq)
        Q[..., :tn] *= torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(A.dtype).unsqueeze(-2)
    if wide:  # A = (Aᵀ)ᵀ = V S Uᵀ of the tall problem
        return Vh.mT.reshape(*batch, m, m).contiguous(), S, Q.mT.reshape(*batch, Q.shape[-1], n).contiguous()
    return Q.reshape(*batch, m, Q.shape[-1]), S, Vh.reshape(*batch, n, n)


def _jacobi(A: Tensor) -> bool:
    return fits(A) and max(A.shape[-2:]) <= JACOBI_MAX


def _supported(A: Tensor, full_matrices: bool, compute_uv: bool) -> bool:
    # LARGE_MIN_N read through the module at call time, so that tests can force the large path.
    return _jacobi(A) or (A.dtype == torch.float32 and _large.large_supported(A))


@svd_op.implement("metal", supports=_supported)
def _svd_metal(A: Tensor, full_matrices: bool, compute_uv: bool) -> tuple[Tensor, Tensor, Tensor]:
    if _jacobi(A):
        return svd_launch(A, full_matrices, compute_uv)
    return _large.svd_large(A, full_matrices, compute_uv)
