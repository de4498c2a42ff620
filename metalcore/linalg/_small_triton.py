"""Host-side helpers shared by the one-program-per-matrix linalg kernels (``*_triton.py`` beside it).

Every small-matrix kernel holds whole matrices in registers as a ``[G, BN, BN]`` tile: ``G``
matrices per program (``G > 1`` only for tiny ``n``, so that a program still has ~512 elements to
work on), each padded to the power of two ``BN >= n``. Column ``k`` is read out of the tile by a
masked reduction (``sum(where(col == k, A, 0))``): ``O(n²)`` per step, ``O(n³)`` per matrix, the
same order as the factorizations themselves, and no shared-memory bookkeeping in the kernel.

``MAX_N`` (128) is the largest side held in registers: a 128×128 fp32 tile is 64 KB, 32 registers
a thread at 16 warps, and 128×128 fp64 still fits the 255-register budget at 16 warps (128 each).
Larger matrices go to the reference (cuSOLVER) through each op's ``supports`` predicate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metalcore._triton import next_power_of_2

MAX_N = 128
DTYPES = (torch.float32, torch.float64)
# Elements per program for tiny matrices: 32 matrices of 4×4 (n = 3) or 8 of 8×8 share one
# program, so that 10,000 3×3 problems run as ~300 programs instead of 10,000 almost-empty ones.
GROUP_ELEMENTS = 512
INTERPRETER_GROUP_ELEMENTS = 1 << 16


def fits(*tensors: Tensor, max_n: int = MAX_N) -> bool:
    """Every tensor is float32/float64, on one dtype, with both matrix sides at most ``max_n``."""
    dtype = tensors[0].dtype
    return all(t.dtype == dtype and t.dtype in DTYPES and t.dim() >= 2
               and t.shape[-1] <= max_n and t.shape[-2] <= max_n for t in tensors)


def batched(x: Tensor) -> Tensor:
    """``x`` ``(*, m, n)`` as ``(batch, m, n)``: a view whenever the batch dims collapse (broadcast
    inputs with a zero stride stay views), else a copy."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def stack_strides(x: Tensor) -> tuple[list[int], bool]:
    """Strides of ``x`` ``(*, m, n)`` read as a ``(batch, m, n)`` stack, and whether that stack is a
    copy (batch dims that do not collapse into one stride): what a launcher specialized to ``x``'s
    shape and strides needs, so that a call passes ``x`` itself (``batched(x)`` where it copies)."""
    try:
        return list(x.view(-1, x.shape[-2], x.shape[-1]).stride()), False
    except RuntimeError:
        return [x.shape[-2] * x.shape[-1], x.shape[-1], 1], True


def block(n: int, minimum: int = 2) -> int:
    """Padded side of the register tile: a power of two (``tl.arange``), at least ``minimum``."""
    return max(next_power_of_2(max(n, 1)), minimum)


def group(batch: int, elements_per_matrix: int, device: torch.device, budget: int = GROUP_ELEMENTS) -> int:
    """Matrices per program: enough to reach ``budget`` elements (``GROUP_ELEMENTS`` unless a
    kernel's launcher measured another), never more than the batch needs.

    Under the CPU interpreter every program runs one after another and each tile operation is a
    numpy call, so there whole batches share one program (up to ``INTERPRETER_GROUP_ELEMENTS``):
    the same arithmetic, several times faster in CI."""
    if device.type != "cuda":
        budget = INTERPRETER_GROUP_ELEMENTS
    g = max(1, budget // elements_per_matrix)
    return min(next_power_of_2(g), next_power_of_2(max(batch, 1)))


def warps(elements: int) -> int:
    """Warps per program for a tile of ``elements``: ~16 to 32 values a thread. The kernels are
    chains of dependent reductions (latency-bound), so fewer warps mean cheaper reductions; more
    warps only pay once the tile would otherwise spill."""
    if elements <= 512:
        return 1
    if elements <= 1024:
        return 2
    if elements <= 4096:
        return 4
    if elements <= 8192:
        return 8
    return 16
