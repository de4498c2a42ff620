"""Large-matrix QR on Metal: the blocked Householder QR of :mod:`metalcore.linalg.qr_blocked` with its
panels factored by ``geqr2_panel_<dtype>`` (``shaders/linalg.metal``) and ``larft``/``larfb`` as the
batched matrix products of :mod:`metalcore.linalg.householder_gemm` (plain torch GEMMs, MPS's on a
Mac).

The panel shader takes any number of rows and up to ``METALCORE_LINALG_MAX_N`` columns: one
threadgroup per panel, updating it in place in device memory (a 64-column panel taller than 128 rows
does not fit Apple's 32 KiB of threadgroup memory, and geqr2 reads the trailing panel once per
reflector either way). Everything but the panels' ``O(m n nb)`` share is GEMM work.

Not timed: there is no Apple hardware here, only the CPU executor that CI runs the shaders on. The
panel width ``NB`` (the tile side, the widest panel the shader takes) and the crossover
``SMALL_MAX`` (matrices with both sides up to it stay on the one-threadgroup ``qr_<dtype>``
shader, which holds the whole matrix in threadgroup memory) are module constants, read at call
time, so that tests force the blocked path at small sizes and a Mac run can sweep them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.linalg import qr_blocked
from metalcore.linalg._small_metal import fits, kernel, max_n, threads_for

# Both sides at most this: the one-threadgroup qr shader; beyond it, the blocked path.
SMALL_MAX = max_n()
# Panel width of the blocked path (at most max_n(): the panel shader keeps tau for that many columns).
NB = max_n()


def geqr2_panel_launch(P: Tensor) -> Tensor:
    """Compact QR of the panel ``P`` ``(B, h, w)``, ``h ≥ w``, ``w ≤ max_n()``, float32, written into
    ``P`` (any view); returns ``tau`` ``(B, w)``."""
    B, h, w = P.shape
    tau = _metal.empty((B, w), dtype=P.dtype, device=P.device)
    if P.numel() == 0:
        return tau
    work = P.contiguous()  # P itself when it already is; else the kernel factors a copy
    tg = threads_for(h * w)
    _metal.launch(*kernel("geqr2_panel", P), work, tau, h, w, threads=B * tg, group_size=tg)
    if work is not P:
        P.copy_(work)
    return tau



def small(A: Tensor) -> bool:
    """``A`` goes to the one-threadgroup shader: it fits the tile, both sides at most ``SMALL_MAX``."""
    return fits(A) and max(A.shape[-2:]) <= SMALL_MAX


def blocked_supported(A: Tensor) -> bool:
    """The blocked path can take ``A``: float32 (Apple GPUs have no float64)."""
    return A.dtype == torch.float32 and A.dim() >= 2


def qr_blocked_metal(A: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """``(Q, R)`` of ``A`` ``(*, m, n)`` as ``metalcore::qr`` returns them, by blocked QR with Metal panels."""
    if not 1 <= NB <= max_n():
        raise ValueError(f"metalcore qr_blocked_metal: NB must be in [1, {max_n()}]; got {NB}")
    return qr_blocked.qr_blocked(A, mode, nb=NB, panel=geqr2_panel_launch)

