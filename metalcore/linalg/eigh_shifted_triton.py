"""Symmetric eigendecomposition of small matrices by one-sided Jacobi on a shifted copy, in registers.

Layers: ``_shifted_eigh_kernel`` → :func:`eigh_shifted` → the ``shifted`` path of ``metalcore::eigh``
on the Triton backend (:mod:`metalcore.linalg.eigh_triton`), sides up to :data:`MAX_N`.

Why: the two-sided register Jacobi (:mod:`eigh_batched_triton`) rotates rows *and* columns each
round (three gathers, a dozen passes over the tile) and lost to the scratch kernel and to cuSOLVER's
batched Jacobi from n = 8 on the H100, while the one-sided rounds of the svd kernels (one gather,
two row reductions) ran the fused svd of 500×16² in 0.108 ms, under the best eigh peer's time. A
one-sided Jacobi on ``A`` itself finds ``|λ|`` only, and mixes the vectors of ``λ`` and ``−λ``. So it
runs on ``B = A + c I`` with ``c`` the smaller of two upper bounds on ``‖A‖₂`` (Gershgorin's
``max_i Σ_j |a_ij|`` and ``‖A‖_F``): ``B`` is positive semidefinite, so its singular values are its
eigenvalues, and the columns of ``B`` orthogonalized by rotations ``V`` give ``B V = W`` with
``‖w_j‖ = λ_j + c`` and ``V``'s columns the eigenvectors. The rotations are those two-sided Jacobi
would apply to ``B²``, whose eigenvector problem is ``A``'s (a shift moves no eigenvector), so
the sweeps are two-sided Jacobi's on ``A``: 5-7 at n ≤ 32 and 7-9 at 33-64 on the interpreter.
``B`` may be singular (``c = ‖A‖₂``); that costs one-sided Jacobi nothing: a zero column is a zero
singular value.

Accuracy: ``λ_j = ‖w_j‖ − c`` has absolute error ``O(ε c) = O(ε‖A‖)`` — the backward-stable bound of
LAPACK's ``syev``, which is what the LAPACK residual ratio ``‖A − QΛQᵀ‖ / (n ε ‖A‖)`` measures; tiny
eigenvalues of a graded matrix lose the relative accuracy two-sided Jacobi can give, as they do in
``syev``. ``V`` is a product of rotations (orthonormal to working precision); at convergence the
columns of ``W`` are orthogonal to ``n·ε`` relative to their norms, so ``A V − V Λ =
W − V diag‖w‖`` is ``O(n ε c)``, ``c ≤ ‖A‖_F``.

Per program ``G`` matrices as a ``[G, BN, BN]`` tile (row ``j`` = column ``j`` of ``B``): only the read
triangle is loaded (the other mirrored by the addresses), scaled by ``max|a|``, shifted; then the
register svd kernel's rounds (:mod:`svd_batched_triton`: ``α``, ``γ`` row reductions, ``β`` a gather,
``|γ| > n·ε·√α·√β`` and ``|γ| > tiny``); eigenvalues ascending, the vectors in the same order.
Non-convergence and NaN/Inf input give NaN in that matrix's outputs (non-convergence in all ``G``
matrices of its program, as in the register kernels). Launched without FMA contraction
(``_jacobi_triton.FP_FUSION``: lanes must agree on every rotation decision).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import cdiv, jit
from metalcore.linalg import _jacobi_triton as jac
from metalcore.linalg._jacobi_triton import descending_order, one_sided_sweeps, permute_rows, row_norms, scaled, symmetric_tile
from metalcore.linalg._small_triton import block, group, stack_strides
from metalcore.linalg.householder_gemm import as3

# B and Vᵀ in registers: 64×64 twice is 8192 values, 64 a thread at four warps (32×32 at one warp is
# the same 64). Beyond 64 the shift costs accuracy: λ = ‖w‖ − c carries O(ε c) with c up to
# ‖A‖_F ≈ √n/2·‖A‖₂ for random input, and the residual ratio grew 5.5, 10.5, 16.4, 20.4 at n = 33,
# 64, 100, 128 (fp32, interpreter), too close to the bar of 30 for the harder families.
MAX_N = 64
# Warps per program by tile side: one for BN ≤ 32 (four lost at every point measured, bench/
# linalg_triton.md v10: 1000×32² 0.397 against 0.284 ms), four for BN = 64 (the same 64 values a thread).
WARPS = {64: 4}


@jit
def _shifted_eigh_kernel(A, L, Q, SW, nb, n, s_ab, s_ar, s_ac, tol, tiny, max_sweeps,
                         G: tl.constexpr, BN: tl.constexpr, UPPER: tl.constexpr, WANT_V: tl.constexpr,
                         WANT_SWEEPS: tl.constexpr, IEEE32: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    live = g < nb
    rj = tl.arange(0, BN)
    g3 = g[:, None, None]
    j3 = rj[None, :, None]                      # column of B (tile row)
    i3 = rj[None, None, :]                      # row of B (tile column)
    j2 = rj[None, :]
    inside = live[:, None, None] & (j3 < n) & (i3 < n)
    a, scale, bad_input = scaled(symmetric_tile(A, g3, i3, j3, s_ab, s_ar, s_ac, inside, UPPER))
    # c ≥ ‖A‖₂ by both bounds (entries ≤ 1 after scaling: no overflow); the smaller one.
    gershgorin = tl.max(tl.sum(tl.abs(a), axis=1), axis=1)
    frobenius = tl.sqrt(tl.sum(tl.sum(a * a, axis=2), axis=1))
    shift = tl.minimum(gershgorin, frobenius)                              # [G]
    x = tl.where((j3 == i3) & (j3 < n), a + shift[:, None, None], a)
    vt = tl.where((j3 == i3) & (g3 >= 0), 1.0, 0.0).to(a.dtype)      # row j = column j of V
    x, vt, sweep, rotated = one_sided_sweeps(x, vt, n, live, tol, tiny, max_sweeps, WANT_V, IEEE32)

    sv = row_norms(x)                                                      # λ_j + c
    bad = (rotated > 0) | bad_input | (tl.max((sv != sv).to(tl.int32), axis=1) > 0)
    # Ascending λ = descending ‖w‖ read backwards: entry r of src is the column of rank r.
    src = descending_order(tl.where((j2 < n) & (sv == sv), sv, -1.0), rj)
    pos = tl.where(j2 < n, n - 1 - j2, j2)                                 # ascending slot of rank r
    lam = (tl.gather(sv, src, axis=1) - shift[:, None]) * scale[:, None]
    tl.store(L + g[:, None] * n + pos, tl.where(bad[:, None], float("nan"), lam), mask=live[:, None] & (j2 < n))
    if WANT_V:
        v = permute_rows(vt, src)                                          # row r: the vector of rank r
        tl.store(Q + g3 * n * n + i3 * n + (n - 1 - j3), tl.where(bad[:, None, None], float("nan"), v),
                 mask=inside)
    if WANT_SWEEPS:
        tl.store(SW + g, sweep + tl.zeros([G], dtype=tl.int32), mask=live)


def eigh_shifted_launcher(A: Tensor, upper: bool, compute_v: bool, *, matrices_per_program: int | None = None,
                          num_warps: int | None = None, want_sweeps: bool = False) -> Callable[..., tuple[Tensor, Tensor]]:
    """``run(A, sweeps=None) -> (L, Q)`` for tensors of ``A``'s shape, strides, dtype and device: the
    launch bound once per call signature (the op's plan keeps ``run``)."""
    *batch, n, _ = A.shape
    nb = math.prod(batch)
    dt, dev = A.dtype, A.device
    if nb == 0 or n == 0:
        return lambda A, sweeps=None: jac.eigh_outputs(A, compute_v)[:2]
    sa, copy = stack_strides(A)
    finfo = torch.finfo(dt)
    BN = block(n)
    G = matrices_per_program or group(nb, BN * BN * (2 if compute_v else 1), dev)
    launch = _shifted_eigh_kernel.bind(
        (cdiv(nb, G),), None, None, None, None, nb, n, *sa, n * finfo.eps, finfo.tiny / finfo.eps, jac.MAX_SWEEPS,
        G=G, BN=BN, UPPER=upper, WANT_V=compute_v, WANT_SWEEPS=want_sweeps, IEEE32=dt == torch.float32,
        num_warps=num_warps or WARPS.get(BN, 1), enable_fp_fusion=jac.FP_FUSION)

    def run(A: Tensor, sweeps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        L = torch.empty(batch + [n], dtype=dt, device=dev)
        Q = torch.empty(A.shape, dtype=dt, device=dev) if compute_v else A.new_empty(0)
        launch(as3(A) if copy else A, L, Q if compute_v else L, L if sweeps is None else sweeps)
        return L, Q

    return run


def eigh_shifted(A: Tensor, upper: bool, compute_v: bool, *, matrices_per_program: int | None = None,
                 num_warps: int | None = None, sweeps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(L, Q)`` of the symmetric matrices ``A`` ``(*, n, n)`` (``n ≤ MAX_N``, float32/float64) from
    the triangle ``upper`` names; ``Q`` is a ``(0,)`` placeholder without ``compute_v``. ``sweeps``
    (int32, one entry per matrix) receives each program's sweep count."""
    return eigh_shifted_launcher(A, upper, compute_v, matrices_per_program=matrices_per_program,
                                 num_warps=num_warps, want_sweeps=sweeps is not None)(A, sweeps)
