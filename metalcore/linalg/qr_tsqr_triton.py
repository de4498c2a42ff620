"""The ``'tsqr'`` panel of the blocked QR (:mod:`metalcore.linalg.qr_blocked`): a tall panel factored by
TSQR over many programs, its Householder form reconstructed from the orthonormal factor.

Layers: :func:`tsqr` (the register-tile Householder kernel's launches), ``_reconstruct_top_kernel`` and
``_reconstruct_rows_kernel`` → :func:`tsqr_block` (``P`` ``(B, h, w)`` factored in place, returns
``(tau, Vu, T)``, the contract of :func:`~metalcore.linalg.qr_blocked.factor_block`).

Why: a single large QR's panels are the one step of the blocked QR that is not a GEMM. cuSOLVER's 32
geqrf panels took 19.5 of 29.8 ms at 4096² (H100), and the ``'tall'`` kernel gives a panel one program,
87-171 ms for one 4096² matrix: each reflector is a reduction over all ``h`` rows, a chain on one SM.
TSQR (Demmel, Grigori, Hoemmen, Langou 2012) splits the panel's rows into chunks of
:data:`LEAF_ROWS`, factors every chunk at once (the register-tile Householder kernel, one launch for
all chunks of all panels), and factors the stacked ``R`` factors the same way until they fit one
chunk; the orthonormal ``Q`` is the chunks' ``Q`` times the stack's. The dependent chain becomes
``log_{LEAF_ROWS/w}(h/w)`` levels of short reflector chains (3 levels at 4096 × 32) instead of ``w``
reductions over 4096 rows.

The trailing update and ``Q``'s formation need the panel as a block reflector ``H = I − V T Vᵀ``.
Householder reconstruction (Ballard, Demmel, Grigori, Jacquelin, Knight, Nguyen 2015): with ``Q``
``(h × w)`` orthonormal and ``P = Q R``, choose signs ``S = diag(±1)`` and factor
``Q − [S; 0] = L U`` without pivoting (``L`` unit lower trapezoidal, ``U`` upper); then ``V = L``,
``T = −U S L₁⁻ᵀ`` (``L₁`` the top ``w × w`` of ``L``) and ``R̃ = S R`` satisfy ``H [R̃; 0] = P``.
Proof: ``H``'s first ``w`` columns must be ``Q S``, i.e. ``V (T L₁ᵀ) = [I; 0] − Q S = −(Q − [S; 0]) S``.
Choosing ``S_ii = −sign`` of the ``i``-th pivot before the shift makes every pivot at least 1 in
magnitude (``|Q_ij| ≤ 1``), so the unpivoted LU is stable; only the ``w × w`` top block needs it
(``_reconstruct_top_kernel``, one program a matrix, which also forms ``T`` and writes the compact top);
the rows below are ``L₂ = Q₂ U⁻¹``, a triangular solve a block of rows (``_reconstruct_rows_kernel``).

Cost a panel of ``h × w`` (fp32): the leaves read the panel once (``4 h w`` bytes) and write ``Q``
once; each level ``w²``-sized work per chunk; combining ``Q`` is a batched ``(r × w)(w × w)`` product a
level; ``L₂`` one triangular solve over ``h × w``. The chain: a level is the register kernel's ``w``
reflectors and ``w`` steps forming its ``Q`` (~0.4 µs a step in registers: ~25 µs at ``w = 32``), 3-4
levels at 4096 × 32 with a batched product each, then the reconstruction's two launches (``2w`` and
``w`` register steps): ~110-130 µs a panel, ~3.7 µs a column, against cuSOLVER's ~4.8 (19.5 ms for
4,096 columns of geqrf panels). About 10 launches a panel: 1,300 at 4096² with ``nb = 32``, which
only a CUDA graph makes cheap (the ``tsqr`` path replays one, :mod:`metalcore.linalg.qr_triton`). Not
yet timed (bench/linalg.md, "a TSQR panel").

Accuracy: TSQR is backward stable like Householder QR; the reconstruction's LU has pivots ≥ 1 and
multipliers bounded by ``|Q| ≤ 1``, so ``V`` and ``T`` carry ``O(ε)`` error (the paper's bound), tested
by LAPACK's ratios and against ``H [R̃; 0] = P``. A NaN stays in its own matrix.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import cdiv, jit, next_power_of_2
from metalcore.linalg.qr_triton import householder_launch

# Rows a TSQR leaf: the register-tile Householder kernel's largest side (qr_triton.SMALL_MAX). A
# panel up to LEAF_ROWS / 2 wide shrinks by at least half a level. Read at call time (tests shrink it).
LEAF_ROWS = 128
# Entries of the rows kernel's [BR, BW] tile of L₂: 64 rows at w = 32, 16 values a thread at 4 warps.
ROWS_TILE = 2048


@jit
def _reconstruct_top_kernel(Q, R, P, V, T, U, h, w, s_qb, s_qr, s_qc, s_pb, s_pr, s_pc, BW: tl.constexpr):
    """Program ``matrix``, the ``w × w`` top of the reconstruction: ``Q₁ − diag(S) = L₁ U`` without
    pivoting (``Q₁`` the top of ``Q``, strides ``s_q*``), each ``S_i = −sign`` of pivot ``i`` before the
    shift (``+1`` for a negative one, ``−1`` otherwise), so that ``|u_ii| ≥ 1``; then ``T = −U S L₁⁻ᵀ``
    into ``T``, ``U`` into ``U`` (for the rows below), ``L₁`` (unit diagonal) into ``V``'s top, and
    ``S R`` (``R`` contiguous ``w × w``) with ``L₁``'s strict lower part into ``P``'s top (strides
    ``s_p*``): the compact form. ``T``, ``U``, ``V`` (``h × w``) contiguous."""
    mat = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BW)
    rr = r[:, None]
    cc = r[None, :]
    inside = (rr < w) & (cc < w)
    a = tl.load(Q + mat * s_qb + rr * s_qr + cc * s_qc, mask=inside, other=0.0)
    signs = tl.zeros([BW], dtype=a.dtype)
    for i in range(0, w):
        pivot = tl.sum(tl.sum(tl.where((rr == i) & (cc == i), a, 0.0), axis=1), axis=0)
        s = tl.where(pivot < 0.0, 1.0, -1.0)
        pivot = pivot - s
        a = tl.where((rr == i) & (cc == i), pivot, a)
        a = tl.where((rr > i) & (cc == i), a / pivot, a)
        column = tl.sum(tl.where(cc == i, a, 0.0), axis=1)
        row = tl.sum(tl.where(rr == i, a, 0.0), axis=0)
        a = a - tl.where((rr > i) & (cc > i), column[:, None] * row[None, :], 0.0)
        signs = tl.where(r == i, s, signs)
    lower = tl.where(rr > cc, a, 0.0)                     # L₁ without its unit diagonal
    upper = tl.where(rr <= cc, a, 0.0)                    # U
    # T = −U S L₁⁻ᵀ column by column: T[:, j] = −U[:, j] S_j − Σ_{k<j} T[:, k] L₁[j, k].
    t = tl.zeros([BW, BW], dtype=a.dtype)
    for j in range(0, w):
        l_j = tl.sum(tl.where(rr == j, lower, 0.0), axis=0)                     # row j of L₁
        s_j = tl.sum(tl.where(r == j, signs, 0.0), axis=0)
        u_j = tl.sum(tl.where(cc == j, upper, 0.0), axis=1)                     # column j of U
        t_j = -u_j * s_j - tl.sum(t * l_j[None, :], axis=1)
        t = tl.where(cc == j, t_j[:, None], t)
    top = tl.load(R + mat * w * w + rr * w + cc, mask=inside, other=0.0) * signs[:, None]
    tl.store(P + mat * s_pb + rr * s_pr + cc * s_pc, tl.where(rr <= cc, top, lower), mask=inside)
    tl.store(V + mat * h * w + rr * w + cc, tl.where(rr == cc, 1.0, lower), mask=inside)
    tl.store(T + mat * w * w + rr * w + cc, t, mask=inside)
    tl.store(U + mat * w * w + rr * w + cc, upper, mask=inside)


@jit
def _reconstruct_rows_kernel(Q, U, P, V, h, w, s_qb, s_qr, s_qc, s_pb, s_pr, s_pc, BR: tl.constexpr,
                             BW: tl.constexpr):
    """Program ``(matrix, block)``: the rows ``w + block · BR + [0, BR)`` of ``L₂ = Q₂ U⁻¹`` (``X U = Q₂``
    column by column), into ``P`` (the reflectors below ``R``) and ``V``."""
    mat = tl.program_id(0).to(tl.int64)
    rows = w + tl.program_id(1) * BR + tl.arange(0, BR)
    c = tl.arange(0, BW)
    r = tl.arange(0, BW)
    valid = (rows[:, None] < h) & (c[None, :] < w)
    q = tl.load(Q + mat * s_qb + rows[:, None] * s_qr + c[None, :] * s_qc, mask=valid, other=0.0)
    u = tl.load(U + mat * w * w + r[:, None] * w + c[None, :], mask=(r[:, None] < w) & (c[None, :] < w), other=0.0)
    x = tl.zeros([BR, BW], dtype=q.dtype)
    for j in range(0, w):
        u_j = tl.sum(tl.where(c[None, :] == j, u, 0.0), axis=1)                  # column j of U
        u_jj = tl.sum(tl.where(r == j, u_j, 0.0), axis=0)
        q_j = tl.sum(tl.where(c[None, :] == j, q, 0.0), axis=1)
        x_j = (q_j - tl.sum(x * tl.where(r < j, u_j, 0.0)[None, :], axis=1)) / u_jj
        x = tl.where(c[None, :] == j, x_j[:, None], x)
    tl.store(P + mat * s_pb + rows[:, None] * s_pr + c[None, :] * s_pc, x, mask=valid)
    tl.store(V + mat * h * w + rows[:, None] * w + c[None, :], x, mask=valid)


def tsqr(P: Tensor) -> tuple[Tensor, Tensor]:
    """``(Q, R)``, the reduced QR of the panels ``P`` ``(B, h, w)`` (``h ≥ w``, ``w ≤ LEAF_ROWS / 2``
    unless ``h ≤`` :data:`LEAF_ROWS`) by TSQR: ``Q`` ``(B, h, w)`` with orthonormal columns, ``R``
    ``(B, w, w)`` upper triangular."""
    B, h, w = P.shape
    if h <= LEAF_ROWS:
        _, _, R, Q = householder_launch(P, kr=w, nq=w)
        return Q, R
    chunks = cdiv(h, LEAF_ROWS)
    if chunks * LEAF_ROWS != h:                           # zero rows complete the last chunk
        P = torch.cat([P, P.new_zeros(B, chunks * LEAF_ROWS - h, w)], 1)
    _, _, R_leaf, Q_leaf = householder_launch(P.unflatten(1, (chunks, LEAF_ROWS)), kr=w, nq=w)
    Q_top, R = tsqr(R_leaf.reshape(B, chunks * w, w))
    Q = torch.matmul(Q_leaf, Q_top.view(B, chunks, w, w)).view(B, chunks * LEAF_ROWS, w)
    return Q[:, :h], R


def tsqr_block(P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The panel ``P`` ``(B, h, w)``, ``h ≥ w``, ``w ≤ LEAF_ROWS / 2``, factored in place in
    ``geqrf``'s compact form (``R`` on and above the diagonal, the reflectors below, unit diagonal
    implied) by TSQR and Householder reconstruction (module docstring); returns ``(tau, Vu, T)`` with
    ``Vu`` explicit unit lower trapezoidal and ``H = I − Vu T Vuᵀ``, ``tau = diag(T)``."""
    B, h, w = P.shape
    if w > LEAF_ROWS // 2 or h < w:
        raise ValueError(f"metalcore tsqr_block: panels of h ≥ w rows and at most {LEAF_ROWS // 2} columns; "
                         f"got {tuple(P.shape)}")
    if B == 0 or w == 0:                                  # no launch (a grid of 0 programs is an error)
        return P.new_zeros(B, w), P.new_zeros(B, h, w), P.new_zeros(B, w, w)
    Q, R = tsqr(P)
    V = torch.empty(B, h, w, dtype=P.dtype, device=P.device)
    T, U = torch.empty(B, w, w, dtype=P.dtype, device=P.device), torch.empty(B, w, w, dtype=P.dtype, device=P.device)
    BW = next_power_of_2(w)
    _reconstruct_top_kernel[(B,)](Q, R.contiguous(), P, V, T, U, h, w, *Q.stride(), *P.stride(), BW=BW,
                                  num_warps=4 if w > 32 else 1)
    if h > w:
        BR = max(1, ROWS_TILE // BW)
        _reconstruct_rows_kernel[(B, cdiv(h - w, BR))](Q, U, P, V, h, w, *Q.stride(), *P.stride(), BR=BR, BW=BW,
                                                       num_warps=4)
    return T.diagonal(0, -2, -1), V, T
