"""Batched symmetric eigendecomposition through cuSOLVER's ``cusolverDnXsyevBatched``.

``torch.linalg.eigh`` runs a batch of matrices above n = 32 one ``syevd`` at a time (326 ms for
64×256² on the H100); cuSOLVER also has a batched driver, ``XsyevBatched`` (cuSOLVER 11.7, CUDA
12.6.2), which JAX calls (4.0 ms there). torch does not expose it, so it is called here through
``ctypes`` from the ``libcusolver`` that torch's CUDA build loads (or ships in its wheels), on
torch's current stream, with a device workspace from torch's allocator. No host synchronisation:
a matrix whose ``info`` is non-zero (no convergence) or whose input is not finite gets NaN
eigenvalues and eigenvectors, like the Jacobi kernels.

:func:`available` is ``False`` (and every caller falls back) when no ``libcusolver`` with the
symbol can be loaded, e.g. on CPU-only builds or CUDA older than 12.6.2. The library, the handles and
the batch split are shared with :mod:`metalcore.linalg.cusolver_syevj` (batched Jacobi, n ≤ 32).
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import torch
from torch import Tensor

# cuSOLVER / CUDA enum values (cusolver_common.h, library_types.h, cublas_api.h).
NOVECTOR, VECTOR = 0, 1
FILL_LOWER, FILL_UPPER = 0, 1
_CUDA_TYPE = {torch.float32: 0, torch.float64: 1}       # CUDA_R_32F, CUDA_R_64F
_SUCCESS = 0

_c_void = ctypes.c_void_p
_i64 = ctypes.c_int64
_size = ctypes.c_size_t


def _candidates() -> list[str]:
    """libcusolver paths to try: one already mapped into this process (torch's), then the ones in
    the NVIDIA wheels beside torch, then the system's."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "libcusolver.so" in os.path.basename(path) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    roots = {os.path.dirname(os.path.dirname(torch.__file__))}
    for root in roots:
        paths += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcusolver.so*")), reverse=True)
        paths += sorted(glob.glob(os.path.join(root, "nvidia", "cusolver", "lib", "libcusolver.so*")), reverse=True)
    paths += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libcusolver.so*")), reverse=True)
    paths += ["libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"]
    return list(dict.fromkeys(paths))


def has(lib: ctypes.CDLL, *symbols: str) -> bool:
    """Whether ``lib`` exports every one of ``symbols``."""
    return all(hasattr(lib, name) for name in symbols)


_SYEV = ("cusolverDnXsyevBatched", "cusolverDnXsyevBatched_bufferSize")          # CUDA >= 12.6.2
SYEVJ_SYMBOLS = ("cusolverDnSsyevjBatched", "cusolverDnDsyevjBatched")            # CUDA >= 9.0


class Library:
    """A loaded ``libcusolver``: the functions this module calls, typed, and per-thread handles."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.has_syev = has(lib, *_SYEV)
        lib.cusolverDnCreate.argtypes = [ctypes.POINTER(_c_void)]
        lib.cusolverDnSetStream.argtypes = [_c_void, _c_void]
        lib.cusolverDnCreateParams.argtypes = [ctypes.POINTER(_c_void)]
        functions = [lib.cusolverDnCreate, lib.cusolverDnSetStream, lib.cusolverDnCreateParams]
        if self.has_syev:
            lib.cusolverDnXsyevBatched_bufferSize.argtypes = [
                _c_void, _c_void, ctypes.c_int, ctypes.c_int, _i64, ctypes.c_int, _c_void, _i64,
                ctypes.c_int, _c_void, ctypes.c_int, ctypes.POINTER(_size), ctypes.POINTER(_size), _i64]
            lib.cusolverDnXsyevBatched.argtypes = [
                _c_void, _c_void, ctypes.c_int, ctypes.c_int, _i64, ctypes.c_int, _c_void, _i64,
                ctypes.c_int, _c_void, ctypes.c_int, _c_void, _size, _c_void, _size, _c_void, _i64]
            functions += [lib.cusolverDnXsyevBatched_bufferSize, lib.cusolverDnXsyevBatched]
        for fn in functions:
            fn.restype = ctypes.c_int
        # cuSOLVER handles are not thread-safe: one (handle, params) per thread and device.
        self.local = threading.local()

    def handle(self, device: torch.device) -> tuple[int, int]:
        """This thread's ``(handle, params)`` for ``device``, created on first use."""
        handles = self.local.__dict__.setdefault("handles", {})
        index = device_index(device)
        if index not in handles:
            h, p = _c_void(), _c_void()
            with torch.cuda.device(index):
                check(self.lib.cusolverDnCreate(ctypes.byref(h)), "cusolverDnCreate")
                check(self.lib.cusolverDnCreateParams(ctypes.byref(p)), "cusolverDnCreateParams")
            handles[index] = (h.value, p.value)
        return handles[index]


def device_index(device: torch.device) -> int:
    """CUDA ordinal of ``device`` (the current device for a bare ``"cuda"``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def check(status: int, what: str) -> None:
    """Raise for a cuSOLVER status other than success (a bad argument or a failed launch; a matrix
    that does not converge is reported in ``info`` instead)."""
    if status != _SUCCESS:
        raise RuntimeError(f"metalcore: {what} returned cuSOLVER status {status}")


# Matrices per library call. torch.linalg.eigh (syevjBatched) and XsyevBatched both failed with
# CUSOLVER_STATUS_INTERNAL_ERROR at 65536 matrices of side 2..33 on the H100 and worked at 4096
# (bench/results/selection-eigh-svd-paths-h100-20261206.log; 65535 is CUDA's grid y/z limit, the
# likely cause). Batches are split into calls of at most 32768, half the failing size and the op
# core's chunk for torch's eigh; a call of 32768 small matrices fills the card many times over, so
# the extra call costs ~10 µs of host time against milliseconds of work. XsyevBatched also requires
# n·lda·batch <= INT32_MAX (its documented limit), which binds from n = 182.
MAX_BATCH = 32768


# Device workspace one XsyevBatched call may ask for. For 32768 fp64 matrices of side 33 it asked for
# 23 GiB (~700 KB a matrix), which failed with CUDA out of memory inside the whole-grid selection
# check (bench/selection.md v6); a call is then split until its workspace fits this cap (4 GiB:
# ~5000 such matrices a call, still many waves of the card).
MAX_WORKSPACE_BYTES = 4 << 30


def chunks(batch: int, n: int, size: int | None = None) -> list[tuple[int, int]]:
    """``(start, count)`` of each library call for ``batch`` matrices of side ``n`` (at most ``size``
    a call when given)."""
    size = max(1, min(MAX_BATCH, (2 ** 31 - 1) // max(n * n, 1), size or MAX_BATCH))
    return [(start, min(size, batch - start)) for start in range(0, batch, size)]


_library: Library | None = None
_searched = False


def _load() -> Library | None:
    """The first ``libcusolver`` with ``XsyevBatched``, else the first with the batched Jacobi
    (``syevjBatched``), else None."""
    global _library, _searched
    if not _searched:
        _searched = True
        chosen = jacobi_only = None
        for path in _candidates():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            if has(lib, *_SYEV):
                chosen = lib
                break
            if jacobi_only is None and has(lib, *SYEVJ_SYMBOLS):
                jacobi_only = lib
        chosen = chosen or jacobi_only
        _library = Library(chosen) if chosen is not None else None
    return _library


def library() -> Library | None:
    """The loaded ``libcusolver`` (None where none loads); shared by the cuSOLVER paths."""
    return _load()


def available() -> bool:
    """Whether CUDA is usable and a ``libcusolver`` with ``XsyevBatched`` could be loaded."""
    lib = _load() if torch.cuda.is_available() else None
    return lib is not None and lib.has_syev


def syev_batched(A: Tensor, upper: bool, compute_v: bool) -> tuple[Tensor, Tensor]:
    """``(L, Q)`` of the symmetric CUDA matrices ``A`` ``(*, n, n)`` (float32/float64), read from
    the ``upper`` or lower triangle; ``Q`` is empty without ``compute_v``. Requires
    :func:`available`."""
    lib = _load()
    if lib is None or not lib.has_syev:
        raise RuntimeError("metalcore: cusolverDnXsyevBatched is not available (libcusolver from CUDA >= 12.6.2)")
    n = A.shape[-1]
    A3 = A.reshape(-1, n, n)
    nb = A3.shape[0]
    L = torch.empty(nb, n, dtype=A.dtype, device=A.device)
    if nb == 0 or n == 0:
        Q = A.new_empty(A.shape) if compute_v else A.new_empty(0)
        return L.reshape(A.shape[:-1]), Q
    # cuSOLVER reads column-major: the row-major lower triangle is its upper one. The work copy is
    # overwritten with the eigenvectors, column j (row j here) = vector j.
    work = A3.contiguous().clone()
    info = torch.empty(nb, dtype=torch.int32, device=A.device)
    handle, params = lib.handle(A.device)
    dtype = _CUDA_TYPE[A.dtype]
    jobz = VECTOR if compute_v else NOVECTOR
    fill = FILL_LOWER if upper else FILL_UPPER
    with torch.cuda.device(A.device):
        check(lib.lib.cusolverDnSetStream(handle, torch.cuda.current_stream().cuda_stream), "cusolverDnSetStream")
        sizes: dict[int, tuple[ctypes.c_size_t, ctypes.c_size_t]] = {}

        def workspace(count: int) -> tuple[ctypes.c_size_t, ctypes.c_size_t]:
            if count not in sizes:
                dev_bytes, host_bytes = _size(), _size()
                check(lib.lib.cusolverDnXsyevBatched_bufferSize(
                    handle, params, jobz, fill, n, dtype, work.data_ptr(), n, dtype, L.data_ptr(), dtype,
                    ctypes.byref(dev_bytes), ctypes.byref(host_bytes), count), "cusolverDnXsyevBatched_bufferSize")
                sizes[count] = dev_bytes, host_bytes
            return sizes[count]

        size = chunks(nb, n)[0][1]
        if workspace(size)[0].value > MAX_WORKSPACE_BYTES:
            size = max(1, size * MAX_WORKSPACE_BYTES // workspace(size)[0].value)
        for start, count in chunks(nb, n, size):
            dev_bytes, host_bytes = workspace(count)
            device_ws = torch.empty(max(dev_bytes.value, 1), dtype=torch.uint8, device=A.device)
            host_ws = ctypes.create_string_buffer(max(host_bytes.value, 1))
            check(lib.lib.cusolverDnXsyevBatched(
                handle, params, jobz, fill, n, dtype, work[start].data_ptr(), n, dtype, L[start].data_ptr(), dtype,
                device_ws.data_ptr(), dev_bytes.value, ctypes.addressof(host_ws), host_bytes.value,
                info[start].data_ptr(), count), "cusolverDnXsyevBatched")
    bad = (info != 0) | ~torch.isfinite(A3).all(dim=(-2, -1))
    L = torch.where(bad[:, None], float("nan"), L).reshape(A.shape[:-1])
    if not compute_v:
        return L, A.new_empty(0)
    Q = torch.where(bad[:, None, None], float("nan"), work.mT).reshape(A.shape)
    return L, Q
