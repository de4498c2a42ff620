"""RMSNorm on Metal: the host side of ``shaders/rms_norm.metal`` (the math is in rms_norm.py).

Kernels ``rms_norm_fwd_<dtype>``, ``fused_add_rms_norm_fwd_<dtype>``, ``rms_norm_bwd_dx_<dtype>``
(one threadgroup per row) and ``rms_norm_bwd_dw_<dtype>`` (a 2-D grid over columns and chunks of
rows) for float, half and bfloat rows; the weight is passed as float32. float64 stays on the
reference, as does an empty row (its statistics are NaN by definition).
"""

from typing import Optional

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.nn.rms_norm import fused_add_rms_norm_fwd, rms_norm_bwd, rms_norm_fwd

_SHADER = "rms_norm"


def _supported(x: Tensor, *others: Optional[Tensor]) -> bool:
    if x.dtype not in _metal.KERNEL_DTYPES or x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] >= 2**31:
        return False
    if any(t is not None and t.dtype != x.dtype for t in others):
        return False
    if x.dtype == torch.bfloat16:  # bfloat kernels need Metal 3.1 (macOS 14)
        return _metal.has_kernel(_metal.library(_SHADER, x.device), "rms_norm_fwd_bfloat")
    return True


def _weight(weight: Optional[Tensor], x: Tensor) -> Tensor:
    if weight is None:
        return x.new_zeros(1, dtype=torch.float32)  # never read: has_weight = 0
    return weight.to(torch.float32).contiguous()


def _rows(x: Tensor) -> tuple[Tensor, int, int]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    return x2, x2.shape[0], n


@rms_norm_fwd.implement("metal", supports=lambda x, weight, eps, offset: _supported(x))
def _rms_norm_fwd_metal(x: Tensor, weight: Optional[Tensor], eps: float, offset: float) -> tuple[Tensor, Tensor]:
    x2, rows, n = _rows(x)
    y = _metal.empty(x2.shape, dtype=x.dtype, device=x.device)
    rstd = _metal.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        tg = _metal.threads_for_row(n)
        lib = _metal.library(_SHADER, x.device)
        _metal.launch(lib, f"rms_norm_fwd_{_metal.dtype_suffix(x.dtype)}", x2, _weight(weight, x), y, rstd, n,
                      float(eps), float(offset), int(weight is not None), threads=rows * tg, group_size=tg)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@fused_add_rms_norm_fwd.implement("metal", supports=lambda x, residual, weight, eps, offset: _supported(x, residual))
def _fused_add_rms_norm_fwd_metal(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float,
                                  offset: float) -> tuple[Tensor, Tensor, Tensor]:
    x2, rows, n = _rows(x)
    r2 = residual.reshape(-1, n).contiguous()
    y = _metal.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = _metal.empty(x2.shape, dtype=x.dtype, device=x.device)
    rstd = _metal.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        tg = _metal.threads_for_row(n)
        lib = _metal.library(_SHADER, x.device)
        _metal.launch(lib, f"fused_add_rms_norm_fwd_{_metal.dtype_suffix(x.dtype)}", x2, r2, _weight(weight, x), y, h,
                      rstd, n, float(eps), float(offset), int(weight is not None), threads=rows * tg, group_size=tg)
    return y.view(x.shape), h.view(x.shape), rstd.view(x.shape[:-1])


@rms_norm_bwd.implement("metal", supports=lambda dy, x, weight, rstd, offset: _supported(x, dy)
                        and rstd.dtype == torch.float32)
def _rms_norm_bwd_metal(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                        offset: float) -> tuple[Tensor, Tensor]:
    x2, rows, n = _rows(x)
    dy2 = dy.reshape(-1, n).contiguous()
    rstd1 = rstd.reshape(-1).contiguous()
    dx = _metal.empty(x2.shape, dtype=x.dtype, device=x.device)
    lib = _metal.library(_SHADER, x.device)
    suffix = _metal.dtype_suffix(x.dtype)
    if rows:
        tg = _metal.threads_for_row(n)
        _metal.launch(lib, f"rms_norm_bwd_dx_{suffix}", dy2, x2, _weight(weight, x), rstd1, dx, n, float(offset),
                      int(weight is not None), threads=rows * tg, group_size=tg)
    if weight is None:
        return dx.view(x.shape), x.new_empty(0)
    chunk_rows = _metal.constants()["METALCORE_RMS_DW_ROWS_PER_THREAD"]
    chunks = max(1, -(-rows // chunk_rows))
    partial = _metal.empty((chunks, n), dtype=torch.float32, device=x.device)
    if rows:
        width = min(256, -(-n // 32) * 32)
        _metal.launch(lib, f"rms_norm_bwd_dw_{suffix}", dy2, x2, rstd1, partial, rows, n,
                      threads=(n, chunks), group_size=(width, 1))
    else:
        partial.zero_()
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)
