"""Helpers shared by the linalg ops: torch-style ``out=`` handling and ``info`` → LinAlgError."""

from __future__ import annotations

from collections.abc import Callable

import torch


def write_out(fn: str, result, out, *, cast: bool = False):
    """Copy ``result`` (a tensor or a tuple of tensors) into ``out`` the way torch's ``out=`` does.

    ``out`` must have the result's dtype, as torch's native linalg functions require; with ``cast``
    (torch's composite ones: ``pinv``, ``householder_product``, ``cholesky_solve``) any dtype the
    result can be safely cast to. Otherwise RuntimeError, torch's type.
    """
    if out is None:
        return result
    if isinstance(result, torch.Tensor):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{fn}: out must be a Tensor")
        _check_out_dtype(fn, "out", result, out, cast)
        out.resize_(result.shape).copy_(result)
        return out
    if not isinstance(out, (tuple, list)) or len(out) != len(result):
        raise TypeError(f"{fn}: out must be a tuple of {len(result)} tensors")
    for i, (o, r) in enumerate(zip(out, result)):
        _check_out_dtype(fn, f"out[{i}]", r, o, cast)
    for o, r in zip(out, result):
        o.resize_(r.shape).copy_(r)
    # torch.return_types.* are structseqs built from one sequence.
    return tuple(out) if type(result) is tuple else type(result)(tuple(out))


def _check_out_dtype(fn: str, name: str, result: torch.Tensor, out: torch.Tensor, cast: bool) -> None:
    if out.dtype == result.dtype or (cast and torch.can_cast(result.dtype, out.dtype)):
        return
    rule = "a dtype the result can be safely cast to" if cast else "the result's dtype"
    raise RuntimeError(f"{fn}: {name} must have {rule}, {str(result.dtype).removeprefix('torch.')}; "
                       f"got {str(out.dtype).removeprefix('torch.')}")


def raise_for_info(fn: str, info: torch.Tensor, describe: Callable[[int], str]) -> None:
    """Raise ``torch.linalg.LinAlgError`` for the first failed batch element, as torch does.

    ``info`` holds LAPACK's code per matrix (0 = success). This synchronises with the device: it is
    the documented cost of the checking variants; the ``_ex`` variants return ``info`` instead.
    """
    if info.numel() == 0:
        return
    # One matrix: ``item()`` copies and synchronises in one call and gives a Python int (0.26 µs of
    # host work on the development CPU, against 3.4 for the copy to a CPU tensor and its search).
    if info.numel() == 1 and info.item() == 0:
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
