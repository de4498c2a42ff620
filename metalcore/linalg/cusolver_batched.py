"""Batched symmetric eigendecomposition through cuSOLVER's ``cusolverDnXsyevBatched``.

``torch.linalg.eigh`` runs a batch of matrices above n = 32 one ``syevd`` at a time (326 ms for
64×256² on the H100); cuSOLVER also has a batched driver, ``XsyevBatched`` (cuSOLVER 11.7, CUDA
12.6.2), which JAX calls (4.0 ms there). torch does not expose it, so it is called here through
``ctypes`` from the ``libcusolver`` that torch's CUDA build loads (or ships in its wheels), on
torch's current stream, with a device workspace from torch's allocator. No host synchronisation:
a matrix whose ``info`` is non-zero (no convergence) or whose input is not finite gets NaN
eigenvalues and eigenvectors, like the Jacobi kernels.

:func:`available` is ``False`` (and every caller falls back) when no ``libcusolver`` with the
symbol can be loaded, e.g. on CPU-only builds or CUDA older than 12.6.2.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import torch
from torch import Tensor

# cuSOLVER / CUDA enum values (cusolver_common.h, library_types.h, cublas_api.h).
_NOVECTOR, _VECTOR = 0, 1
_FILL_LOWER, _FILL_UPPER = 0, 1
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


class _Library:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.cusolverDnCreate.argtypes = [ctypes.POINTER(_c_void)]
        lib.cusolverDnSetStream.argtypes = [_c_void, _c_void]
        lib.cusolverDnCreateParams.argtypes = [ctypes.POINTER(_c_void)]
        lib.cusolverDnXsyevBatched_bufferSize.argtypes = [
            _c_void, _c_void, ctypes.c_int, ctypes.c_int, _i64, ctypes.c_int, _c_void, _i64,
            ctypes.c_int, _c_void, ctypes.c_int, ctypes.POINTER(_size), ctypes.POINTER(_size), _i64]
        lib.cusolverDnXsyevBatched.argtypes = [
            _c_void, _c_void, ctypes.c_int, ctypes.c_int, _i64, ctypes.c_int, _c_void, _i64,
            ctypes.c_int, _c_void, ctypes.c_int, _c_void, _size, _c_void, _size, _c_void, _i64]
        for fn in (lib.cusolverDnCreate, lib.cusolverDnSetStream, lib.cusolverDnCreateParams,
                   lib.cusolverDnXsyevBatched_bufferSize, lib.cusolverDnXsyevBatched):
            fn.restype = ctypes.c_int
        # cuSOLVER handles are not thread-safe: one (handle, params) per thread and device.
        self.local = threading.local()

    def handle(self, device: torch.device) -> tuple[int, int]:
        handles = self.local.__dict__.setdefault("handles", {})
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in handles:
            h, p = _c_void(), _c_void()
            with torch.cuda.device(index):
                _check(self.lib.cusolverDnCreate(ctypes.byref(h)), "cusolverDnCreate")
                _check(self.lib.cusolverDnCreateParams(ctypes.byref(p)), "cusolverDnCreateParams")
            handles[index] = (h.value, p.value)
        return handles[index]


def _check(status: int, what: str) -> None:
    if status != _SUCCESS:
        raise RuntimeError(f"metalcore: {what} returned cuSOLVER status {status}")


_library: _Library | None = None
_searched = False


def _load() -> _Library | None:
    global _library, _searched
    if not _searched:
        _searched = True
        for path in _candidates():
            try:
                lib = ctypes.CDLL(path)
                lib.cusolverDnXsyevBatched       # AttributeError where the symbol is missing
                lib.cusolverDnXsyevBatched_bufferSize
            except (OSError, AttributeError):
                continue
            _library = _Library(lib)
            break
    return _library


def available() -> bool:
    """Whether CUDA is usable and a ``libcusolver`` with ``XsyevBatched`` could be loaded."""
    return torch.cuda.is_available() and _load() is not None


def syev_batched(A: Tensor, upper: bool, compute_v: bool) -> tuple[Tensor, Tensor]:
    """``(L, Q)`` of the symmetric CUDA matrices ``A`` ``(*, n, n)`` (float32/float64), read from
    the ``upper`` or lower triangle; ``Q`` is empty without ``compute_v``. Requires
    :func:`available`."""
    lib = _load()
    if lib is None:
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
    jobz = _VECTOR if compute_v else _NOVECTOR
    fill = _FILL_LOWER if upper else _FILL_UPPER
    with torch.cuda.device(A.device):
        _check(lib.lib.cusolverDnSetStream(handle, torch.cuda.current_stream().cuda_stream), "cusolverDnSetStream")
        dev_bytes, host_bytes = _size(), _size()
        _check(lib.lib.cusolverDnXsyevBatched_bufferSize(
            handle, params, jobz, fill, n, dtype, work.data_ptr(), n, dtype, L.data_ptr(), dtype,
            ctypes.byref(dev_bytes), ctypes.byref(host_bytes), nb), "cusolverDnXsyevBatched_bufferSize")
        device_ws = torch.empty(max(dev_bytes.value, 1), dtype=torch.uint8, device=A.device)
        host_ws = ctypes.create_string_buffer(max(host_bytes.value, 1))
        _check(lib.lib.cusolverDnXsyevBatched(
            handle, params, jobz, fill, n, dtype, work.data_ptr(), n, dtype, L.data_ptr(), dtype,
            device_ws.data_ptr(), dev_bytes.value, ctypes.addressof(host_ws), host_bytes.value,
            info.data_ptr(), nb), "cusolverDnXsyevBatched")
    bad = (info != 0) | ~torch.isfinite(A3).all(dim=(-2, -1))
    L = torch.where(bad[:, None], float("nan"), L).reshape(A.shape[:-1])
    if not compute_v:
        return L, A.new_empty(0)
    Q = torch.where(bad[:, None, None], float("nan"), work.mT).reshape(A.shape)
    return L, Q
