"""Input checks shared by every public function, so that errors read the same everywhere.

Conventions (DESIGN.md §4): a wrong type or dtype raises ``TypeError``; a wrong rank, shape or
option value raises ``ValueError``; tensors on different devices raise ``RuntimeError`` (as torch
does). Every message names the function and the argument, and says what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# torch.linalg's own dtypes, less complex (no backend here implements complex arithmetic).
LINALG_DTYPES = (torch.float32, torch.float64)
# Training ops compute in fp32 internally and accept the storage types models use.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(fn: str, name: str, x: object, *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 min_dim: int = 0) -> torch.Tensor:
    """``x`` is a tensor of one of ``dtypes`` with at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} must have dtype {_dtype_names(dtypes)}; got {str(x.dtype).removeprefix('torch.')}")
    if x.dim() < min_dim:
        raise ValueError(f"{fn}: {name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_matrix(fn: str, name: str, A: object, *, square: bool = False,
                 dtypes: Sequence[torch.dtype] = LINALG_DTYPES) -> torch.Tensor:
    """``A`` is a (batch of) matrices of shape ``(*, m, n)``, square when asked."""
    A = check_tensor(fn, name, A, dtypes=dtypes)
    if A.dim() < 2:
        raise ValueError(f"{fn}: {name} must be a matrix or a batch of matrices of shape (*, m, n); "
                         f"got shape {tuple(A.shape)}")
    if square and A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{fn}: {name} must be a square matrix or a batch of square matrices; "
                         f"got shape {tuple(A.shape)}")
    return A


def check_same_device(fn: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise RuntimeError(f"{fn}: expected all tensors on the same device; got {listed}")


def check_same_dtype(fn: str, **tensors: torch.Tensor | None) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n} is {str(d).removeprefix('torch.')}" for n, d in dtypes.items())
        raise TypeError(f"{fn}: expected all tensors to have the same dtype; got {listed}")


def broadcast_batch_shape(fn: str, A: torch.Tensor, B: torch.Tensor, a_name: str = "A",
                          b_name: str = "B") -> torch.Size:
    """The broadcast of two matrix stacks' leading (batch) dimensions, as ``torch.linalg`` forms it."""
    batch = A.shape[:-2]
    if batch == B.shape[:-2]:
        # The common case, without torch.broadcast_shapes (~6 µs of Python a call).
        return batch
    try:
        return torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    except RuntimeError:
        raise ValueError(f"{fn}: the batch dimensions of {a_name} {tuple(A.shape[:-2])} and "
                         f"{b_name} {tuple(B.shape[:-2])} cannot be broadcast together") from None


def broadcast_batch(fn: str, A: torch.Tensor, B: torch.Tensor, a_name: str = "A",
                    b_name: str = "B") -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast the leading (batch) dimensions of two matrix stacks, as ``torch.linalg`` does."""
    if A.shape[:-2] == B.shape[:-2]:
        return A, B
    batch = broadcast_batch_shape(fn, A, B, a_name, b_name)
    return A.expand(*batch, *A.shape[-2:]), B.expand(*batch, *B.shape[-2:])


def check_choice(fn: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
