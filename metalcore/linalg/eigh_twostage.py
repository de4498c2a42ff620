"""Symmetric eigendecomposition above the register tile (n > 128) by a two-stage reduction:
dense → band → tridiagonal, a batched tridiagonal eigensolver, and two back-transformations.

Layers: :func:`two_stage`, the algorithm, with a backend's :class:`Stages` → :func:`eigh_twostage`
(Triton kernels) → the ``twostage`` path of ``metalcore::eigh`` on the Triton backend
(:mod:`metalcore.linalg.eigh_triton`); the Metal backend's twin is
:mod:`metalcore.linalg.eigh_twostage_metal`. Stage 1 and its back-transformation are GEMMs in torch
(any device); the panels, stages 2, 3 and 2's back-transformation are the backend's kernels. Nothing
here imports Triton (the Metal backend runs without it).

Why: above n = 128 every path was cuSOLVER's: ``syevd`` one matrix at a time through torch, or the
batched ``XsyevBatched`` (64×256² 4.0 ms, 8×1024² 56 ms on the H100, where JAX is the same call).
Both are chains of small dependent launches. The arithmetic is 15-30× under those times
(bench/linalg.md, "two-stage eigh above 128": 0.13 ms at 64×256², 0.95 ms at 8×1024²), so the
reduction is split where the work is GEMMs and where it is a dependent chain:

1. **dense → band** (LAPACK ``sytrd_sy2sb``), panels of ``b`` columns, ``j = 0, b, 2b, …``: the QR
   of the panel below the band, ``A[j+b:, j:j+b] = H R`` (the blocked QR's panel factorisation,
   :func:`metalcore.linalg.qr_blocked.factor_block`, batched), then the two-sided update of the
   trailing matrix ``A₂₂ ← Hᵀ A₂₂ H`` with ``H = I − V T Vᵀ``: ``Y = A₂₂ V T``,
   ``Z = Y − ½ V (Tᵀ Vᵀ Y)``, ``A₂₂ ← A₂₂ − V Zᵀ − Z Vᵀ`` (``Y`` is the product the two-sided update
   needs: ``Hᵀ A H = A − V Yᵀ − Y Vᵀ + V (Tᵀ Vᵀ Y) Vᵀ``, the last term split evenly between ``Z``'s two
   products because ``Tᵀ Vᵀ A V T`` is symmetric). ``4/3 n³`` flops a matrix, all but the
   panels in batched GEMMs.
2. **band → tridiagonal** by bulge chasing, one program a matrix
   (:mod:`metalcore.linalg.eigh_band_triton`): ``≈ n²/(2b)`` steps of a ``2b × b`` window, run as
   ``≈ 2n`` time steps with every sweep in flight (its ``'wave'`` schedule).
3. **tridiagonal eigenpairs**, Sturm multisection and inverse iteration, many programs a matrix
   (:mod:`metalcore.linalg.tridiag_eig_triton`).
4. **back-transformations** ``Q₁ (Q₂ Z)``: stage 2's reflectors by the band kernel's companion,
   stage 1's block reflectors by ``larfb`` GEMMs, last panel first.

The input is scaled to a largest entry of 1 (the reflector helpers assume it, and it keeps huge
and tiny inputs inside the float range), and the eigenvalues scaled back. NaN or Inf in a matrix
gives NaN eigenvalues and vectors for that matrix only; nothing reads the data on the host.
Accuracy: each stage is backward stable (orthogonal transformations), so the eigenvalues carry
``syev``'s ``O(n ε ‖A‖)`` bound and the vectors the tridiagonal solver's ratios.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metalcore.linalg.householder_gemm import as3, larfb_gemm
from metalcore.linalg.qr_blocked import Panel, factor_block

# Width of the band between stages 1 and 2. Stage 2 runs n²/(2b) steps of a 2b × b window (16
# windows of 16² a register tile in its wave), stage 1 n/b panels of b columns. H100, fp32, GPU ms
# of a whole call with vectors, b = 16 against 32: 5.3 / 5.5 at 64×256², 10.2 / 15.5 at 16×512²,
# 36.7 / 57.9 at 8×1024² (32's stage 2 is 2-2.4× slower; halving the panels' launches helps only
# the eager call's host time, which the op's CUDA graph removes; bench/linalg.md).
BAND = 16


@dataclass(frozen=True)
class Stages:
    """A backend's kernels for the steps of :func:`two_stage` that are not GEMMs.

    * ``panel``: how stage 1 factors its panels, a :data:`~metalcore.linalg.qr_blocked.Panel` for
      :func:`~metalcore.linalg.qr_blocked.factor_block` (a variant's name, or a function that factors
      the panel in place and returns ``tau``);
    * ``band_to_tridiag(S, b, compute_v) -> (d, e, W)``: stage 2 (``e[:, i] = T[i + 1, i]``, ``W`` the
      reflectors, or None);
    * ``tridiag_eig(d, e, compute_v) -> (lam, Z)``: stage 3, eigenvalues ascending;
    * ``apply_band_reflectors(W, Z, b)``: ``Z ← Q₂ Z`` in place."""

    panel: Panel
    band_to_tridiag: Callable[[Tensor, int, bool], tuple[Tensor, Tensor, Tensor | None]]
    tridiag_eig: Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor]]
    apply_band_reflectors: Callable[[Tensor, Tensor, int], Tensor]


def reflector_steps(n: int, b: int) -> int:
    """Steps of stage 2's longest sweep, the first: ``⌈(n − 2)/b⌉`` reflectors of length ≥ 2."""
    return max(1, math.ceil((n - 2) / b))


# Stage 1's panels on the Triton backend: the tall-panel kernel at every height. It forms V and T in
# its one launch, where the register-tile kernel that 'auto' picks for panels of ≤ 128 rows needs ~25
# more for larft (host-bound: stage 1 of 64×256² took 14.7 ms with 'auto' on the H100, bench/linalg.md).
TRITON_PANEL = "tall"


def symmetric_band(S: Tensor, b: int, keep: bool, panel: Panel = TRITON_PANEL) -> list[tuple[int, Tensor, Tensor]]:
    """Stage 1: the full symmetric matrices ``S`` ``(B, n, n)`` reduced in place to lower band form
    of width ``b`` (entries below the band set to zero; the upper triangle is left stale), the panels
    factored by :func:`~metalcore.linalg.qr_blocked.factor_block` with ``panel`` (:class:`Stages`).
    Returns, with
    ``keep``, each panel's ``(row, V, T)``: ``Q₁ = Π (I − V T Vᵀ)`` acting on rows ``row:``."""
    n = S.shape[-1]
    blocks = []
    for j in range(0, n - b - 1, b):
        h = n - j - b
        w = min(b, h - 1)                     # the last column of a short panel has nothing below
        P = S[:, j + b:, j:j + b]
        _, V, T = factor_block(P[..., :w], panel)
        if w < b:
            larfb_gemm(V, T, P[..., w:], True, True, inplace=True)
        # Y = A₂₂ V T and Tᵀ Vᵀ Y = (V T)ᵀ Y; then A₂₂ −= V Zᵀ + Z Vᵀ as one rank-2b product
        # [V Z] [Z V]ᵀ: three passes over A₂₂ (the traffic), where two rank-b updates made five, for
        # one more launch a panel (seven). Not yet timed: bench/linalg.md, "one rank-2b update".
        VT = torch.bmm(V, T)
        A22 = S[:, j + b:, j + b:]
        Y = torch.bmm(A22, VT)
        Z = torch.baddbmm(Y, V, torch.bmm(VT.mT, Y), alpha=-0.5)
        A22.baddbmm_(torch.cat([V, Z], -1), torch.cat([Z, V], -1).mT, alpha=-1)
        if keep:
            blocks.append((j + b, V, T))
    if n > b + 1:
        # Each panel's R stays, its reflectors (below R, never read again) live on in V: one pass
        # zeroes them all, where a triu_ a panel was 15 launches at n = 256.
        S.triu_(-b)
    return blocks


def two_stage(A: Tensor, upper: bool, compute_v: bool, band: int, stages: Stages) -> tuple[Tensor, Tensor]:
    """Eigenvalues, ascending, of the symmetric matrices ``A`` ``(*, n, n)`` (the triangle ``upper``
    names is read), and with ``compute_v`` their orthonormal eigenvectors as ``Q``'s columns (else
    ``Q`` is empty), by the module's four stages with ``stages``' kernels and a band of width ``band``."""
    if band < 1:
        raise ValueError(f"metalcore eigh_twostage: band must be positive; got {band}")
    *batch, n, _ = A.shape
    A3 = as3(A)
    S = (A3.triu() + A3.triu(1).mT) if upper else (A3.tril() + A3.tril(-1).mT)
    scale = S.abs().amax((-2, -1))
    finite = scale.isfinite()
    scale = torch.where(finite & (scale > 0), scale, 1.0)
    S = S / scale[:, None, None]
    blocks = symmetric_band(S, band, compute_v, stages.panel)
    d, e, W = stages.band_to_tridiag(S, band, compute_v)
    lam, Z = stages.tridiag_eig(d, e, compute_v)
    L = torch.where(finite[:, None], lam * scale[:, None], float("nan")).reshape(*batch, n)
    if not compute_v:
        return L, A.new_empty(0)
    stages.apply_band_reflectors(W, Z, band)
    for row, V, T in reversed(blocks):
        larfb_gemm(V, T, Z[:, row:, :], True, False, inplace=True)
    return L, torch.where(finite[:, None, None], Z, float("nan")).reshape(*batch, n, n)


def eigh_twostage(A: Tensor, upper: bool, compute_v: bool, band: int = BAND, schedule: str | None = None,
                  back_schedule: str | None = None, sections: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`two_stage` with the Triton kernels. ``A``: float32/float64; ``band``: the width between
    stages 1 and 2; ``schedule``, ``back_schedule``: stage 2's and its back-transformation's
    (:data:`~metalcore.linalg.eigh_band_triton.SCHEDULES`, ``BACK_SCHEDULES``; default: each its own,
    measured); ``sections``: Sturm points a lane in stage 3
    (:func:`~metalcore.linalg.tridiag_eig_triton.tridiag_eig`)."""
    from metalcore.linalg.eigh_band_triton import apply_band_reflectors, band_to_tridiag
    from metalcore.linalg.tridiag_eig_triton import tridiag_eig

    stages = Stages(panel=TRITON_PANEL, band_to_tridiag=functools.partial(band_to_tridiag, schedule=schedule),
                    tridiag_eig=functools.partial(tridiag_eig, sections=sections),
                    apply_band_reflectors=functools.partial(apply_band_reflectors, schedule=back_schedule))
    return two_stage(A, upper, compute_v, band, stages)
