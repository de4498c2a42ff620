"""Host-side helpers shared by the small-matrix linalg shaders (``shaders/linalg.metal``), as
``_small_triton.py`` is for the Triton kernels.

Every kernel there runs one threadgroup per matrix with the whole matrix in threadgroup memory:
float32 only (Apple GPUs have no float64) and both sides at most ``METALCORE_LINALG_MAX_N`` (64: a
16 KiB tile of Apple's 32 KiB; see shaders/common.h). Other inputs go to the reference through
each op's ``supports``.
"""

import torch
from torch import Tensor

from metalcore import _metal

SHADER = "linalg"


def max_n() -> int:
    return _metal.constants()["METALCORE_LINALG_MAX_N"]


def fits(A: Tensor) -> bool:
    """``A`` is a float32 matrix (or batch of them) with both sides at most ``max_n()``."""
    return A.dtype == torch.float32 and A.dim() >= 2 and A.shape[-1] <= max_n() and A.shape[-2] <= max_n()


def threads_for(elements: int) -> int:
    """Threadgroup size of a factorization: whole 32-wide SIMD-groups, about one per ``elements``
    parallel updates, at most ``METALCORE_LINALG_THREADS``."""
    c = _metal.constants()
    width = c["METALCORE_SIMD_WIDTH"]
    return min(c["METALCORE_LINALG_THREADS"], max(width, -(-elements // width) * width))


def rhs_threads(k: int) -> int:
    """Threadgroup size for ``k`` right-hand sides: one SIMD-group per column, up to
    ``METALCORE_LINALG_THREADS`` (8 SIMD-groups, which then take several columns each)."""
    c = _metal.constants()
    return min(c["METALCORE_LINALG_THREADS"], c["METALCORE_SIMD_WIDTH"] * max(k, 1))


def kernel(name: str, A: Tensor) -> tuple[object, str]:
    """The compiled shader library for ``A``'s device and the kernel ``<name>_<dtype>``."""
    return _metal.library(SHADER, A.device), f"{name}_{_metal.dtype_suffix(A.dtype)}"
