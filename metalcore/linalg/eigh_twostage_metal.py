"""The two-stage symmetric eigensolver on Metal (float32, n above the Jacobi shader's tile): the
``twostage`` path of ``metalcore::eigh`` on the Metal backend.

Layers: ``band_to_tridiag_float`` / ``band_back_float`` (``shaders/twostage.metal``) →
:func:`band_to_tridiag_metal` / :func:`apply_band_reflectors_metal`, with the panel shader of the
blocked QR (:func:`~metalcore.linalg.qr_blocked_metal.geqr2_panel_launch`, ``larft`` as GEMMs
through :func:`~metalcore.linalg.qr_blocked.factor_block`) and stage 3 on Metal
(:func:`~metalcore.linalg.tridiag_eig_metal.tridiag_eig_metal`) → :data:`STAGES` →
:func:`~metalcore.linalg.eigh_twostage.two_stage`, the algorithm both backends share.

Stage 2 runs the Triton kernel's ``'sweeps'`` schedule (one step at a time, one threadgroup a matrix,
the ``2b × b`` window in threadgroup memory, bands up to ``METALCORE_BAND_MAX`` = 32), and the
back-transformation one thread a column of ``Z``. Stage 1 and the panels' back-transformation are
torch GEMMs (MPS's on a Mac).

Not timed — no Apple hardware here, only the CPU executor CI runs the shaders on — so it is an
alternative path (:func:`metalcore._selection.use_path`), never automatic: the Jacobi shader serves
n ≤ ``METALCORE_LINALG_MAX_N`` and the reference the rest until a Mac's measurement says otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metalcore import _metal
from metalcore._selection import register_path
from metalcore.linalg.eigh_twostage import BAND, Stages, reflector_steps, two_stage
from metalcore.linalg.qr_blocked_metal import geqr2_panel_launch
from metalcore.linalg.tridiag_eig_metal import tridiag_eig_metal

SHADER = "twostage"
# Threads of stage 2's threadgroup (one a window entry at b = 16) and of the back-transformation's.
BAND_THREADS = 256
BACK_GROUP = 64


def band_to_tridiag_metal(S: Tensor, b: int, compute_v: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`~metalcore.linalg.eigh_band_triton.band_to_tridiag`'s contract on Metal: ``S`` ``(B, n, n)``
    float32 in lower band form of width ``b`` (at most ``METALCORE_BAND_MAX``), reduced in place;
    returns the diagonals, the sub-diagonals and, with ``compute_v``, the reflectors for
    :func:`apply_band_reflectors_metal`."""
    limit = _metal.constants(SHADER)["METALCORE_BAND_MAX"]
    if not 1 <= b <= limit:
        raise ValueError(f"metalcore band_to_tridiag_metal: the band must be in [1, {limit}]; got {b}")
    B, n, _ = S.shape
    d = torch.empty(B, n, dtype=S.dtype, device=S.device)
    e = torch.empty_like(d)
    if B == 0 or n == 0:
        return d, e, (S.new_empty(B, 0) if compute_v else None)
    steps = reflector_steps(n, b)
    work = S.contiguous()                 # S itself when it already is; else a copy, written back
    W = torch.empty(B, max(n - 2, 0) * steps * b, dtype=S.dtype, device=S.device) if compute_v else d
    _metal.launch(_metal.library(SHADER, S.device), "band_to_tridiag_float", work, d, e, W, n, b, steps,
                  int(compute_v), threads=B * BAND_THREADS, group_size=BAND_THREADS)
    if work is not S:
        S.copy_(work)
    return d, e, (W if compute_v else None)


def apply_band_reflectors_metal(W: Tensor, Z: Tensor, b: int) -> Tensor:
    """``Z ← Q₂ Z`` in place for ``Z`` ``(B, n, k)`` with the reflectors of :func:`band_to_tridiag_metal`."""
    B, n, k = Z.shape
    if B == 0 or n < 3 or k == 0 or b < 2:          # a band of width 1 is tridiagonal: no reflectors
        return Z
    work = Z.contiguous()
    _metal.launch(_metal.library(SHADER, Z.device), "band_back_float", W, work, n, k, b, reflector_steps(n, b), B,
                  threads=B * k, group_size=BACK_GROUP)
    if work is not Z:
        Z.copy_(work)
    return Z


STAGES = Stages(panel=geqr2_panel_launch, band_to_tridiag=band_to_tridiag_metal, tridiag_eig=tridiag_eig_metal,
                apply_band_reflectors=apply_band_reflectors_metal)


def eigh_twostage_metal(A: Tensor, upper: bool, compute_v: bool, band: int = BAND) -> tuple[Tensor, Tensor]:
    """:func:`~metalcore.linalg.eigh_twostage.two_stage` with the Metal kernels: ``A`` ``(*, n, n)`` float32."""
    return two_stage(A, upper, compute_v, band, STAGES)


def _supported(A: Tensor) -> bool:
    return A.dtype == torch.float32 and A.dim() >= 2 and A.shape[-1] >= 1


@register_path("eigh", "metal", "twostage", supports=lambda A, UPLO, compute_v: _supported(A))
def _eigh_twostage_metal_path(A: Tensor, UPLO: str, compute_v: bool) -> tuple[Tensor, Tensor]:
    L, Q = eigh_twostage_metal(A, UPLO == "U", compute_v)
    return L.contiguous(), Q.contiguous()
