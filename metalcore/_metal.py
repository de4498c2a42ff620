"""The Metal backend's host path: compile ``shaders/*.metal`` once per process and launch kernels.

On a Mac, a shader file compiles with ``torch.mps.compile_shader`` and its kernels run on MPS
tensors. On CPU tensors (CI, no Apple hardware) the same source compiles with the CPU executor for
Metal (:mod:`metalcore.executor`, which needs clang) — it runs every shader on the CPU, reachable
only by asking for the metal backend explicitly (``METALCORE_BACKEND=metal`` or
``metalcore.use_backend('metal')``).

Kernels are named ``<op>_<dtype>`` (``rms_norm_fwd_half``); :func:`launch` records every name it
launches, so that the tests can prove that each kernel of ``shaders/`` ran.

>>> lib = library("rms_norm", x.device)
>>> launch(lib, "rms_norm_fwd_" + dtype_suffix(x.dtype), x, w, y, ..., threads=rows * tg, group_size=tg)
"""

from __future__ import annotations

import functools
import re
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

_SUFFIX = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}
KERNEL_DTYPES = tuple(_SUFFIX)

_lock = threading.Lock()
_libraries: dict[tuple[str, str], Any] = {}
launched: set[str] = set()
# Tests set this so that outputs start as NaN (or -1 for integers): an element a kernel forgets to
# write shows up instead of passing by luck.
poison_outputs = False


def shader_dir() -> Path:
    """``shaders/``: the package data of an installed wheel (metalcore/shaders), else the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "shaders", here.parent / "shaders"):
        if any(candidate.glob("*.metal")):
            return candidate
    raise FileNotFoundError(f"metalcore's Metal shaders are missing (looked in {here / 'shaders'} and "
                            f"{here.parent / 'shaders'})")


def shader_source(name: str) -> str:
    """``shaders/<name>.metal`` with its ``#include "x.h"`` lines inlined.

    ``torch.mps.compile_shader`` takes one string with no directory to resolve includes against, so
    the shared header is pasted in here (each header once).
    """
    root = shader_dir()
    seen: set[str] = set()

    def expand(path: Path) -> str:
        out = []
        for line in path.read_text().splitlines():
            m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
            if m:
                if m.group(1) not in seen:
                    seen.add(m.group(1))
                    out.append(expand(root / m.group(1)))
                continue
            out.append(line)
        return "\n".join(out)

    return expand(root / f"{name}.metal") + "\n"


def shader_names() -> list[str]:
    return sorted(p.stem for p in shader_dir().glob("*.metal"))


@functools.cache
def constants(shader: str | None = None) -> dict[str, int]:
    """The integer constants (``#define NAME <int>``) that shaders and host code share, read from the
    shaders themselves: those of shaders/common.h, and with ``shader`` also those of
    ``shaders/<shader>.metal`` (block sizes, limits, flag values defined once, in the shader)."""
    text = (shader_dir() / "common.h").read_text() if shader is None else shader_source(shader)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define\s+(\w+)\s+(\d+)\s*$", text, re.M)}


@functools.cache
def executor() -> ModuleType | None:
    """The CPU executor for Metal (:mod:`metalcore.executor`), or None where it cannot run (no clang)."""
    from metalcore import executor as module

    return module if module.available() else None


def executor_available() -> bool:
    return executor() is not None


def executor_missing_reason() -> str:
    """Why Metal shaders cannot run on CPU tensors here (for error messages)."""
    from metalcore.executor import missing_compiler_message

    return missing_compiler_message()


def library(name: str, device: torch.device) -> Any:
    """The compiled ``shaders/<name>.metal`` for ``device`` (MPS: Apple's compiler; CPU: the executor)."""
    key = (name, device.type)
    lib = _libraries.get(key)
    if lib is None:
        with _lock:
            lib = _libraries.get(key)
            if lib is None:
                source = shader_source(name)
                if device.type == "mps":
                    lib = torch.mps.compile_shader(source)
                else:
                    ex = executor()
                    if ex is None:
                        raise RuntimeError(f"cannot run Metal shaders on CPU tensors: {executor_missing_reason()}")
                    lib = ex.compile_shader(source)
                _libraries[key] = lib
    return lib


def has_kernel(lib: Any, kernel: str) -> bool:
    return kernel in dir(lib)


def empty(shape: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel (poisoned when :data:`poison_outputs`)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def dtype_suffix(dtype: torch.dtype) -> str:
    return _SUFFIX[dtype]


def launch(lib: Any, kernel: str, *args: Any, threads: Any, group_size: Any) -> None:
    launched.add(kernel)
    getattr(lib, kernel)(*args, threads=threads, group_size=group_size)


def threads_for_row(n: int) -> int:
    """Threads of a one-row-per-threadgroup kernel: a power of two from one SIMD-group up to the
    1024-thread limit, about ``ELEMS_PER_THREAD`` elements each."""
    c = constants()
    want = -(-n // c["METALCORE_ELEMS_PER_THREAD"])
    tg = c["METALCORE_SIMD_WIDTH"]
    while tg < want and tg < c["METALCORE_MAX_THREADS"]:
        tg *= 2
    return tg
