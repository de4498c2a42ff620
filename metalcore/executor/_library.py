"""A compiled shader library and its kernels, called like ``torch.mps.compile_shader``'s.

A launch binds its arguments into the runtime's ``LaunchArgs`` (``metal_rt_abi.h``), starts on the
runtime's threads, and is waited for in slices of 100 ms, so that Ctrl-C and the time limit
(``METALCORE_EXECUTOR_TIMEOUT`` seconds, default 300) can cancel it: every loop of the shader polls
for cancellation, and the launch raises ``KeyboardInterrupt`` or :class:`MetalTimeoutError`.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from metalcore.executor._errors import (MetalKernelError, MetalLimitError, MetalOutOfBoundsError,
                                        MetalTimeoutError)
from metalcore.executor._translate import MAX_BUFFERS, KernelInfo

_SIMD_WIDTH = 32
_WAIT_SLICE_MS = 100
# After a cancel, the shader's next loop iteration stops it; a launch still running this long after
# is stuck somewhere the executor cannot poll (its threads and buffers are then kept alive).
_STOP_GRACE_S = 10.0
_INTERRUPTED, _TIMED_OUT = 1, 2


class _Region(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("size", ctypes.c_uint64), ("buffer", ctypes.c_int32),
                ("element", ctypes.c_int32), ("name", ctypes.c_char_p)]


class _Buffer(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_uint64), ("region", ctypes.c_void_p)]


class _LaunchArgs(ctypes.Structure):
    _fields_ = [("bufs", _Buffer * MAX_BUFFERS), ("nbufs", ctypes.c_uint32), ("nlookup", ctypes.c_uint32),
                ("lookup", ctypes.POINTER(_Region)), ("kernel", ctypes.c_char_p)]


_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "int32": torch.int32, "int16": torch.int16,
          "int8": torch.int8, "uint8": torch.uint8}


def _workers() -> int:
    env = os.environ.get("METALCORE_EXECUTOR_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, 8))


def _span_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def timeout_s() -> float:
    """Seconds one launch may run (``METALCORE_EXECUTOR_TIMEOUT``, default 300; 0 for no limit)."""
    return float(os.environ.get("METALCORE_EXECUTOR_TIMEOUT", "300"))


def _merged(regions: list[tuple[int, int, int, int, bytes]]) -> list[tuple[int, int, int, int, bytes]]:
    """The regions with overlapping ones merged (two views of one tensor), for raw-address lookups."""
    out: list[list] = []
    for base, size, buf, elem, name in sorted(r for r in regions if r[1] > 0):
        if out and base < out[-1][0] + out[-1][1]:
            last = out[-1]
            last[1] = max(last[1], base + size - last[0])
            if name not in last[4].split(b"' and '"):
                last[4] += b"' and '" + name
            last[3] = -1
        else:
            out.append([base, size, buf, elem, name])
    return [tuple(r) for r in out]


# Launches that did not stop after a cancel: their threads may still touch these buffers.
_abandoned: list[Any] = []


def _dims(value: Any, what: str) -> tuple[int, ...]:
    dims = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints; got {value!r}")
    if any(d < 0 for d in dims):
        raise ValueError(f"{what} must be non-negative; got {value!r}")
    return dims


class Kernel:
    """One kernel of a compiled library; call it like torch.mps's kernels."""

    def __init__(self, lib: Library, info: KernelInfo):
        self._lib = lib
        self.info = info
        self._entry = ctypes.cast(getattr(lib._dll, f"__mtl_entry_{info.name}"), ctypes.c_void_p)
        self._names = {p.buffer: p.name.encode() for p in info.params if p.buffer is not None}

    @property
    def max_threads_per_threadgroup(self) -> int:
        return self.info.max_threads

    @property
    def thread_execution_width(self) -> int:
        return _SIMD_WIDTH

    def __repr__(self) -> str:
        return f"<executor kernel {self.info.name}>"

    def __call__(self, *args: Any, threads: Any = None, group_size: Any = None, arg_casts: Any = None) -> None:
        name = self.info.name
        if len(args) > MAX_BUFFERS:
            raise MetalLimitError(f"kernel '{name}' got {len(args)} arguments; Apple GPUs allow at most "
                                  f"{MAX_BUFFERS} buffers per kernel")
        keep: list[Any] = []
        regions: list[tuple[int, int, int, int]] = []  # base, size, buffer, element
        bufs: list[tuple[int, int, int]] = []          # ptr, size, region index
        for idx, a in enumerate(args):
            cast = (arg_casts.get(idx) if isinstance(arg_casts, dict) else arg_casts) if arg_casts else None
            if isinstance(a, torch.Tensor):
                if a.device.type != "cpu":
                    raise TypeError(f"kernel '{name}' argument {idx}: the CPU executor runs on CPU tensors; "
                                    f"got a tensor on {a.device}")
                if threads is None:
                    threads = a.numel()
                regions.append((a.data_ptr(), _span_bytes(a), idx, -1))
                bufs.append((a.data_ptr(), _span_bytes(a), len(regions) - 1))
                continue
            if isinstance(a, (list, tuple)):
                if len(a) == 0:
                    raise ValueError(f"kernel '{name}' argument {idx}: empty list/tuple")
                if all(isinstance(t, torch.Tensor) for t in a):
                    ptrs = torch.tensor([t.data_ptr() for t in a], dtype=torch.int64)
                    for k, t in enumerate(a):
                        if t.device.type != "cpu":
                            raise TypeError(f"kernel '{name}' argument {idx}: tensors must be on the CPU")
                        regions.append((t.data_ptr(), _span_bytes(t), idx, k))
                    data = ptrs
                elif isinstance(a[0], bool) or isinstance(a[0], int):
                    data = torch.tensor(list(a), dtype=_CASTS[cast] if cast else torch.int64)
                elif isinstance(a[0], float):
                    data = torch.tensor(list(a), dtype=_CASTS[cast] if cast else torch.float32)
                else:
                    raise TypeError(f"kernel '{name}' argument {idx}: unsupported list element {type(a[0])}")
            elif isinstance(a, (bool, int)):
                data = torch.tensor([int(a)], dtype=_CASTS[cast] if cast else torch.int64)
            elif isinstance(a, float):
                data = torch.tensor([a], dtype=_CASTS[cast] if cast else torch.float32)
            else:
                raise TypeError(f"kernel '{name}' argument {idx}: unsupported argument type {type(a).__name__}")
            keep.append(data)
            regions.append((data.data_ptr(), data.numel() * data.element_size(), idx, -1))
            bufs.append((data.data_ptr(), data.numel() * data.element_size(), len(regions) - 1))

        for p in self.info.params:
            if p.buffer is not None and p.buffer >= len(args):
                raise TypeError(f"kernel '{name}' reads buffer {p.buffer} ('{p.name}') but was given "
                                f"{len(args)} arguments")
        if threads is None:
            raise ValueError(f"kernel '{name}': threads is undefined (no tensor argument to take it from)")
        tdims = _dims(threads, "threads")
        if group_size is None:
            gdims = (min(tdims[0], self.info.max_threads),) if len(tdims) == 1 else (
                (self.info.max_threads,) + (1,) * (len(tdims) - 1))
        else:
            gdims = _dims(group_size, "group_size")
            if len(gdims) != len(tdims):
                raise ValueError(f"kernel '{name}': threads {tdims} and group_size {gdims} must have the same "
                                 "number of dimensions")
        if math.prod(gdims) > self.info.max_threads:
            raise MetalLimitError(f"kernel '{name}': threadgroup size {gdims} has {math.prod(gdims)} threads; "
                                  f"Apple GPUs allow at most {self.info.max_threads} per threadgroup")
        if math.prod(tdims) == 0:
            return
        if 0 in gdims:
            raise ValueError(f"kernel '{name}': group_size must be positive; got {gdims}")
        t3 = (ctypes.c_uint32 * 3)(*(tdims + (1,) * (3 - len(tdims))))
        g3 = (ctypes.c_uint32 * 3)(*(gdims + (1,) * (3 - len(gdims))))

        named = [(base, size, b, e, self._names.get(b, b"?")) for base, size, b, e in regions]
        region_arr = (_Region * max(1, len(named)))(*(_Region(*r) for r in named))
        lookup = _merged(named)
        lookup_arr = (_Region * max(1, len(lookup)))(*(_Region(*r) for r in lookup))
        la = _LaunchArgs()
        la.nbufs = len(bufs)
        la.nlookup = len(lookup)
        la.lookup = lookup_arr
        la.kernel = name.encode()
        base_addr = ctypes.addressof(region_arr)
        for i, (ptr, size, r) in enumerate(bufs):
            la.bufs[i] = _Buffer(ptr, size, base_addr + r * ctypes.sizeof(_Region))
        self._run(la, t3, g3, keep=(args, keep, named, lookup, region_arr, lookup_arr, la))

    def _run(self, la: _LaunchArgs, t3: Any, g3: Any, keep: Any) -> None:
        """Start the launch, wait for it in slices, cancel it on Ctrl-C or past its time limit."""
        name, lib = self.info.name, self._lib
        handle = lib._start(self._entry, ctypes.byref(la), t3, g3, _workers(), lib.stack_bytes)
        limit = timeout_s()
        deadline = time.monotonic() + limit if limit > 0 else math.inf
        cancelled = 0
        while True:
            try:
                if lib._wait(handle, _WAIT_SLICE_MS):
                    break
                if not cancelled and time.monotonic() > deadline:
                    cancelled = _TIMED_OUT
                    lib._cancel(handle, cancelled)
                    deadline = time.monotonic() + _STOP_GRACE_S
                elif cancelled and time.monotonic() > deadline:
                    _abandoned.append((handle, keep))
                    raise MetalKernelError(f"kernel '{name}' did not stop within {_STOP_GRACE_S:g} s of being "
                                           f"cancelled (it is stuck where the executor cannot poll); its threads "
                                           f"keep running: restart the process")
            except KeyboardInterrupt:
                if not cancelled:
                    cancelled = _INTERRUPTED
                    lib._cancel(handle, cancelled)
                    deadline = time.monotonic() + _STOP_GRACE_S
        err = ctypes.create_string_buffer(2048)
        failed = lib._finish(handle, err, len(err))
        if cancelled == _INTERRUPTED:
            raise KeyboardInterrupt(f"kernel '{name}' interrupted")
        if failed:
            category, _, text = err.value.decode(errors="replace").partition(" ")
            if category == "[timeout]":
                raise MetalTimeoutError(f"kernel '{name}' ran longer than {limit:g} s and was stopped (set "
                                        f"METALCORE_EXECUTOR_TIMEOUT to allow more, 0 for no limit); {text}")
            exc = {"[oob]": MetalOutOfBoundsError, "[limit]": MetalLimitError}.get(category, MetalKernelError)
            raise exc(text)


class Library:
    """A compiled shader source: its kernels are attributes (``lib.rms_norm_fwd_float(...)``)."""

    def __init__(self, path: Path, kernels: list[KernelInfo], checked: bool, stack_bytes: int):
        self._dll = ctypes.CDLL(str(path))
        self._start = self._dll.mtl_launch_start
        self._start.restype = ctypes.c_void_p
        self._start.argtypes = [ctypes.c_void_p, ctypes.POINTER(_LaunchArgs), ctypes.POINTER(ctypes.c_uint32),
                                ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.c_uint64]
        self._wait = self._dll.mtl_launch_wait
        self._wait.restype = ctypes.c_int
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        self._cancel = self._dll.mtl_launch_cancel
        self._cancel.restype = None
        self._cancel.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._finish = self._dll.mtl_launch_finish
        self._finish.restype = ctypes.c_int
        self._finish.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64]
        self.bounds_checked = checked
        self.stack_bytes = stack_bytes
        self._kernels = {k.name: Kernel(self, k) for k in kernels}

    def __getattr__(self, name: str) -> Kernel:
        kernels = self.__dict__.get("_kernels", {})
        if name in kernels:
            return kernels[name]
        raise AttributeError(f"shader library has no kernel '{name}' (it has: {', '.join(sorted(kernels))})")

    def __dir__(self) -> list[str]:
        return sorted(self._kernels)

