"""Singular value decomposition by parallel one-sided Jacobi in Triton: one program per matrix.

Layers: ``_jacobi_svd_kernel`` → :func:`svd_launch` → the ``triton`` implementation of
``metalcore::svd`` (declared in :mod:`metalcore.linalg.svd`).

Algorithm (Hestenes one-sided Jacobi, LAPACK ``gesvj``'s thresholds), for ``m ≥ n`` (a wide
matrix is handled as its transpose, through strides):

* ``A`` is divided by ``max|a|`` (tiny/huge inputs behave like unit-scaled ones; ``S`` is scaled
  back) and its columns kept as the rows of a per-program scratch buffer, ``Vᵀ`` likewise.
* Each round rotates ``N/2`` disjoint column pairs at once (the round-robin ordering of
  :mod:`metalcore.linalg._jacobi_triton`): columns ``p``, ``q`` are gathered as two ``[N/2, BM]``
  tiles, ``α = ‖a_p‖²``, ``β = ‖a_q‖²``, ``γ = a_pᵀ a_q`` reduced from them, and the rotation that
  makes ``a_p ⟂ a_q`` is applied to them and to rows ``p``, ``q`` of ``Vᵀ``; a barrier separates
  rounds.
* A pair is rotated while ``|γ| > tol·‖a_p‖·‖a_q‖``, ``tol = m·ε``: scale-invariant, and it
  gives singular values to high relative accuracy. (``gesvj`` uses ``√m·ε``, but the rounding error
  of the computed ``γ`` is itself about ``√m·ε·‖a_p‖·‖a_q‖``, so at ``m = 128`` in fp64 pairs kept
  rotating by noise until the sweep limit, seen on the H100; ``m·ε`` stays within the LAPACK
  orthogonality ratio.) At most ``MAX_SWEEPS`` sweeps.
* **Non-convergence** (or NaN/Inf input) is reported in-band without a host sync: all of that
  matrix's outputs are NaN; the rest of the batch is unaffected.
* ``S_j = ‖a_j‖`` (computed as ``s·‖a_j/s‖``), sorted descending with the columns of ``W = A V``
  and ``V``. ``U`` is then the Householder QR of ``W`` (the kernel of
  :mod:`metalcore.linalg.qr_triton`), with column signs taken from ``diag R``: ``W``'s columns are
  orthogonal to ``tol``, so ``R`` is diagonal to that accuracy and ``U`` is orthonormal to working
  precision even where ``S_j = 0`` (rank-deficient input), and ``full_matrices`` comes for free as
  the complete ``Q``.

With QR preconditioning (the default, :func:`svd_launch`), the kernel runs on ``Rᵀ`` of
``A = QR`` (an ``n × n`` problem), ``U = Q V_x`` and ``V`` comes from ``W = Rᵀ V_x`` as ``U`` does
above.

Work per round: 2 loads and 2 stores of ``[N/2, BM]`` tiles (and of ``[N/2, BN]`` for ``V``),
~``6 m n`` flops, 1 block barrier; ``N − 1`` rounds per sweep; typically 6–10 sweeps (at
n = 128 under the interpreter, preconditioned: 8 for κ = 1e6 in fp32, 9 for κ = 1e12 in fp64).
Then two Householder launches and one ``bmm``.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from metalcore._selection import register_path
from metalcore._triton import jit
from metalcore.linalg import _jacobi_triton as jac
from metalcore.linalg._jacobi_triton import nonfinite, round_pairs, rotate_rows, schur_rotation
from metalcore.linalg._small_triton import fits
from metalcore.linalg.qr_triton import householder_launch
from metalcore.linalg.svd import sort_columns, svd_op, unsort_columns
from metalcore.linalg.svd_batched_triton import REGISTER_MAX_N, jacobi_registers
from metalcore.linalg.svd_bidiag_triton import svd_bidiag, svd_bidiag_launcher
from metalcore.linalg.svd_fused_triton import MAX_N as FUSED_MAX_N, svd_fused, svd_fused_launcher
from metalcore.linalg.svd_large import large_supported, path_supported, svd_large

MAX_SWEEPS = jac.MAX_SWEEPS


@jit
def _jacobi_svd_kernel(A, W, S, V, AS, VS, SW, m, n, s_ab, s_ar, s_ac, tol, tiny, max_sweeps,
                       BM: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, WANT_V: tl.constexpr,
                       WANT_SWEEPS: tl.constexpr, IEEE32: tl.constexpr, SPLIT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ri = tl.arange(0, BM)                                            # row index of A
    rj = tl.arange(0, BN)                                            # column index of A
    # Tiles are [columns, rows]: the scratch holds column j of A as its row j.
    a = tl.load(A + b * s_ab + ri[None, :] * s_ar + rj[:, None] * s_ac,
                mask=(ri[None, :] < m) & (rj[:, None] < n), other=0.0)
    bad_input = nonfinite(a)
    amax = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
    scale = tl.where(amax > 0.0, amax, 1.0)
    a_s = AS + b * BN * BM
    tl.store(a_s + rj[:, None] * BM + ri[None, :], a / scale)      # padding is zero
    v_s = VS + b * BN * BN
    if WANT_V:
        tl.store(v_s + rj[:, None] * BN + rj[None, :], tl.where(rj[:, None] == rj[None, :], 1.0, 0.0).to(a.dtype))
    tl.debug_barrier()
    N = n + n % 2
    cols = tl.arange(0, BM)[None, :]

    sweep = 0
    rotated = 1
    while (sweep < max_sweeps) & (rotated > 0) & (bad_input == 0):
        rotated = 0
        for t in range(N - 1):
            p, q, valid = round_pairs(t, N, BH)
            mask = valid[:, None] & (cols < m)
            xp = a_s + p[:, None] * BM + cols
            yp = a_s + q[:, None] * BM + cols
            x = tl.load(xp, mask=mask, other=0.0)
            y = tl.load(yp, mask=mask, other=0.0)
            if SPLIT:
                tl.debug_barrier()      # replicated tile: every copy loaded before any is stored
            # Entries are at most 1 after scaling, so α, β ≤ m: no overflow.
            alpha = tl.sum(x * x, axis=1)
            beta = tl.sum(y * y, axis=1)
            gamma = tl.sum(x * y, axis=1)
            mag = tl.abs(gamma)
            act = valid & (q < n) & (mag > tol * tl.sqrt(alpha) * tl.sqrt(beta)) & (mag > tiny)
            c, s, tt = schur_rotation(alpha, beta, gamma, act, IEEE32)
            rotated += tl.sum(act.to(tl.int32), axis=0)
            tl.store(xp, c[:, None] * x - s[:, None] * y, mask=mask)
            tl.store(yp, s[:, None] * x + c[:, None] * y, mask=mask)
            if WANT_V:
                rotate_rows(v_s, p, q, valid, c, s, BN, BN, BN, SPLIT)
            tl.debug_barrier()
        sweep += 1

    at = tl.load(a_s + rj[:, None] * BM + ri[None, :])               # at[j, i] = (A V)[i, j]
    colmax = tl.max(tl.abs(at), axis=1)
    cm = tl.where(colmax > 0.0, colmax, 1.0)
    sv = colmax * tl.sqrt(tl.sum((at / cm[:, None]) * (at / cm[:, None]), axis=1))   # ‖a_j‖, no underflow
    bad = (rotated > 0) | (bad_input > 0) | (tl.max((sv != sv).to(tl.int32), axis=0) > 0)
    key = tl.where((rj < n) & (sv == sv), sv, -1.0)       # NaN-free keys: ranks stay a permutation
    before = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (rj[None, :] < rj[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)                       # descending position of sv[j]
    tl.store(S + b * n + rank, tl.where(bad, float("nan"), sv * scale), mask=rj < n)
    if WANT_V:
        tl.store(W + b * m * n + ri[None, :] * n + rank[:, None], tl.where(bad, float("nan"), at),
                 mask=(rj[:, None] < n) & (ri[None, :] < m))
        vt = tl.load(v_s + rj[:, None] * BN + rj[None, :])           # vt[j, l] = V[l, j]
        tl.store(V + b * n * n + rj[None, :] * n + rank[:, None], tl.where(bad, float("nan"), vt),
                 mask=(rj[:, None] < n) & (rj[None, :] < n))
    if WANT_SWEEPS:
        tl.store(SW + b, sweep)


def _jacobi(X: Tensor, compute_uv: bool, num_warps: int | None, sweeps: Tensor | None):
    """One-sided Jacobi on the columns of ``X`` ``(*, m, n)``, ``m ≥ n``: ``S`` sorted descending
    and, with ``compute_uv``, ``W = X V`` (scaled by ``1/max|x|``) and ``V`` in the same order."""
    m, n = X.shape[-2:]
    dev, dt = X.device, X.dtype
    S, W, V, X3 = jac.svd_outputs(X, compute_uv)
    nb = X3.shape[0]
    if nb and n:
        finfo = torch.finfo(dt)
        BM, BN = jac.block_of(m), jac.block_of(n)
        AS = torch.empty(nb, BN, BM, dtype=dt, device=dev)
        VS = torch.empty(nb, BN, BN, dtype=dt, device=dev) if compute_uv else AS
        warps = num_warps or jac.jacobi_warps(BN, svd=True)
        _jacobi_svd_kernel[(nb,)](
            X3, W, S, V, AS, VS, S if sweeps is None else sweeps,
            m, n, X3.stride(0), X3.stride(1), X3.stride(2), m * finfo.eps, finfo.tiny / finfo.eps,
            MAX_SWEEPS, BM=BM, BN=BN, BH=BN // 2, WANT_V=compute_uv, WANT_SWEEPS=sweeps is not None,
            IEEE32=dt == torch.float32, SPLIT=jac.replicated(BN // 2, BN, warps), num_warps=warps,
            enable_fp_fusion=jac.FP_FUSION)
    return S, W, V


def _orthonormal(W: Tensor, k: int, cols: int) -> Tensor:
    """The first ``cols`` columns of the Householder ``Q`` of ``W`` ``(*, m, k)``, the first ``k``
    signed by ``diag R``: for ``W`` with orthogonal columns that is ``W`` normalized, and it stays
    orthonormal where a column of ``W`` is zero (rank-deficient input)."""
    _, _, R, Q = householder_launch(W, kr=k, nq=cols)
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(W.dtype).unsqueeze(-2)
    return torch.cat([Q[..., :k] * sign, Q[..., k:]], dim=-1) if cols > k else Q * sign


def svd_launch(A: Tensor, full_matrices: bool, compute_uv: bool, *, num_warps: int | None = None,
               sweeps: Tensor | None = None, precondition: bool = True,
               registers: bool = False, fused: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, Vᴴ)`` of ``A``. ``num_warps`` overrides the Jacobi kernel's launch width; ``sweeps``,
    an int32 tensor of the batch's size, receives each matrix's sweep count (for the device
    benchmark). ``registers``: the register-tile Jacobi kernel (:mod:`svd_batched_triton`, both
    sides at most its ``REGISTER_MAX_N``) instead of the scratch one; preconditioned, the whole
    chain below in one launch (:mod:`svd_fused_triton`) wherever no complete basis of a
    rectangular matrix is asked for (``fused=False``: the chain of launches instead, the ``chain``
    path).

    ``precondition`` (Drmač & Veselić's QR preconditioning): ``A P = QR`` with the Householder kernel,
    ``P`` sorting the columns by scale (:func:`metalcore.linalg.svd.sort_columns`: unsorted, graded
    columns made Jacobi on ``R`` miss the sweep bound), Jacobi on ``X = Rᵀ``: ``X V_x = W`` gives ``R = V_x Wᵀ``, so ``U = Q V_x`` (orthonormal as a
    product of orthonormal factors) and ``V`` is ``W`` with normalized columns (its Householder
    ``Q``, so zero columns still give orthonormal vectors). Jacobi on ``Rᵀ`` needs far fewer sweeps
    than on ``A`` for ill-conditioned input (simulated at n = 128, κ = 1e6 fp32 / 1e12 fp64: 7-8
    sweeps against 20 / 33 — the latter beyond ``MAX_SWEEPS``, which is how the earlier kernel's
    NaN at 64×128 on the H100 arose), and works on ``n × n`` instead of ``m × n``."""
    *batch, m, n = A.shape
    if registers and precondition and fused and _fused(A, full_matrices):
        return svd_fused(A, full_matrices, compute_uv, num_warps=num_warps, sweeps=sweeps)
    if m < n:
        # A = U S Vᴴ  ⇔  Aᵀ = V S Uᵀ: the tall case on the transpose, roles of U and V swapped.
        Ut, S, Vht = svd_launch(A.mT, full_matrices, compute_uv, num_warps=num_warps, sweeps=sweeps,
                                precondition=precondition, registers=registers, fused=fused)
        if not compute_uv:
            return Ut, S, Vht
        return Vht.mT.contiguous(), S, Ut.mT.contiguous()
    k = n

    def jacobi(X):
        if registers:
            return jacobi_registers(X, compute_uv, num_warps=num_warps, sweeps=sweeps)
        return _jacobi(X, compute_uv, num_warps, sweeps)

    if not precondition:
        S, W, V = jacobi(A)
        if not compute_uv:
            return A.new_empty(0), S, A.new_empty(0)
        # U from the QR of W = U S (sorted).
        return _orthonormal(W, k, m if full_matrices else k), S, V.mT.contiguous()
    Ap, order = sort_columns(A)
    _, _, R, Q = householder_launch(Ap, kr=k, nq=(m if full_matrices else k) if compute_uv else 0)
    S, W, Vx = jacobi(R.mT)
    if not compute_uv:
        return A.new_empty(0), S, A.new_empty(0)
    U = Q[..., :k] @ Vx
    if full_matrices:
        U = torch.cat([U, Q[..., k:]], dim=-1)
    return U, S, unsort_columns(_orthonormal(W, k, k).mT, order)


# On the H100 the kernel never finished for some inputs with n ≤ 8 (4096×8, 10000×3 and 200×8 random
# batches; matrix 106 of the 200 alone). Cause (from the sm_90 PTX, bench/linalg_triton.md v5): with
# FMA contraction the butterfly reductions of α, β, γ give the lanes that share a row values that
# differ in the last bit, so near the threshold `act` — and the sweep's rotation count — differed
# between lanes; the warp split at the sweep loop's exit and the lanes that left waited in a
# full-mask shuffle for lanes still inside the loop: a deadlock. The launch now turns contraction
# off (jac.FP_FUSION), which makes the reductions symmetric and the loop exit uniform. Confirmed on
# the H100 (bench/results/batched-eigh-svd-check-h100-20261206-run2.log): matrix 106 and the 200x8,
# 4096x8 and 10000x3 batches converge in 4-7 sweeps without contraction, and matrix 106 still hangs
# with it. Up to 128 it converges (8-9 sweeps with QR preconditioning, ratios <= 18 on random and
# kappa = 1e6 input). Every side runs the kernel; the measured table decides where it wins.
CUDA_MIN_N = 1
# fp64 on CUDA up to n = 64, as for eigh (whose fp64 kernel missed the bar at n = 128 on clustered
# spectra; this one's fp64 at 128 was not checked separately).
CUDA_FP64_MAX_N = 64


def _small(A: Tensor) -> bool:
    side = min(A.shape[-2:])
    return fits(A) and (A.device.type != "cuda" or (
        side >= CUDA_MIN_N and not (A.dtype == torch.float64 and max(A.shape[-2:]) > CUDA_FP64_MAX_N)))


def _automatic(A: Tensor, full_matrices: bool, compute_uv: bool) -> bool:
    return _small(A) or large_supported(A)


def _supported(A: Tensor, full_matrices: bool, compute_uv: bool) -> bool:
    # The kernel takes the sides between too (its own routing sends them to cuSOLVER), so that the
    # "qdwh" path below can be timed and chosen there: a path runs only where its kernel is chosen.
    return _automatic(A, full_matrices, compute_uv) or path_supported(A)


def _fused(A: Tensor, full_matrices: bool) -> bool:
    """Whether ``svd_launch(..., registers=True)`` runs ``A`` in the one launch of svd_fused_triton."""
    m, n = A.shape[-2:]
    return max(m, n) <= FUSED_MAX_N and (m == n or not full_matrices)


def _svd_registers_specialized(A, full_matrices, compute_uv):
    if not _fused(A, full_matrices):
        return None
    run = svd_fused_launcher(A, full_matrices, compute_uv)
    return lambda A, full_matrices, compute_uv: run(A)


# The register-tile Jacobi, QR-preconditioned, as an alternative path taken only where the measured
# table names it (metalcore._selection); in one launch where _fused says so. On the H100 (fp32, ms
# per call, bench/linalg_triton.md v9) the launch ran 500×16 in 0.108 (the chain of launches before
# it 0.441, torch 0.422), 1000×32 0.516 (0.649; 1.144) and 4096×8 0.095 (0.425; 1.609). Without the
# QR step the Jacobi alone took 0.19-0.49 but is not offered: on the interpreter, fp32 matrices whose column scales
# spread over 30 decades missed the 30-sweep bound (NaN) from n = 3 (bench/linalg_triton.md), while
# the preconditioned kernel took 3-7 sweeps on them up to n = 32.
@register_path("svd", "triton", "registers",
               supports=lambda A, full_matrices, compute_uv: _small(A) and max(A.shape[-2:]) <= REGISTER_MAX_N,
               specialize=_svd_registers_specialized)
def _svd_registers_path(A, full_matrices, compute_uv):
    return svd_launch(A, full_matrices, compute_uv, registers=True)


# The same preconditioned register Jacobi as a chain of launches (sort, Householder QR, Jacobi, bmm,
# Householder QR of W): slower than the one launch wherever the round chain binds (500×16² 0.441
# against 0.108 ms on the H100), but faster where the card is full and the launch's five tiles spill:
# 65536×32² 23.7 against 32.2 ms, fp64 1000×32² 1.60 against 1.92 (bench/linalg_triton.md v9). An
# alternative path, so that the table can name it there.
@register_path("svd", "triton", "chain",
               supports=lambda A, full_matrices, compute_uv: _small(A) and max(A.shape[-2:]) <= REGISTER_MAX_N)
def _svd_chain_path(A, full_matrices, compute_uv):
    return svd_launch(A, full_matrices, compute_uv, registers=True, fused=False)


# Golub-Kahan bidiagonalisation, bisection and inverse iteration in registers (svd_bidiag_triton, both
# sides <= 128): the eigenvalue path's stages where Jacobi runs hundreds of rounds; measured by the
# sweep like every path. Reduced factors only, so full_matrices only where it is the same (square).
def _bidiag_supported(A, full_matrices, compute_uv):
    return fits(A) and not (compute_uv and full_matrices and A.shape[-1] != A.shape[-2])


def _svd_bidiag_specialized(A, full_matrices, compute_uv):
    run = svd_bidiag_launcher(A, compute_uv)
    return lambda A, full_matrices, compute_uv: run(A)


@register_path("svd", "triton", "bidiag", supports=_bidiag_supported, specialize=_svd_bidiag_specialized)
def _svd_bidiag_path(A, full_matrices, compute_uv):
    return svd_bidiag(A, compute_uv)


# QR + QDWH + eigh (svd_large) for sides from 33 (path_supported), any batch, as an alternative path
# taken only where the measured table names it. Everything in it is a batched call (batched QR, the
# eigh op's batched cuSOLVER syev), where gesvd loops over the batch: predicted 64×256² fp32 ~20 ms
# against torch's 434 (bench/linalg.md, 2026-12-06). At sides from LARGE_MIN_N it is also what the
# kernel's own routing runs; the table needs it timed there too, so that a call between 256 and 1024
# finds the same path measured faster on both sides.
register_path("svd", "triton", "qdwh", supports=path_supported)(svd_large)


# Chosen automatically wherever it serves: the Jacobi kernel measured faster than torch.linalg.svd
# on the H100 at every size it takes (fp32; bench/linalg_triton.md v4: 500×16 1.4×, 1000×32 1.6×,
# 100×64 92×, 64×128 20×), and matrices with both sides from svd_large.LARGE_MIN_N (1024, the
# smallest size measured) take its
# QR + QDWH + eigh path: on the H100, 4096² fp32 221.8 ms vs 1104.9 ms for torch.linalg.svd
# (4.98×), 11008×4096 3.80×, a batch of 8 1024² 2.19× (bench/results/svd-large-h100-20261125.log).
# Sides from 33 to 1023 that the Jacobi kernel does not take (fp64 above 64, every dtype above 128) stay
# on cuSOLVER unless the measured table names the "qdwh" path there.
@svd_op.implement("triton", supports=_supported, automatic=_automatic)
def _svd_triton(A, full_matrices, compute_uv):
    if _small(A):
        return svd_launch(A, full_matrices, compute_uv)
    if large_supported(A):
        return svd_large(A, full_matrices, compute_uv)
    return svd_op.reference(A, full_matrices, compute_uv)
