"""Householder factorization of tall panels in Triton: the ``'tall'`` panel of the blocked QR
(:mod:`metalcore.linalg.qr_blocked`) for a batch of panels too tall for the register tile.

Layers: ``_tall_panel_kernel`` → :func:`tall_panel_launch` (``P`` ``(B, h, w)``, any strides, factored
in place; returns ``tau``), the contract of :func:`metalcore.linalg.qr_blocked.factor_panel`.

One program per panel, so a batch of ``B`` panels runs as ``B`` programs where ``torch.geqrf``
(cuSOLVER) factors one matrix after another. The panel stays in memory (a 3072 × 64 fp32 panel is
768 KB, beyond what a program can hold) and is streamed through ``[BR, NB]`` register tiles, ``NB``
the panel width padded to a power of two. LAPACK's ``geqr2`` reads the trailing columns twice per
reflector (``w = vᵀ A``, then ``A −= τ v w``); here each reflector costs **one** read and one write of
them, because the next reflector's inner products ride along with the update of the current one:

* with ``x`` column ``j`` below the diagonal and ``v = [1; x/(α − β)]`` (``dlarfg``), ``vᵀ A`` is
  ``A[j, :] + (xᵀ A[j+1:, :])/(α − β)``, so the pass that applies reflector ``j − 1`` also sums
  ``xᵀ A[j+1:, :]`` for column ``j`` (whose ``j``-th entry is ``‖x‖²``) from the updated tile;
* those sums are kept scaled as ``Σ (x_i/s) A_i,:`` with ``s`` the running ``max|x_i|``, rescaled
  when a row block raises it (as online softmax rescales its sum): ``‖x‖ = s·√(Σ (x_i/s)²)``, so a
  1e25- or 1e-25-scaled fp32 panel neither overflows nor underflows its squares (LAPACK's ``dnrm2``
  guarantee, which the register kernel gets from ``s = max|x|`` beforehand);
* the pass writes ``v`` and ``β`` into column ``j`` and ``A[j:, j+1:] −= v (τ w)``;
  ``tl.debug_barrier()`` (``bar.sync``, which also orders the program's global accesses) separates
  one reflector's stores from the next one's loads, and every warp's read of row ``j`` from the
  pass that overwrites it.

Conventions as LAPACK's: ``β = −sign(α)‖[α; x]‖``, ``τ = (β − α)/β``, ``τ = 0`` and ``x`` left as is
for a zero ``x`` (``H = I``), ``τ = 0`` for the last column of a square panel. A NaN stays in its own
panel (one program per panel, nothing shared).

Cost per panel (``h × w``, fp32): ``4 h w²`` bytes of tile traffic (columns left of the reflector
are masked out) and ``w`` dependent passes, each a load → three reductions → store chain of a few
microseconds even when the panel is short. The next row block's tile is loaded before the current
one is reduced, so one block's memory latency hides behind the other's arithmetic.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import helper, jit, next_power_of_2

# Elements of one [BR, NB] tile: 32 KB per tile in fp32 and fp64 (two tiles live at once, the one
# being updated and the next one in flight): 32 values a thread at 8 warps in fp32, 16 in fp64.
TILE_ELEMENTS = {torch.float32: 8192, torch.float64: 4096}
MAX_WARPS = 8


@helper
def _column_sums(t, rows, c2, jn, acc, s):
    """Fold the row block ``t`` ``[BR, NB]`` (rows ``rows``) into column ``jn``'s running sums: ``s``
    the largest ``|x_i|`` so far over rows below ``jn``, ``acc = Σ (x_i/s) t[i, :]``."""
    x = tl.sum(tl.where(c2 == jn, t, 0.0), axis=1)
    x = tl.where(rows > jn, x, 0.0)
    s_new = tl.maximum(s, tl.max(tl.abs(x), axis=0))
    grown = s_new > 0.0
    acc = acc * tl.where(grown, s / tl.where(grown, s_new, 1.0), 1.0)
    y = x / tl.where(grown, s_new, 1.0)
    return acc + tl.sum(y[:, None] * t, axis=0), s_new


@jit
def _tall_panel_kernel(P, TAU, VU, T, h, w, k, s_b, s_r, s_c, s_tb,
                       BR: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    panel = P + pid * s_b
    r = tl.arange(0, BR)
    c = tl.arange(0, NB)
    c2 = c[None, :]
    # Offsets inside a row block; blocks are reached by advancing a 64-bit pointer, so that rows × row
    # stride never has to fit in 32 bits.
    tile = r[:, None] * s_r + c2 * s_c
    step = BR * s_r
    zero = tl.zeros([NB], dtype=P.dtype.element_ty)
    # Column 0's sums: the only pass that updates nothing.
    acc = zero
    s = tl.max(zero, axis=0)
    block = panel + s_r
    for r0 in range(1, h, BR):
        rows = r0 + r
        t = tl.load(block + tile, mask=(rows[:, None] < h) & (c2 < w), other=0.0)
        acc, s = _column_sums(t, rows, c2, 0, acc, s)
        block += step
    taus = zero
    for j in range(k):
        head = tl.load(panel + j * s_r + c * s_c, mask=(c >= j) & (c < w), other=0.0)   # row j, updated
        alpha = tl.sum(tl.where(c == j, head, 0.0), axis=0)
        s1 = tl.where(s > 0.0, s, 1.0)
        xnorm = s * tl.sqrt(tl.sum(tl.where(c == j, acc, 0.0), axis=0) / s1)
        # dlapy2(α, ‖x‖) without squaring the larger one.
        big = tl.maximum(tl.abs(alpha), xnorm)
        small = tl.minimum(tl.abs(alpha), xnorm)
        ratio = small / tl.where(big > 0.0, big, 1.0)
        norm = big * tl.sqrt(1.0 + ratio * ratio)
        reflect = xnorm > 0.0   # NaN in x: False, and the NaN flows on through the sums
        beta = tl.where(reflect, tl.where(alpha >= 0.0, -norm, norm), alpha)
        tau = tl.where(reflect, (beta - alpha) / tl.where(reflect, beta, 1.0), 0.0)
        denom = tl.where(reflect, alpha - beta, 1.0)
        # τ vᵀ A = τ (A[j, :] + Σ x_i A_i,: / (α − β)), the sums scaled by s; |α − β| ≥ s, so the
        # quotient cannot overflow.
        tw = tau * (head + acc / tl.where(reflect, denom / s1, 1.0))
        # Every warp has read row j (tw depends on it) before any warp overwrites it below.
        tl.debug_barrier()
        acc = zero
        s = tl.max(zero, axis=0)
        # From the 4-aligned column at or before j: whole 16-byte groups, so that loads and stores
        # vectorize (columns j−3 … j−1 hold finished reflectors and are written back unchanged).
        live = (c2 >= (j // 4) * 4) & (c2 < w)
        block = panel + j * s_r
        nxt = tl.load(block + tile, mask=((j + r)[:, None] < h) & live, other=0.0)
        for r0 in range(j, h, BR):
            rows = r0 + r
            rows2 = rows[:, None]
            t = nxt
            nxt = tl.load(block + step + tile, mask=(rows2 + BR < h) & live, other=0.0)
            v = tl.where(rows == j, 1.0, tl.sum(tl.where(c2 == j, t, 0.0), axis=1) / denom)
            t = tl.where(c2 > j, t - v[:, None] * tw[None, :], t)
            t = tl.where(c2 == j, tl.where(rows2 == j, beta, v[:, None]), t)
            tl.store(block + tile, t, mask=(rows2 < h) & live)
            acc, s = _column_sums(t, rows, c2, j + 1, acc, s)
            block += step
        taus = tl.where(c == j, tau, taus)
        # This reflector's stores are visible before the next one's loads.
        tl.debug_barrier()
    tl.store(TAU + pid * s_tb + c, taus, mask=c < k)
    if BLOCK:
        # The block reflector H₁⋯H_k = I − Vu T Vuᵀ (LAPACK larft, forward, columnwise): Vu written out
        # (unit diagonal, zeros above), S = Vuᵀ Vu summed over the row blocks (IEEE fp32 products,
        # never TF32), then T column by column, T[:i, i] = −τ_i T[:i, :i] S[:i, i], T[i, i] = τ_i;
        # a zero τ_i leaves row and column i of T zero, as LAPACK sets them.
        S = tl.zeros([NB, NB], dtype=P.dtype.element_ty)
        vu = VU + pid * h * w
        block = panel
        for r0 in range(0, h, BR):
            rows2 = (r0 + r)[:, None]
            inside = (rows2 < h) & (c2 < w)
            t = tl.load(block + tile, mask=inside, other=0.0)
            v = tl.where(inside, tl.where(rows2 > c2, t, tl.where(rows2 == c2, 1.0, 0.0)), 0.0)
            tl.store(vu + rows2 * w + c2, v, mask=inside)
            S += tl.dot(tl.trans(v), v, input_precision="ieee")
            block += step
        c1 = c[:, None]
        Tm = tl.zeros([NB, NB], dtype=P.dtype.element_ty)
        for i in range(k):
            si = tl.where(c < i, tl.sum(tl.where(c2 == i, S, 0.0), axis=1), 0.0)     # S[:i, i]
            ti = tl.sum(tl.where(c == i, taus, 0.0), axis=0)
            z = tl.sum(Tm * si[None, :], axis=1)                                      # T[:, :i] S[:i, i]
            Tm = tl.where(c2 == i, tl.where(c1 < i, -ti * z[:, None], tl.where(c1 == i, ti, 0.0)), Tm)
        tl.store(T + pid * k * k + c1 * k + c2, Tm, mask=(c1 < k) & (c2 < k))


def tile_rows(h: int, w: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BR, NB)`` of the tile for an ``h × w`` panel: ``NB`` the width padded to a power of two,
    ``BR`` rows to fill :data:`TILE_ELEMENTS`, no more than the panel has (rounded up); both at least
    16, the smallest ``tl.dot`` operand (``Vuᵀ Vu``)."""
    NB = max(next_power_of_2(w), 16)
    BR = max(16, min(TILE_ELEMENTS[dtype] // NB, next_power_of_2(h)))
    return BR, NB


def _launch(P: Tensor, block: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    B, h, w = P.shape
    k = min(h, w)
    tau = torch.empty(B, k, dtype=P.dtype, device=P.device)
    Vu = torch.empty(B, h, w, dtype=P.dtype, device=P.device) if block else None
    T = torch.empty(B, k, k, dtype=P.dtype, device=P.device) if block else None
    if B == 0 or k == 0:
        return tau, Vu, T
    BR, NB = tile_rows(h, w, P.dtype)
    # At least 8 elements a thread: a tile smaller than the threads would be replicated across warps,
    # and one copy could be stored before another copy of it was loaded.
    warps = max(1, min(MAX_WARPS, BR * NB // 256))
    _tall_panel_kernel[(B,)](P, tau, Vu if block else tau, T if block else tau, h, w, k,
                             P.stride(0), P.stride(1), P.stride(2), tau.stride(0),
                             BR=BR, NB=NB, BLOCK=block, num_warps=warps)
    return tau, Vu, T


def tall_panel_launch(P: Tensor) -> Tensor:
    """Compact QR of the panels ``P`` ``(B, h, w)`` (float32/float64, any strides; ``h ≥ w`` in the
    blocked QR, any shape here), written into ``P`` as ``torch.geqrf`` writes it (``R`` on and above
    the diagonal, the reflectors below); returns ``tau`` ``(B, min(h, w))``.

    >>> P = torch.randn(24, 3072, 64, device="cuda")
    >>> tau = tall_panel_launch(P)        # P now holds geqrf's compact form of each panel
    """
    return _launch(P, False)[0]


def tall_block_launch(P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`tall_panel_launch` plus the panel's block reflector, in the same launch: ``(tau, Vu, T)``
    with ``Vu`` ``(B, h, w)`` the explicit unit lower trapezoidal reflectors and ``T`` ``(B, w, w)``
    upper triangular, ``H₁ ⋯ H_w = I − Vu T Vuᵀ`` (``h ≥ w``). What ``larft`` and the ``Vu`` copy cost
    the blocked QR as ~50 small launches a panel is one extra read of the panel here."""
    if P.shape[-2] < P.shape[-1]:
        raise ValueError(f"metalcore tall_block_launch: the panel must have at least as many rows as columns; "
                         f"got P of shape {tuple(P.shape)}")
    tau, Vu, T = _launch(P, True)
    return tau, Vu, T
