"""Shapes shared by the suite: odd and boundary sizes, batch shapes, readable ids."""

import torch

SIZES = (1, 2, 3, 16, 31, 33, 64, 65, 127)
SMALL_SIZES = (1, 2, 3, 16, 31, 33)
BATCHES = ((), (0,), (7,), (2, 3))
DTYPES = (torch.float32, torch.float64)


def shape_id(batch: tuple, *dims: int) -> str:
    return "B" + ("x".join(map(str, batch)) or "none") + "-" + "x".join(map(str, dims))


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values laid out transposed in memory (a view with non-unit last stride)."""
    return x.mT.contiguous().mT if x.dim() >= 2 else x.repeat(2)[::2]
