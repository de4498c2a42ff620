"""The CPU executor for Metal shaders: ``torch.mps.compile_shader``'s interface on CPU tensors.

>>> lib = compile_shader('''
... kernel void fill(device float* out, constant float& v, uint i [[thread_position_in_grid]]) {
...     out[i] = v;
... }''')
>>> x = torch.zeros(16)
>>> lib.fill(x, 3.0)                  # threads defaults to the first tensor's numel, as on MPS
>>> lib.fill(x, 1.0, threads=16, group_size=4)

How: the Metal source goes through clang's preprocessor (so macro-instantiated kernels appear), then
through a small translation (``_translate.py``) into C++ that compiles against ``metal_stdlib.h``;
clang builds it into a shared library with the fiber runtime (``metal_runtime.cpp``), cached under
``<cache root>/executor`` (``$METALCORE_CACHE``, else ``$XDG_CACHE_HOME/metalcore``, else
``~/.cache/metalcore``) by the hash of exactly what is compiled and linked (``_build.py``,
``_cache.py``), and ctypes calls it (``_library.py``). Apple's limits are enforced (1024 threads per
threadgroup, 32 KiB of threadgroup memory, 31 buffers), and in bounds-checked mode (the default; set
``METALCORE_EXECUTOR_BOUNDS_CHECK=0`` or pass ``bounds_check=False`` to turn it off) every device,
constant and threadgroup access is checked against its buffer or array.

Shader source is trusted code: it compiles to native code that runs in this process, like a Python
extension. The executor refuses what did not come from the caller: cache files that are not the
user's own or were modified, and ``#include`` of files from the machine.

Semantics follow ``torch.mps.compile_shader``: ``threads`` is the total number of threads per
dimension (``dispatchThreads``: edge threadgroups are partial), ``group_size`` the threadgroup size;
tensors bind as buffers in argument order, Python floats as 4-byte floats, ints as 8-byte ints,
lists of numbers as arrays and lists of tensors as arrays of device pointers.
"""

from __future__ import annotations

import hashlib
import os

from metalcore.executor import _build
from metalcore.executor._build import COMPILER_CANDIDATES, find_compiler, missing_compiler_message
from metalcore.executor._cache import cache_dir
from metalcore.executor._errors import (MetalCacheError, MetalCompileError, MetalKernelError, MetalLimitError,
                                        MetalOutOfBoundsError, MetalTimeoutError, UnsupportedMetalError)
from metalcore.executor._library import Kernel, Library

__all__ = [
    "COMPILER_CANDIDATES", "Kernel", "Library", "MetalCacheError", "MetalCompileError", "MetalKernelError",
    "MetalLimitError", "MetalOutOfBoundsError", "MetalTimeoutError", "UnsupportedMetalError", "available",
    "bounds_check_default", "cache_dir", "compile_shader", "find_compiler", "missing_compiler_message",
]


def available() -> bool:
    """Whether shaders can be built here (a suitable clang and a POSIX platform)."""
    return os.name == "posix" and find_compiler() is not None


def bounds_check_default() -> bool:
    return os.environ.get("METALCORE_EXECUTOR_BOUNDS_CHECK", "1") != "0"


_libraries: dict[tuple[str, bool], Library] = {}


def compile_shader(source: str, *, bounds_check: bool | None = None) -> Library:
    """Compile Metal source for the CPU; cached in-process by the source's hash and on disk by the
    hash of what is compiled."""
    checked = bounds_check_default() if bounds_check is None else bool(bounds_check)
    key = (hashlib.sha256(source.encode()).hexdigest(), checked)
    lib = _libraries.get(key)
    if lib is None:
        built = _build.build(source, checked)
        lib = _libraries[key] = Library(built.path, built.kernels, checked, built.stack_bytes)
    return lib
