"""Batched symmetric eigendecomposition of small matrices (n ≤ 32) through cuSOLVER's batched
Jacobi, ``cusolverDn{S,D}syevjBatched``, called directly.

``torch.linalg.eigh`` runs the same routine for batches of n ≤ 32, but with more around it (a
column-major copy, an ``info`` check that synchronises with the host): on the H100 it took 243 µs
at 500×16² and 675 µs at 1000×32² (fp32), where CuPy's thinner call of the same routine took 115 and
530 µs (bench/results/peers-headline-h100-20261206-v2.txt). This module makes CuPy's call, through
``ctypes``, with the library, per-thread handles and batch split of
:mod:`metalcore.linalg.cusolver_batched`, on torch's current stream, the workspace from torch's
allocator and no host synchronisation.

Per call: the read triangle is copied and each matrix divided by its largest entry (cuSOLVER's
stopping test is relative to ‖A‖_F, whose square would under/overflow for the tiny- and
huge-scaled test families, 1e∓25 in fp32; eigenvalues are scaled back); one library call per
:data:`~metalcore.linalg.cusolver_batched.MAX_BATCH` matrices; then the eigenvalues are sorted
ascending and the vectors gathered to match (cuSOLVER's own sort is switched off: torch's call of
it returned clustered eigenvalues a few ulps out of order on the H100, see
``metalcore/linalg/eigh.py``). A matrix whose ``info`` is non-zero (no convergence within
:data:`MAX_SWEEPS`) or whose read triangle is not finite gets NaN eigenvalues and eigenvectors; the
others are unaffected. Launches besides the library's: 4 before it (copy, max, clamp, divide) and
5-6 after (flags, sort, scale and mask the values, gather and mask the vectors), all without a
host synchronisation.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading

import torch
from torch import Tensor

from metalcore.linalg.cusolver_batched import (
    FILL_LOWER, FILL_UPPER, NOVECTOR, SYEVJ_SYMBOLS, VECTOR, Library, check, chunks, device_index, has,
    library,
)

__all__ = ["MAX_N", "MAX_SWEEPS", "available", "supports", "syevj_batched"]

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


def syevj_batched(A: Tensor, upper: bool, compute_v: bool, *, tol: float | None = None) -> tuple[Tensor, Tensor]:
    """``(L, Q)`` of the symmetric CUDA matrices ``A`` ``(*, n, n)``, n ≤ :data:`MAX_N`, float32 or
    float64, read from the ``upper`` or lower triangle; ``Q`` is empty without ``compute_v``.
    ``tol`` overrides :func:`tolerance` (for the device benchmark). Requires :func:`available`."""
    lib = library()
    if lib is None or not has(lib.lib, *SYEVJ_SYMBOLS):
        raise RuntimeError("metalcore: cusolverDn{S,D}syevjBatched is not available (no libcusolver loaded)")
    if A.dtype not in _PREFIX:
        raise TypeError(f"metalcore: syevj_batched: A must have dtype float32 or float64; got {A.dtype}")
    n = A.shape[-1]
    if n > MAX_N:
        raise ValueError(f"metalcore: syevj_batched: A must have n <= {MAX_N} (cuSOLVER's batched Jacobi); got n = {n}")
    c = _bound(lib)
    A3 = A.reshape(-1, n, n)
    nb = A3.shape[0]
    L = torch.empty(nb, n, dtype=A.dtype, device=A.device)
    if nb == 0 or n == 0:
        return L.reshape(A.shape[:-1]), (A.new_empty(A.shape) if compute_v else A.new_empty(0))
    # cuSOLVER reads column-major: the row-major lower triangle is its upper one. The copy holds the
    # read triangle only, so that the scale ignores the other; it is overwritten with the
    # eigenvectors, column j (row j here) = vector j.
    work = (A3.triu() if upper else A3.tril()).contiguous()
    amax = torch.linalg.vector_norm(work, ord=math.inf, dim=(-2, -1))     # NaN or inf where not finite
    scale = amax.clamp_min(torch.finfo(A.dtype).tiny)
    work.div_(scale[:, None, None])
    info = torch.empty(nb, dtype=torch.int32, device=A.device)
    handle, _ = lib.handle(A.device)
    params = _params(c, A.device, A.dtype, tolerance(A.dtype, n) if tol is None else tol)
    jobz = VECTOR if compute_v else NOVECTOR
    fill = FILL_LOWER if upper else FILL_UPPER
    run = getattr(c, f"cusolverDn{_PREFIX[A.dtype]}syevjBatched")
    with torch.cuda.device(A.device):
        check(c.cusolverDnSetStream(handle, torch.cuda.current_stream().cuda_stream), "cusolverDnSetStream")
        for start, count in chunks(nb, n):
            a, w = work[start].data_ptr(), L[start].data_ptr()
            lwork = _workspace(c, handle, params, A.device, A.dtype, jobz, fill, n, count, a, w)
            ws = torch.empty(max(lwork, 1), dtype=A.dtype, device=A.device)
            check(run(handle, jobz, fill, n, a, n, w, ws.data_ptr(), lwork, info[start].data_ptr(), params, count),
                   f"cusolverDn{_PREFIX[A.dtype]}syevjBatched")
    ok = (info == 0) & (amax < math.inf)
    L, order = L.sort(dim=-1)
    L = torch.where(ok[:, None], L * scale[:, None], math.nan).reshape(A.shape[:-1])
    if not compute_v:
        return L, A.new_empty(0)
    rows = work.gather(-2, order[:, :, None].expand(nb, n, n))          # row k = vector of L[k]
    # Q = rowsᵀ as a view: the column-major layout torch.linalg.eigh returns.
    Q = torch.where(ok[:, None, None], rows, math.nan).mT.reshape(A.shape)
    return L, Q
