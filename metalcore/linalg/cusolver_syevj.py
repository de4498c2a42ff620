"""Batched symmetric eigendecomposition of small matrices (n ≤ 32) through cuSOLVER's batched
Jacobi, ``cusolverDn{S,D}syevjBatched``, called directly.

``torch.linalg.eigh`` runs the same routine for batches of n ≤ 32, but with more around it (a
column-major copy, an ``info`` check that synchronises with the host): on the H100 it took 243 µs
at 500×16² and 675 µs at 1000×32² (fp32), where CuPy's thinner call of the same routine took 115 and
530 µs (bench/results/peers-headline-h100-20261206-v2.txt). This module makes CuPy's call, through
``ctypes``, with the library, per-thread handles and batch split of
:mod:`metalcore.linalg.cusolver_batched`, on torch's current stream, the workspace from torch's
allocator and no host synchronisation.

Per call, three steps, each a function of its own (the two kernels are tested on the CPU under the
Triton interpreter):

* :func:`prepare`, one Triton launch: the read triangle of each matrix, divided by its largest
  entry, into a fresh contiguous buffer with the other triangle zero (cuSOLVER's stopping test is
  relative to ‖A‖_F, whose square would under/overflow for the tiny- and huge-scaled test families,
  1e∓25 in fp32; eigenvalues are scaled back), and the scale, NaN for a matrix whose read triangle
  is not finite (that matrix is handed to cuSOLVER as zeros, which it finishes at once);
* one library call per :data:`~metalcore.linalg.cusolver_batched.MAX_BATCH` matrices;
* :func:`finish`, one Triton launch: eigenvalues in ascending order, scaled back, and the vectors
  permuted to match (cuSOLVER's own sort is switched off: torch's call of it returned clustered
  eigenvalues a few ulps out of order on the H100, see ``metalcore/linalg/eigh.py``); NaN for every
  output of a matrix whose ``info`` is non-zero (no convergence within :data:`MAX_SWEEPS`) or whose
  scale is NaN. The other matrices are unaffected.

Launches besides the library's: 2, none with a host synchronisation; 11 aten calls on the host
(allocations and views). Until v8 of bench/linalg_triton.md the same work was 12 torch kernels and
32 aten calls — ``tril``, ``vector_norm``, ``clamp_min``, ``div_`` before the library call; ``==``,
``<``, ``&``, ``sort``, ``*``, ``where``, ``gather``, ``where`` after it (the last two only with
vectors) — at about 5–10 µs of host time a kernel on the H100's machine: at 500×16² the path took
0.268 ms against CuPy's 0.111 for the same library call.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import cdiv, jit
from metalcore.linalg._small_triton import block, group, warps
from metalcore.linalg.cusolver_batched import (
    FILL_LOWER, FILL_UPPER, NOVECTOR, SYEVJ_SYMBOLS, VECTOR, Library, check, chunks, device_index, has,
    library,
)

__all__ = ["MAX_N", "MAX_SWEEPS", "available", "finish", "prepare", "supports", "syevj_batched"]

# cuSOLVER's batched Jacobi takes matrices of side at most 32 (its documented limit; torch calls it
# for batches of n <= 32 only, syevd or single-matrix syevj above).
MAX_N = 32
# Sweeps before a matrix is reported as not converged (info = n + 1, NaN here). cuSOLVER's default
# is 100 and its documentation says 15 are enough for machine accuracy; 30 is the bound of
# metalcore's own Jacobi kernels (LAPACK gesvj's), twice that, and keeps a batch holding one
# pathological matrix from running 100 sweeps.
MAX_SWEEPS = 30

_PREFIX = {torch.float32: "S", torch.float64: "D"}
_c_void = ctypes.c_void_p
_int = ctypes.c_int


def tolerance(dtype: torch.dtype, n: int) -> float:
    """cuSOLVER stops a matrix when its off-diagonal Frobenius norm is at most ``tolerance·‖A‖_F``.
    ``n·ε`` keeps that part of the LAPACK residual ratio ``‖A − QΛQᵀ‖_F / (n·ε·‖A‖_F)`` at most 1,
    far under the bar of 30. The dtype's ε (cuSOLVER's default) ran one or two sweeps more for
    nothing: on the H100 (bench/results/syevj-check-h100-20261206.log, fp32) 1000×32² took 1.028 ms
    against 0.595 with ``n·ε`` and 65536×32² 21.8 against 16.8 ms (JAX 16.6, CuPy 16.4), with the
    same worst ratio (7.9 against 6.9; 8.2 against 7.8)."""
    return n * torch.finfo(dtype).eps


@functools.cache
def _bound(lib: Library) -> ctypes.CDLL:
    """``lib``'s syevj functions with their C signatures (set once per library)."""
    c = lib.lib
    c.cusolverDnCreateSyevjInfo.argtypes = [ctypes.POINTER(_c_void)]
    c.cusolverDnXsyevjSetTolerance.argtypes = [_c_void, ctypes.c_double]
    c.cusolverDnXsyevjSetMaxSweeps.argtypes = [_c_void, _int]
    c.cusolverDnXsyevjSetSortEig.argtypes = [_c_void, _int]
    functions = [c.cusolverDnCreateSyevjInfo, c.cusolverDnXsyevjSetTolerance, c.cusolverDnXsyevjSetMaxSweeps,
                 c.cusolverDnXsyevjSetSortEig]
    for p in _PREFIX.values():
        # (handle, jobz, uplo, n, A, lda, W, *lwork, params, batchSize)
        size = getattr(c, f"cusolverDn{p}syevjBatched_bufferSize")
        size.argtypes = [_c_void, _int, _int, _int, _c_void, _int, _c_void, ctypes.POINTER(_int), _c_void, _int]
        # (handle, jobz, uplo, n, A, lda, W, work, lwork, info, params, batchSize)
        run = getattr(c, f"cusolverDn{p}syevjBatched")
        run.argtypes = [_c_void, _int, _int, _int, _c_void, _int, _c_void, _c_void, _int, _c_void, _c_void, _int]
        functions += [size, run]
    for fn in functions:
        fn.restype = _int
    return c


def available() -> bool:
    """Whether CUDA is usable and the loaded ``libcusolver`` has ``{S,D}syevjBatched``."""
    lib = library() if torch.cuda.is_available() else None
    return lib is not None and has(lib.lib, *SYEVJ_SYMBOLS)


def supports(A: Tensor) -> bool:
    """Whether :func:`syevj_batched` takes ``A``: CUDA, float32/float64, n ≤ :data:`MAX_N`, and the
    library is there (so CPU tensors, the interpreter and CPU-only builds never reach it)."""
    return A.device.type == "cuda" and A.dtype in _PREFIX and A.shape[-1] <= MAX_N and available()


# syevjInfo parameters per thread, device, dtype and tolerance (cuSOLVER's handles and parameter
# structures are not thread-safe), and the workspace sizes per call shape: both are host calls
# worth skipping on every eigh of a training step.
_local = threading.local()
_lwork: dict[tuple[int, int, int, torch.dtype, int, int], int] = {}


def _params(c: ctypes.CDLL, device: torch.device, dtype: torch.dtype, tol: float) -> int:
    cache = _local.__dict__.setdefault("params", {})
    key = (device_index(device), dtype, tol)
    if key not in cache:
        p = _c_void()
        check(c.cusolverDnCreateSyevjInfo(ctypes.byref(p)), "cusolverDnCreateSyevjInfo")
        check(c.cusolverDnXsyevjSetTolerance(p, tol), "cusolverDnXsyevjSetTolerance")
        check(c.cusolverDnXsyevjSetMaxSweeps(p, MAX_SWEEPS), "cusolverDnXsyevjSetMaxSweeps")
        check(c.cusolverDnXsyevjSetSortEig(p, 0), "cusolverDnXsyevjSetSortEig")
        cache[key] = p.value
    return cache[key]


def _workspace(c: ctypes.CDLL, handle: int, params: int, device: torch.device, dtype: torch.dtype,
               jobz: int, fill: int, n: int, count: int, A: int, W: int) -> int:
    """Elements of ``dtype`` the call on ``count`` matrices needs (queried once per shape)."""
    key = (device_index(device), n, count, dtype, jobz, fill)
    if key not in _lwork:
        lwork = _int()
        name = f"cusolverDn{_PREFIX[dtype]}syevjBatched_bufferSize"
        check(getattr(c, name)(handle, jobz, fill, n, A, n, W, ctypes.byref(lwork), params, count), name)
        _lwork[key] = lwork.value
    return _lwork[key]


# --- Before and after the library call: two Triton kernels -------------------------------------------
#
# Each program holds G whole matrices as a [G, BN, BN] register tile (BN = n padded to a power of two,
# at most 32), G from _small_triton.group (about 512 elements a program: 32 matrices at n = 3, one at
# n = 32), so that 10000×3² is ~300 programs and not 10000 almost empty ones. Each kernel reads one
# (nb, n, n) buffer and writes one: at 65536×32² fp32 (268 MB a buffer) 4 passes in all, ~0.32 ms at
# 3.35 TB/s, where the torch ops they replace made 9 (tril 2, vector_norm 1, div_ 2, gather 2,
# where 2: ~0.72 ms).


@jit
def _prepare_kernel(A, WORK, SCALE, nb, n, s_ab, s_ar, s_ac,
                    G: tl.constexpr, BN: tl.constexpr, UPPER: tl.constexpr, TINY: tl.constexpr,
                    IEEE32: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    live = g < nb
    r = tl.arange(0, BN)
    g3 = g[:, None, None]
    r3 = r[None, :, None]
    c3 = r[None, None, :]
    inside = live[:, None, None] & (r3 < n) & (c3 < n)
    if UPPER:
        read = inside & (c3 >= r3)
    else:
        read = inside & (c3 <= r3)
    a = tl.load(A + g3 * s_ab + r3 * s_ar + c3 * s_ac, mask=read, other=0.0)
    # tl.max skips NaN on the GPU, so non-finite entries are looked for explicitly.
    bad = tl.max(tl.max(((a != a) | (tl.abs(a) == float("inf"))).to(tl.int32), axis=2), axis=1) > 0
    scale = tl.maximum(tl.max(tl.max(tl.abs(a), axis=2), axis=1), TINY)
    divisor = tl.where(bad, 1.0, scale)[:, None, None]
    # IEEE-rounded in fp32 (Triton's default division is the approximate, 2-ulp instruction), so that
    # the buffer is bit for bit A's triangle / scale, as torch's div_ gave it.
    if IEEE32:
        w = tl.div_rn(a, divisor)
    else:
        w = a / divisor
    tl.store(WORK + g3 * n * n + r3 * n + c3, tl.where(bad[:, None, None], 0.0, w), mask=inside)
    tl.store(SCALE + g, tl.where(bad, float("nan"), scale), mask=live)


@jit
def _finish_kernel(W, INFO, SCALE, V, L, R, nb, n, G: tl.constexpr, BN: tl.constexpr, WANT_V: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    live = g < nb
    r = tl.arange(0, BN)
    r2 = r[None, :]
    i3 = r[None, :, None]
    j3 = r[None, None, :]
    row = live[:, None] & (r2 < n)
    w = tl.load(W + g[:, None] * n + r2, mask=row, other=0.0)
    info = tl.load(INFO + g, mask=live, other=0)
    scale = tl.load(SCALE + g, mask=live, other=1.0)
    bad = ((info != 0) | (scale != scale))[:, None]
    # Stable ascending rank: #{j : w_j < w_i, or w_j = w_i and j < i}. NaN (only ever in a failed
    # matrix's output) is keyed as +inf so that the ranks stay a permutation and every slot is written.
    key = tl.where(w == w, w, float("inf"))
    key_i = key[:, :, None]
    key_j = key[:, None, :]
    before = (j3 < n) & ((key_j < key_i) | ((key_j == key_i) & (j3 < i3)))
    rank = tl.sum(before.to(tl.int32), axis=2)                                           # [G, BN]
    tl.store(L + g[:, None] * n + rank, tl.where(bad, float("nan"), w * scale[:, None]), mask=row)
    if WANT_V:
        g3 = g[:, None, None]
        inside = row[:, :, None] & (j3 < n)
        v = tl.load(V + g3 * n * n + i3 * n + j3, mask=inside, other=0.0)               # row i: vector of w_i
        tl.store(R + g3 * n * n + rank[:, :, None] * n + j3, tl.where(bad[:, :, None], float("nan"), v),
                 mask=inside)


def _program_shape(nb: int, n: int, device: torch.device, matrices_per_program: int | None) -> tuple[int, int, int]:
    BN = block(n)
    G = matrices_per_program or group(nb, BN * BN, device)
    return BN, G, warps(G * BN * BN)


def prepare(A3: Tensor, upper: bool, *, matrices_per_program: int | None = None) -> tuple[Tensor, Tensor]:
    """``(work, scale)`` for the stack ``A3`` ``(nb, n, n)`` (any strides), nb, n ≥ 1: ``work`` a new
    contiguous ``(nb, n, n)`` holding each matrix's ``upper`` or lower triangle divided by ``scale``
    ``(nb,)``, the triangle's largest absolute entry (at least ``finfo.tiny``), and zeros elsewhere;
    for a matrix whose triangle holds a NaN or an infinity, ``scale`` is NaN and ``work`` zero.
    ``matrices_per_program`` overrides the launch shape (tests)."""
    nb, n = A3.shape[0], A3.shape[-1]
    work = torch.empty(nb, n, n, dtype=A3.dtype, device=A3.device)
    scale = torch.empty(nb, dtype=A3.dtype, device=A3.device)
    BN, G, num_warps = _program_shape(nb, n, A3.device, matrices_per_program)
    _prepare_kernel[(cdiv(nb, G),)](
        A3, work, scale, nb, n, A3.stride(0), A3.stride(1), A3.stride(2), G=G, BN=BN, UPPER=upper,
        TINY=torch.finfo(A3.dtype).tiny, IEEE32=A3.dtype == torch.float32, num_warps=num_warps)
    return work, scale


def finish(W: Tensor, info: Tensor, scale: Tensor, vectors: Tensor | None, *,
           matrices_per_program: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``(L, rows)`` from cuSOLVER's unsorted eigenvalues ``W`` ``(nb, n)`` of the scaled matrices,
    its ``info`` ``(nb,)`` int32, :func:`prepare`'s ``scale`` and, if given, the ``vectors``
    ``(nb, n, n)`` whose row ``k`` belongs to ``W[:, k]``: ``L`` = ``W`` in ascending order (stable)
    times ``scale``, ``rows`` (None without ``vectors``) the rows in that order; both NaN for a
    matrix with ``info ≠ 0`` or a NaN ``scale``. ``matrices_per_program`` overrides the launch
    shape (tests)."""
    nb, n = W.shape
    L = torch.empty_like(W)
    rows = None if vectors is None else torch.empty_like(vectors)
    BN, G, num_warps = _program_shape(nb, n, W.device, matrices_per_program)
    _finish_kernel[(cdiv(nb, G),)](
        W, info, scale, W if vectors is None else vectors, L, L if rows is None else rows, nb, n,
        G=G, BN=BN, WANT_V=vectors is not None, num_warps=num_warps)
    return L, rows


def syevj_batched(A: Tensor, upper: bool, compute_v: bool) -> tuple[Tensor, Tensor]:
    """``(L, Q)`` of the symmetric CUDA matrices ``A`` ``(*, n, n)``, n ≤ :data:`MAX_N`, float32 or
    float64, read from the ``upper`` or lower triangle; ``Q`` is empty without ``compute_v``.
    Requires :func:`available`."""
    lib = library()
    if lib is None or not has(lib.lib, *SYEVJ_SYMBOLS):
        raise RuntimeError("metalcore: cusolverDn{S,D}syevjBatched is not available (no libcusolver loaded)")
    if A.dtype not in _PREFIX:
        raise TypeError(f"metalcore: syevj_batched: A must have dtype float32 or float64; got {A.dtype}")
    n = A.shape[-1]
    if n > MAX_N:
        raise ValueError(f"metalcore: syevj_batched: A must have n <= {MAX_N} (cuSOLVER's batched Jacobi); got n = {n}")
    A3 = A.reshape(-1, n, n)
    nb = A3.shape[0]
    if nb == 0 or n == 0:
        return A.new_empty(A.shape[:-1]), (A.new_empty(A.shape) if compute_v else A.new_empty(0))
    c = _bound(lib)
    handle, _ = lib.handle(A.device)
    params = _params(c, A.device, A.dtype, tolerance(A.dtype, n))
    jobz = VECTOR if compute_v else NOVECTOR
    # cuSOLVER reads column-major: the row-major lower triangle is its upper one.
    fill = FILL_LOWER if upper else FILL_UPPER
    run = getattr(c, f"cusolverDn{_PREFIX[A.dtype]}syevjBatched")
    # The kernels launch on the current device's stream, the library on the one set here: both are A's.
    with torch.cuda.device(A.device):
        # The work buffer is overwritten with the eigenvectors, column j (row j here) = vector of W[:, j].
        work, scale = prepare(A3, upper)
        W = torch.empty(nb, n, dtype=A.dtype, device=A.device)
        info = torch.empty(nb, dtype=torch.int32, device=A.device)
        check(c.cusolverDnSetStream(handle, torch.cuda.current_stream().cuda_stream), "cusolverDnSetStream")
        # Chunk pointers by arithmetic, not by indexing the tensors (an aten call each, ~1 µs).
        a0, w0, i0 = work.data_ptr(), W.data_ptr(), info.data_ptr()
        size, isize = A.element_size(), info.element_size()
        for start, count in chunks(nb, n):
            a, w = a0 + start * n * n * size, w0 + start * n * size
            lwork = _workspace(c, handle, params, A.device, A.dtype, jobz, fill, n, count, a, w)
            ws = torch.empty(max(lwork, 1), dtype=A.dtype, device=A.device)
            check(run(handle, jobz, fill, n, a, n, w, ws.data_ptr(), lwork, i0 + start * isize, params, count),
                  f"cusolverDn{_PREFIX[A.dtype]}syevjBatched")
        L, rows = finish(W, info, scale, work if compute_v else None)
    L = L.reshape(A.shape[:-1])
    if rows is None:
        return L, A.new_empty(0)
    # Q = rowsᵀ as a view: the column-major layout torch.linalg.eigh returns.
    return L, rows.mT.reshape(A.shape)
