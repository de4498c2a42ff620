"""Cross-entropy's fused chunk kernel on Metal: the host side of ``shaders/cross_entropy.metal``.

Kernels ``cross_entropy_chunk_<dtype>`` for float, half and bfloat logits (one threadgroup per row);
float64 stays on the reference. The math is in cross_entropy.py.
"""

from typing import Optional

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.nn.cross_entropy import (
    cross_entropy_chunk_,
    fused_linear_cross_entropy_bwd,
    fused_linear_cross_entropy_fwd,
)

_SHADER = "cross_entropy"


def _supported(logits: Tensor, target: Tensor, grad_scale: Tensor, *_options) -> bool:
    if (logits.dtype not in _metal.KERNEL_DTYPES or logits.dim() != 2 or not logits.is_contiguous()
            or logits.shape[1] >= 2**31 or target.dtype != torch.int64 or grad_scale.dim() > 1):
        return False
    if logits.dtype == torch.bfloat16:  # bfloat kernels need Metal 3.1 (macOS 14)
        return _metal.has_kernel(_metal.library(_SHADER, logits.device), "cross_entropy_chunk_bfloat")
    return True


@cross_entropy_chunk_.implement("metal", supports=_supported)
def _cross_entropy_chunk_metal(logits: Tensor, target: Tensor, grad_scale: Tensor, ignore_index: int,
                               label_smoothing: float, z_loss: float, softcap: Optional[float],
                               write_grad: bool) -> Tensor:
    rows, vocab = logits.shape
    loss = _metal.empty((rows,), dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    scale = grad_scale.to(torch.float32).reshape(-1).contiguous()
    tg = _metal.threads_for_row(vocab)
    _metal.launch(_metal.library(_SHADER, logits.device), f"cross_entropy_chunk_{_metal.dtype_suffix(logits.dtype)}",
                  logits, target.contiguous(), scale, loss, vocab, int(grad_scale.dim() == 1), ignore_index,
                  float(label_smoothing), float(z_loss), float(softcap or 1.0), int(softcap is not None),
                  int(write_grad), threads=rows * tg, group_size=tg)
    return loss


# The chunk loop is the same on every backend (torch's GEMMs around the chunk kernel, which dispatches
# by itself), so an explicit request for this backend runs it as it is.
fused_linear_cross_entropy_fwd.implement("metal")(fused_linear_cross_entropy_fwd.reference)
fused_linear_cross_entropy_bwd.implement("metal")(fused_linear_cross_entropy_bwd.reference)
