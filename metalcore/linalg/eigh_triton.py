"""Symmetric eigendecomposition by parallel two-sided Jacobi in Triton: one program per matrix.

Layers: ``_jacobi_eigh_kernel`` → :func:`eigh_launch` → the ``triton`` implementation of
``metalcore::eigh`` (declared in :mod:`metalcore.linalg.eigh`).

Algorithm (Golub & Van Loan §8.5, parallel ordering):

* The read triangle is mirrored into a full ``[BN, BN]`` tile and divided by ``max|a|``, so that
  tiny- and huge-scaled inputs behave like unit-scaled ones (eigenvalues are scaled back at the end).
* A sweep is ``N − 1`` rounds of the round-robin tournament (``N`` = ``n`` rounded up to even),
  each rotating ``N/2`` disjoint pairs at once, through the per-program scratch buffer of
  :mod:`metalcore.linalg._jacobi_triton`: the pairs' ``a_pp``, ``a_qq``, ``a_pq`` are gathered,
  rows ``p``, ``q`` of ``A`` and of ``Vᵀ`` are rotated (``A ← Jᵀ A``, ``V ← V J``), then, after a
  barrier, columns ``p``, ``q`` of ``A`` (``A ← A J``).
* The rotation of a pair ``(p, q)`` is the symmetric Schur rotation; its off-diagonal entry is set to
  zero exactly and the diagonal updated as ``a_pp − t a_pq``, ``a_qq + t a_pq``.
* Convergence is scale-invariant: a pair is rotated only while ``|a_pq| > tol·√|a_pp|·√|a_qq|``
  with ``tol = √n·ε`` (LAPACK ``gesvj``'s threshold) *and* ``|a_pq| > ε`` (the tile's initial
  largest entry is 1). The absolute floor matters: every rotation leaves rounding noise of about
  ``ε·max|a|`` in the entries it touches, which is far above the relative threshold of a pair of
  small diagonal entries (ill-conditioned or graded input), so without it such pairs rotate forever
  and the sweep limit is hit. Entries under the floor change the result by at most ``n·ε·max|a|``,
  within the LAPACK backward-error ratio. The loop stops after a sweep with no rotation, or after
  ``MAX_SWEEPS``.
* **Non-convergence** (or NaN/Inf input) is reported in-band, without a host sync: that matrix's
  eigenvalues and eigenvectors are all NaN; the other matrices of the batch are unaffected.
* Eigenvalues are sorted ascending and the eigenvector columns scattered to match.

Work per round: 4 loads and 4 stores of ``[N/2, BN]`` tiles (2 and 2 more for ``V``), ~``6 n²``
flops, 2 block barriers; per sweep ``N − 1`` rounds; typically 6–12 sweeps. Bytes from DRAM: ``A``
read once, ``Q`` and ``L`` written once (the scratch stays in L1/L2).
"""

from __future__ import annotations

import math

import torch
import triton.language as tl
from torch import Tensor

from metalcore._graphs import replay
from metalcore._selection import register_path
from metalcore._triton import jit
from metalcore.linalg import _jacobi_triton as jac
from metalcore.linalg import cusolver_batched, cusolver_syevj
from metalcore.linalg._jacobi_triton import nonfinite, round_pairs, rotate_rows, schur_rotation
from metalcore.linalg._small_triton import DTYPES, fits
from metalcore.linalg.eigh import eigh_op
from metalcore.linalg.eigh_batched_triton import REGISTER_MAX_N, eigh_registers
from metalcore.linalg.eigh_shifted_triton import MAX_N as SHIFTED_MAX_N, eigh_shifted, eigh_shifted_launcher
from metalcore.linalg.eigh_tridiag_triton import MAX_N as TRIDIAG_MAX_N, eigh_tridiag, eigh_tridiag_launcher
from metalcore.linalg.eigh_twostage import eigh_twostage

MAX_SWEEPS = jac.MAX_SWEEPS


@jit
def _jacobi_eigh_kernel(A, W, V, AS, VS, SW, n, s_ab, s_ar, s_ac, tol, floor, max_sweeps,
                        BN: tl.constexpr, BH: tl.constexpr, UPPER: tl.constexpr, WANT_V: tl.constexpr,
                        WANT_SWEEPS: tl.constexpr, IEEE32: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BN)
    r2 = r[:, None]
    c2 = r[None, :]
    inside = (r2 < n) & (c2 < n)
    hi = tl.maximum(r2, c2)
    lo = tl.minimum(r2, c2)
    if UPPER:
        a = tl.load(A + b * s_ab + lo * s_ar + hi * s_ac, mask=inside, other=0.0)
    else:
        a = tl.load(A + b * s_ab + hi * s_ar + lo * s_ac, mask=inside, other=0.0)
    bad_input = nonfinite(a)
    amax = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
    scale = tl.where(amax > 0.0, amax, 1.0)
    a_s = AS + b * BN * BN
    tl.store(a_s + r2 * BN + c2, a / scale)                      # padding rows/columns are zero
    v_s = VS + b * BN * BN
    if WANT_V:
        tl.store(v_s + r2 * BN + c2, tl.where(r2 == c2, 1.0, 0.0).to(a.dtype))   # row i = column i of V
    tl.debug_barrier()
    N = n + n % 2

    sweep = 0
    rotated = 1
    while (sweep < max_sweeps) & (rotated > 0) & (bad_input == 0):
        rotated = 0
        for t in range(N - 1):
            p, q, valid = round_pairs(t, N, BH)
            app = tl.load(a_s + p * BN + p, mask=valid, other=1.0)
            aqq = tl.load(a_s + q * BN + q, mask=valid, other=1.0)
            apq = tl.load(a_s + p * BN + q, mask=valid, other=0.0)
            mag = tl.abs(apq)
            act = valid & (q < n) & (mag > tol * tl.sqrt(tl.abs(app)) * tl.sqrt(tl.abs(aqq))) & (mag > floor)
            c, s, tt = schur_rotation(app, aqq, apq, act, IEEE32)
            rotated += tl.sum(act.to(tl.int32), axis=0)
            # A ← Jᵀ A: rows p, q (and V ← V J on V's columns, kept as rows of VS).
            rotate_rows(a_s, p, q, valid, c, s, BN, BN, BN)
            if WANT_V:
                rotate_rows(v_s, p, q, valid, c, s, BN, BN, BN)
            tl.debug_barrier()
            # A ← A J: columns p, q, read as [BH, BN] tiles (entry [k, i] = A[i, p_k]). The 2×2 block
            # is set to its exact result: a_pq = 0, a_pp − t·a_pq, a_qq + t·a_pq (GVL 8.5).
            cmask = valid[:, None] & (c2 >= 0)
            xp = a_s + c2 * BN + p[:, None]
            yp = a_s + c2 * BN + q[:, None]
            x = tl.load(xp, mask=cmask, other=0.0)
            y = tl.load(yp, mask=cmask, other=0.0)
            nx = c[:, None] * x - s[:, None] * y
            ny = s[:, None] * x + c[:, None] * y
            fix = act[:, None]
            on_p = c2 == p[:, None]
            on_q = c2 == q[:, None]
            nx = tl.where(fix & on_p, (app - tt * apq)[:, None], tl.where(fix & on_q, 0.0, nx))
            ny = tl.where(fix & on_q, (aqq + tt * apq)[:, None], tl.where(fix & on_p, 0.0, ny))
            tl.store(xp, nx, mask=cmask)
            tl.store(yp, ny, mask=cmask)
            tl.debug_barrier()
        sweep += 1

    d = tl.load(a_s + r * BN + r)
    bad = (rotated > 0) | (bad_input > 0) | (tl.max((d != d).to(tl.int32), axis=0) > 0)
    key = tl.where((r < n) & (d == d), d, float("inf"))   # NaN-free keys: ranks stay a permutation
    before = (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (c2 < r2))
    rank = tl.sum(before.to(tl.int32), axis=1)                     # ascending position of d[i]
    tl.store(W + b * n + rank, tl.where(bad, float("nan"), d * scale), mask=r < n)
    if WANT_V:
        vt = tl.load(v_s + r2 * BN + c2)                             # vt[i, j] = V[j, i]
        tl.store(V + b * n * n + c2 * n + rank[:, None], tl.where(bad, float("nan"), vt), mask=inside)
    if WANT_SWEEPS:
        tl.store(SW + b, sweep)


def eigh_launch(A: Tensor, upper: bool, compute_v: bool, *, num_warps: int | None = None,
                sweeps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(L, Q)`` of the symmetric matrices ``A`` (read from the ``upper`` or lower triangle).
    ``num_warps`` overrides the default launch width; ``sweeps``, an int32 tensor of the batch's
    size, receives each matrix's sweep count (for the device benchmark)."""
    n = A.shape[-1]
    L, Q, A3 = jac.eigh_outputs(A, compute_v)
    nb = A3.shape[0]
    if nb == 0 or n == 0:
        return L, Q
    finfo = torch.finfo(A.dtype)
    BN = jac.block_of(n)
    AS = torch.empty(nb, BN, BN, dtype=A.dtype, device=A.device)
    VS = torch.empty_like(AS) if compute_v else AS
    _jacobi_eigh_kernel[(nb,)](
        A3, L, Q if compute_v else L, AS, VS, L if sweeps is None else sweeps, n,
        A3.stride(0), A3.stride(1), A3.stride(2), math.sqrt(n) * finfo.eps, finfo.eps, MAX_SWEEPS,
        BN=BN, BH=BN // 2, UPPER=upper, WANT_V=compute_v, WANT_SWEEPS=sweeps is not None,
        IEEE32=A.dtype == torch.float32, num_warps=num_warps or jac.jacobi_warps(BN, svd=False))
    return L, Q


# fp64 on CUDA up to n = 64: at 64×128 fp64 the clustered-spectrum family's QᵀQ ratio was 38.9 on
# the H100 (bar 30; fp32 and every other family passed), so fp64 above 64 goes to cuSOLVER.
CUDA_FP64_MAX_N = 64


def _jacobi_supported(A: Tensor) -> bool:
    return fits(A) and not (A.device.type == "cuda" and A.dtype == torch.float64 and A.shape[-1] > CUDA_FP64_MAX_N)


def _cusolver_supported(A: Tensor) -> bool:
    return A.device.type == "cuda" and A.dtype in (torch.float32, torch.float64) and cusolver_batched.available()


# cuSOLVER's batched syev (XsyevBatched) for batches of n from 64 to 512, measured on the H100
# (bench/results/batched-eigh-svd-check-h100-20261206-run1.json, fp32 unless said, ms per call):
# 100×64 0.69 (scratch Jacobi 1.37, JAX 0.70, CuPy 1.04, torch 85.6), 64×128 1.14 (Jacobi 10.1, JAX
# 1.34), 64×256 3.87 (JAX 4.06, torch 298), 16×512 34.9 (JAX 30.3, CuPy 39.4, torch 214), fp64 100×64
# 0.71 (Jacobi 3.53, JAX 0.85); LAPACK ratios ≤ 1.1. Below 64 it lost (1000×32 0.74 against torch's
# 0.78 and CuPy's 0.56; 500×16 0.48 against torch's 0.24); single matrices and n > 512 were not timed.
CUSOLVER_AUTO_MIN_N = 64
CUSOLVER_AUTO_MAX_N = 512


def _cusolver_preferred(A: Tensor) -> bool:
    n = A.shape[-1]
    return (CUSOLVER_AUTO_MIN_N <= n <= CUSOLVER_AUTO_MAX_N and A.numel() >= 2 * n * n
            and _cusolver_supported(A))


# The Jacobi kernels are chosen automatically where the H100 measured them faster than
# torch.linalg.eigh (cuSOLVER syevj batched / syevd; bench/linalg_triton.md v4, fp32): n ≤ 16
# (500×16 1.3×, 4096×8 1.7×, 10000×3 2.2×) and n ≥ 64 (100×64 57.6×, 64×128 11.3×; batches there
# now take cuSOLVER's batched syev, single matrices stay on Jacobi), but not at 1000×32 (0.7×:
# syevj's batched path is at its best there).
AUTO_SMALL_MAX_N = 16
AUTO_LARGE_MIN_N = 64


def _automatic(A: Tensor, UPLO: str, compute_v: bool) -> bool:
    n = A.shape[-1]
    return _cusolver_preferred(A) or (_jacobi_supported(A) and (n <= AUTO_SMALL_MAX_N or n >= AUTO_LARGE_MIN_N))


# Alternative paths, taken only where the measured table names them (metalcore._selection; the sweep
# times each at every grid point). On the H100 (bench/results/batched-eigh-svd-check-h100-20261206-run2.log,
# fp32, ms per call): the register tile won at 10000×3 (0.084, 0.076 with 4 matrices a program,
# against the scratch kernel's 0.121, torch's 0.262 and CuPy's 0.203) and lost from n = 8 up (4096×8
# 0.205 against 0.144; 1000×32 2.53 against 1.06); cuSOLVER's batched syev lost below n = 64 (1000×32
# 0.711 against torch's 0.689) and won from 64 up, where the kernel's own routing takes it anyway.
@register_path("eigh", "triton", "registers", supports=lambda A, UPLO, compute_v: fits(A, max_n=REGISTER_MAX_N))
def _eigh_registers_path(A, UPLO, compute_v):
    return eigh_registers(A, UPLO == "U", compute_v)


@register_path("eigh", "triton", "cusolver", supports=lambda A, UPLO, compute_v: _cusolver_supported(A))
def _eigh_cusolver_path(A, UPLO, compute_v):
    return cusolver_batched.syev_batched(A, UPLO == "U", compute_v)


# cuSOLVER's batched Jacobi (syevjBatched, n <= 32), called directly: the routine torch.linalg.eigh
# runs for these batches, without torch's layers. CuPy's call of it was the best peer on the H100 at
# 500×16 (115 µs against torch's 243 and the kernel's 176) and 1000×32 (530 against 675 and torch's
# call; bench/results/peers-headline-h100-20261206-v2.txt); measured by the sweep like every path.
@register_path("eigh", "triton", "syevj", supports=lambda A, UPLO, compute_v: cusolver_syevj.supports(A))
def _eigh_syevj_path(A, UPLO, compute_v):
    return cusolver_syevj.syevj_batched(A, UPLO == "U", compute_v)


# One-sided Jacobi on the shifted A + cI in registers (eigh_shifted_triton, n <= 64): the svd kernels'
# one-gather rounds instead of the two-sided kernels' three; measured by the sweep like every path.
def _eigh_shifted_specialized(A, UPLO, compute_v):
    run = eigh_shifted_launcher(A, UPLO == "U", compute_v)
    return lambda A, UPLO, compute_v: run(A)


@register_path("eigh", "triton", "shifted", supports=lambda A, UPLO, compute_v: fits(A, max_n=SHIFTED_MAX_N),
               specialize=_eigh_shifted_specialized)
def _eigh_shifted_path(A, UPLO, compute_v):
    return eigh_shifted(A, UPLO == "U", compute_v)


# Householder tridiagonalisation, Sturm multisection and inverse iteration in registers
# (eigh_tridiag_triton, n <= 128), n − 2 dependent reduction steps where Jacobi runs hundreds of
# rounds; measured by the sweep like every path.
def _eigh_tridiag_specialized(A, UPLO, compute_v):
    run = eigh_tridiag_launcher(A, UPLO == "U", compute_v)
    return lambda A, UPLO, compute_v: run(A)


@register_path("eigh", "triton", "tridiag",
               supports=lambda A, UPLO, compute_v: fits(A, max_n=TRIDIAG_MAX_N),
               specialize=_eigh_tridiag_specialized)
def _eigh_tridiag_path(A, UPLO, compute_v):
    return eigh_tridiag(A, UPLO == "U", compute_v)


# Dense → band by GEMMs, bulge chasing, and the batched tridiagonal solver (eigh_twostage), above the
# register tile; measured by the sweep like every path (no H100 time yet: bench/linalg.md). Read at
# call time, so that tests can send small matrices to it.
TWOSTAGE_MIN_N = TRIDIAG_MAX_N + 1


def _twostage_supported(A: Tensor) -> bool:
    return A.dtype in DTYPES and A.shape[-1] >= TWOSTAGE_MIN_N


@register_path("eigh", "triton", "twostage", supports=lambda A, UPLO, compute_v: _twostage_supported(A))
def _eigh_twostage_path(A, UPLO, compute_v):
    # Replayed as a CUDA graph from the second call on: ~200-900 launches a call made it host-bound
    # (64×256² fp32: 10.9 ms of host time against 5.3 ms of GPU time, H100; bench/linalg.md).
    return replay(eigh_twostage, A, upper=UPLO == "U", compute_v=compute_v)


@eigh_op.implement("triton", supports=lambda A, UPLO, compute_v: _jacobi_supported(A) or _cusolver_supported(A),
                   automatic=_automatic)
def _eigh_triton(A, UPLO, compute_v):
    if _cusolver_preferred(A) or not _jacobi_supported(A):
        return cusolver_batched.syev_batched(A, UPLO == "U", compute_v)
    return eigh_launch(A, UPLO == "U", compute_v)
