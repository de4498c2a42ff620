"""Helpers shared by the linalg ops: torch-style ``out=`` handling and ``info`` → LinAlgError."""

from __future__ import annotations

from collections.abc import Callable

import torch


def write_out(fn: str, result, out):
    """Copy ``result`` (a tensor or a tuple of tensors) into ``out`` the way torch's ``out=`` does."""
    if out is None:
        return result
    if isinstance(result, torch.Tensor):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{fn}: out must be a Tensor")
        out.resize_(result.shape).copy_(result)
        return out
    if not isinstance(out, (tuple, list)) or len(out) != len(result):
        raise TypeError(f"{fn}: out must be a tuple of {len(result)} tensors")
    for o, r in zip(out, result):
        o.resize_(r.shape).copy_(r)
    # torch.return_types.* are structseqs built from one sequence.
    return tuple(out) if type(result) is tuple else type(result)(tuple(out))


def raise_for_info(fn: str, info: torch.Tensor, describe: Callable[[int], str]) -> None:
    """Raise ``torch.linalg.LinAlgError`` for the first failed batch element, as torch does.

    ``info`` holds LAPACK's code per matrix (0 = success). This synchronises with the device: it is
    the documented cost of the checking variants; the ``_ex`` variants return ``info`` instead.
    """
    if info.numel() == 0:
        return
    # One device-to-host copy, then the search on the CPU, as torch's own check does: nonzero on the
    # GPU costs two kernels and a synchronisation for the count, several times the copy's latency.
    info = info.cpu()
    failed = torch.nonzero(info.reshape(-1))
    if failed.numel() == 0:
        return
    flat = int(failed[0, 0])
    code = int(info.reshape(-1)[flat])
    where = ""
    if info.dim() > 0:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), info.shape))
        where = f" (batch element {index[0] if len(index) == 1 else index})"
    raise torch.linalg.LinAlgError(f"{fn}{where}: {describe(code)}")
